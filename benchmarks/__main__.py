"""``make bench``: run every ``benchmarks/bench_*.py`` into one report.

    python -m benchmarks [--quick] [--out DIR] [--only NAME]...

Each module runs in a child process of this one (one process tree: a module that
crashes, hangs or leaks locks cannot spoil the others), calls ``run(quick)`` and hands
back its Section as JSON. A module that fails is reported as failed, with its error,
and the others still run. The report goes to ``DIR/report.md`` and ``DIR/report.json``
(default ``benchmarks/results/``) and the Markdown is printed too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._common import Row, Section, machine
from benchmarks.bench_instance import bench_env

HERE = Path(__file__).resolve().parent
PEERS = ("portpicker", "ephemeral_port_reserve", "port_for")

# Run in a child: import the module, run it, write its section as JSON to argv[3].
_CHILD = """\
import importlib, json, sys
module = importlib.import_module(sys.argv[1])
section = module.run(quick=sys.argv[2] == "1")
with open(sys.argv[3], "w") as f:
    json.dump(section.to_json(), f)
"""

# Why portpool costs more than a peer, for the honest notes.
WHY = {
    "portpicker": "portpicker binds port 0 for TCP and UDP and lets go: the port is "
    "nobody's a moment later, so two programs can be handed the same one",
    "ephemeral_port_reserve": "ephemeral_port_reserve leaves the port in TIME_WAIT so the "
    "kernel won't hand it out, but any program using SO_REUSEADDR can still take it",
    "port_for": "port_for probes and lets go (its per-call cost is building its set of "
    "'good' ports)",
}


def discover() -> list[str]:
    """The benchmark modules of this package, ``bench_*``, sorted."""
    return sorted(
        f"benchmarks.{m.name}"
        for m in pkgutil.iter_modules([str(HERE)])
        if m.name.startswith("bench_")
    )


@dataclass
class Outcome:
    """One module's result: its section, or why it failed; and how long it took."""

    module: str
    seconds: float
    section: Section | None = None
    error: str | None = None
    stderr_tail: str = ""
    extra: dict[str, object] = field(default_factory=dict)


def section_from_json(doc: dict[str, object]) -> Section:
    """Rebuild a Section from ``Section.to_json()``."""
    rows = [
        Row(
            str(r["name"]),
            [float(s) for s in r["samples"]],
            str(r["unit"]),
            str(r["note"]),
            floor=None if r.get("floor") is None else str(r["floor"]),
        )
        for r in doc["rows"]  # type: ignore[attr-defined]
    ]
    return Section(
        title=str(doc["title"]),
        rows=rows,
        floor=doc.get("floor"),  # type: ignore[arg-type]
        notes=list(doc.get("notes", [])),  # type: ignore[call-overload]
        extra=dict(doc.get("extra", {})),  # type: ignore[call-overload]
    )


def run_module(module: str, quick: bool, timeout_s: float) -> Outcome:
    """Run one benchmark module in a child process; never raises for its failures."""
    fd, out_path = tempfile.mkstemp(suffix=".json", prefix="bench-")
    os.close(fd)
    t0 = time.perf_counter()
    try:
        try:
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, module, "1" if quick else "0", out_path],
                capture_output=True,
                timeout=timeout_s,
                check=False,
                env=bench_env(PYTHONPATH=_pythonpath()),
            )
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"").decode(errors="replace")[-1500:]
            return Outcome(
                module,
                time.perf_counter() - t0,
                error=f"timed out after {timeout_s:.0f} s",
                stderr_tail=tail,
            )
        seconds = time.perf_counter() - t0
        tail = done.stderr.decode(errors="replace")[-1500:]
        if done.returncode != 0:
            last = [ln for ln in tail.strip().splitlines() if ln.strip()]
            error = last[-1] if last else f"exit status {done.returncode}"
            return Outcome(module, seconds, error=error, stderr_tail=tail)
        try:
            doc = json.loads(Path(out_path).read_text())
            return Outcome(module, seconds, section=section_from_json(doc))
        except (ValueError, KeyError, TypeError) as e:
            return Outcome(module, seconds, error=f"unreadable result: {e}", stderr_tail=tail)
    finally:
        os.unlink(out_path)


def _pythonpath() -> str:
    parts = [str(HERE.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.pathsep.join(dict.fromkeys(parts))


# ---------------------------------------------------------------- the report


def peer_of(row_name: str) -> str | None:
    """The peer a row measures, from its name (``portpicker.pick_unused_port()``)."""
    return next((p for p in PEERS if row_name.startswith(p)), None)


def honest_notes(outcomes: list[Outcome]) -> list[str]:
    """Where portpool is slower than a peer (or misses a target), and why."""
    notes: list[str] = []
    for o in outcomes:
        if o.section is None:
            continue
        notes.extend(str(n) for n in o.section.extra.get("honest", []))  # type: ignore[attr-defined]
        portpool_rows = [r for r in o.section.rows if r.name.lower().startswith("portpool")]
        peer_rows = [r for r in o.section.rows if peer_of(r.name)]
        if "honest" in o.section.extra or not portpool_rows:
            continue
        pp = portpool_rows[0]
        for peer in peer_rows:
            if peer.median < pp.median:
                name = peer_of(peer.name) or ""
                notes.append(
                    f"{o.section.title}: {pp.name} ({pp.median:.0f} {pp.unit}) is "
                    f"{pp.median / peer.median:.1f}x {peer.name} ({peer.median:.0f} "
                    f"{peer.unit}): a kernel lock, a file identity check and a metadata "
                    f"record cost more than a probe; {WHY.get(name, '')}."
                )
    # Missed targets are explained in their sections' notes: named here, not repeated.
    missed = [
        f"{o.section.title} ({sum('MISSED' in n for n in o.section.notes)})"
        for o in outcomes
        if o.section is not None and any("MISSED" in n for n in o.section.notes)
    ]
    if missed:
        notes.append("Targets missed, each explained in its section: " + "; ".join(missed) + ".")
    if any(peer_of(r.name) for o in outcomes if o.section is not None for r in o.section.rows):
        notes.append(
            "The floor (bind+listen+close) is what any exclusive reservation must do at "
            "least; portpool adds a lock file and a metadata write to it, which is why it "
            "sits several times above the floor. The peers are not exclusive: the race "
            "counts show what that saving buys."
        )
    return notes


def load_text() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


def render(outcomes: list[Outcome], meta: dict[str, str]) -> str:
    """The Markdown report."""
    lines = [
        "# portpool benchmark report",
        "",
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- load average (1/5/15 min) at start: {meta['load_start']}, at end: {meta['load_end']}",
        "- child processes run with byte-code caching on (in a private cache directory), "
        "as an installed package would",
        "- figures are medians and p99s (the largest sample where a row has 100 or fewer), "
        "and ratios to a floor measured in the same run; on a shared machine compare "
        "ratios, not absolute times",
        "",
        "## Summary",
        "",
        "| module | status | seconds |",
        "| --- | --- | ---: |",
    ]
    for o in outcomes:
        status = "ok" if o.section else f"FAILED: {o.error}"
        lines.append(f"| {o.module} | {status} | {o.seconds:.1f} |")
    lines.append("")
    for o in outcomes:
        if o.section is not None:
            lines.append(o.section.to_markdown())
        else:
            lines += [f"### {o.module}: FAILED", "", f"Error: `{o.error}`", ""]
            if o.stderr_tail:
                lines += ["```", o.stderr_tail.rstrip(), "```", ""]
    lines += ["## Honest notes", ""]
    # Said even when empty: a bare heading read as a section left unwritten.
    notes = honest_notes(outcomes) or ["No target missed and no peer faster in this run."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def to_json(outcomes: list[Outcome], meta: dict[str, str]) -> dict[str, object]:
    return {
        **meta,
        "modules": [
            {
                "module": o.module,
                "seconds": o.seconds,
                "ok": o.section is not None,
                "error": o.error,
                "section": o.section.to_json() if o.section else None,
            }
            for o in outcomes
        ],
        "honest_notes": honest_notes(outcomes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (~2 min in all)")
    parser.add_argument("--out", default=str(HERE / "results"), help="report directory")
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="run only this module"
    )
    args = parser.parse_args(argv)
    modules = discover()
    if args.only:
        wanted = [n if n.startswith("benchmarks.") else f"benchmarks.{n}" for n in args.only]
        unknown = [n for n in wanted if n not in modules]
        if unknown:
            parser.error(f"no such benchmark {unknown[0]!r}; there are: {', '.join(modules)}")
        modules = wanted
    timeout_s = 120.0 if args.quick else 1200.0
    meta = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks"
        + (" --quick" if args.quick else "")
        + "".join(f" --only {n.split('.')[-1]}" for n in args.only),
        "load_start": load_text(),
    }
    outcomes = []
    for module in modules:
        print(f"running {module} ...", file=sys.stderr, flush=True)
        outcome = run_module(module, args.quick, timeout_s)
        state = "ok" if outcome.section else f"FAILED: {outcome.error}"
        print(f"  {state} ({outcome.seconds:.1f} s)", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    meta["load_end"] = load_text()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = render(outcomes, meta)
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps(to_json(outcomes, meta), indent=2) + "\n")
    print(report)
    print(f"written: {out / 'report.md'}, {out / 'report.json'}", file=sys.stderr)
    return 0 if all(o.section for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
