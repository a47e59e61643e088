"""The benchmark runner and its report: `python -m benchmarks` as `make bench` runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from benchmarks.__main__ import Outcome, render, run_module, section_from_json
from benchmarks._common import Row, Section, leftover
from benchmarks.bench_peers import Attempt, count
from benchmarks.bench_up import choose_base, held_lock_inodes, one_up, side_by_side, write_layout

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("portpicker", "ephemeral_port_reserve", "port_for")


@pytest.mark.slow
def test_quick_peers_report_has_every_peer_and_no_portpool_double_allocation(
    tmp_path: Path,
) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "bench_peers", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    markdown = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["machine"] in markdown
    assert "## Honest notes" in markdown
    assert "bind+listen+close (floor)" in markdown
    (module,) = report["modules"]
    assert module["ok"], module["error"]
    section = module["section"]
    names = [row["name"] for row in section["rows"]]
    assert "portpool acquire+release" in names
    for peer in PEERS:
        assert any(name.startswith(peer) for name in names), peer
        assert peer in markdown
    for row in section["rows"]:
        assert row["ratio"] is not None and row["ratio"] > 0
        assert row["median"] > 0
    race = section["extra"]["race"]
    results = {(r["kind"], r["pooled"]): r for r in race["results"]}
    assert set(results) == {("portpool", True)} | {
        (p, pooled) for p in PEERS for pooled in (True, False)
    }
    portpool = results[("portpool", True)]
    assert portpool["double_allocations"] == 0
    # Every round, exactly the pool's ports were handed out, each to one racer.
    assert portpool["told"] == portpool["bound"] == race["pool_size"] * race["rounds"]
    for key, r in results.items():
        assert r["told"] > 0, key
        assert f"| {r['kind']} |" in markdown
    assert "double allocations" in markdown


def test_count_flags_shared_ports_and_failed_binds() -> None:
    attempts = [
        Attempt(0, 0, 5000, True),
        Attempt(0, 1, 5000, False),  # told the same port, then its bind failed
        Attempt(0, 2, 5001, True),
        Attempt(0, 3, None, False),  # refused: not a double allocation
        Attempt(1, 0, 5000, True),  # the same port in another round is fine
        Attempt(1, 1, 5002, False),  # told a port alone, but someone else had it
    ]
    result = count("x", True, 4, 2, attempts)
    assert result.told == 5
    assert result.bound == 3
    assert result.shared == 2
    assert result.bind_failed == 2
    assert result.double_allocations == 3
    assert result.distinct_ports == 3


def test_a_failing_module_is_reported_and_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "bench_broken_for_test.py").write_text(
        "def run(quick=False):\n    raise RuntimeError('the disk caught fire')\n"
    )
    (tmp_path / "bench_fine_for_test.py").write_text(
        textwrap.dedent(
            """
            from benchmarks._common import Row, Section

            def run(quick=False):
                s = Section("fine", floor="a")
                s.rows += [Row("a", [1.0, 2.0]), Row("portpool b", [4.0])]
                s.rows.append(Row("portpicker c", [2.0]))
                return s
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    broken = run_module("bench_broken_for_test", quick=True, timeout_s=60)
    fine = run_module("bench_fine_for_test", quick=True, timeout_s=60)
    assert broken.section is None
    assert broken.error is not None
    assert "the disk caught fire" in broken.error
    assert fine.section is not None
    assert fine.section.rows[1].median == 4.0
    meta = dict.fromkeys(("machine", "date", "command", "load_start", "load_end"), "m")
    text = render([broken, fine], meta)
    assert "FAILED" in text
    assert "the disk caught fire" in text
    assert "| portpool b |" in text
    # portpool slower than a peer is said out loud.
    assert "portpool b (4 us) is 2.0x portpicker c" in text


def test_a_report_with_nothing_missed_says_so_under_its_honest_notes() -> None:
    # The heading stood alone, which read as a section left unwritten.
    section = Section("fine", floor="a")
    section.rows += [Row("a", [1.0, 2.0]), Row("portpool b", [1.5])]
    meta = dict.fromkeys(("machine", "date", "command", "load_start", "load_end"), "m")
    text = render([Outcome("bench_fine", 1.0, section)], meta)
    honest = text.split("## Honest notes\n", 1)[1]
    assert honest.strip() == "- No target missed and no peer faster in this run."
    assert "the largest sample where a row has 100 or fewer" in text


def test_a_leftover_of_noise_is_not_printed_as_negative() -> None:
    # "-3 ms for the rest": parts, each a median of its own runs, may add up to more.
    assert leftover(11.4) == "11 ms"
    assert leftover(-3.2) == leftover(0.2) == "none measurable (the parts add up to it)"


def test_the_instance_benchmark_keeps_off_the_apps_ports_and_the_ephemeral_range() -> None:
    # It bound 6000-9xxx when free (a running app's), else 40000-41999 (ephemeral).
    from benchmarks.bench_instance import choose_layout

    layout, which = choose_layout()
    ports = [p for n in range(1, 11) for pool in layout.pools(n).values() for p in pool]
    assert min(ports) >= 20000 and max(ports) <= 29999, (min(ports), max(ports))
    assert "shifted" in which


def test_only_names_an_existing_benchmark(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "bench_nothing", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "no such benchmark" in done.stderr
    assert not (tmp_path / "report.md").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/locks")
def test_one_up_launch_is_ready_then_frees_every_lock(tmp_path: Path) -> None:
    base = choose_base()
    config = write_layout(tmp_path, base)
    state = tmp_path / "state"
    timings = one_up(config, state, [base + 10 * i for i in range(6)])
    assert timings["table"] > 0
    assert timings["ready"] > 0
    assert timings["locks_free"] <= timings["exited"]
    assert timings["cpu"] > 0  # up and its services, from the kernel's accounting
    assert held_lock_inodes(state) == set()


def test_cli_benchmark_measures_every_command_beside_its_floors() -> None:
    from benchmarks import bench_cli

    section = bench_cli.run(quick=True)
    names = [row.name for row in section.rows]
    floors = (
        bench_cli.FLOOR,
        "python -S -c pass",
        bench_cli.BARE,
        bench_cli.CLICK,
        bench_cli.CLICK_COMMAND,
        bench_cli.STATUS_IMPORTS,
    )
    for floor in floors:
        assert floor in names
    for command in (bench_cli.STATUS, bench_cli.RUN, bench_cli.START, "portpool --help"):
        assert command in names
    assert section.floor == bench_cli.FLOOR
    for row in section.rows:
        assert len(row.samples) == section.extra["runs"]
        assert row.median > 0
        assert section.ratio(row) is not None
    text = "\n".join(section.notes)
    assert "target <= 3.5x" in text and "target <= 3.0x" in text
    # status's remainder is split into what is outside portpool and what is its own
    for kind in ("wall", "CPU time"):
        assert f"{kind}: outside portpool, of status's" in text
    assert "python start" in text and "click's import" in text
    assert "importing its modules" in text and "the command's work" in text
    assert set(section.extra["cpu_ms_median"]) == set(names)  # type: ignore[arg-type]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/locks")
def test_up_floor_starts_the_six_commands_alone_and_stops_them(tmp_path: Path) -> None:
    base = choose_base()
    write_layout(tmp_path, base)
    ports = [base + 10 * i for i in range(6)]
    seconds, cpu_s = side_by_side(tmp_path / "service.py", ports)
    assert seconds > 0
    assert cpu_s > 0
    from benchmarks._common import bindable

    assert all(bindable(p) for p in ports)  # every one of them stopped


def test_a_row_keeps_its_own_floor_through_the_runners_report() -> None:
    """A section whose rows have different floors (wall beside wall, CPU beside CPU):
    each ratio is to its own floor, also once the runner rebuilt it from JSON."""
    section = Section(
        "mixed",
        rows=[
            Row("wall floor", [10.0], unit="ms"),
            Row("cpu floor", [4.0], unit="ms"),
            Row("wall", [30.0], unit="ms", floor="wall floor"),
            Row("cpu", [12.0], unit="ms", floor="cpu floor"),
            Row("no floor", [5.0], unit="ms"),
        ],
    )
    for s in (section, section_from_json(json.loads(json.dumps(section.to_json())))):
        ratios = {r.name: s.ratio(r) for r in s.rows}
        assert ratios == {
            "wall floor": None,
            "cpu floor": None,
            "wall": 3.0,
            "cpu": 3.0,
            "no floor": None,
        }
        assert "| wall | 30.0 ms | 30.0 ms | 3.00x |" in s.to_markdown()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/locks")
def test_up_benchmark_gives_up_as_a_ratio_to_its_floors() -> None:
    """The issue's `up` row beside its floors in the same run, as ratios: the six
    commands alone, python -c pass and python -S -c pass."""
    from benchmarks import bench_up

    section = bench_up.run(quick=True)
    rows = {r.name: r for r in section.rows}
    floor = rows["six commands side by side, no portpool -> all answer"]
    ready = rows["launch -> all six answer"]
    assert section.ratio(ready) == pytest.approx(ready.median / floor.median)
    cpu = rows["up and its six services: CPU, launch to exit"]
    cpu_floor = rows["six commands side by side: CPU, start to exit"]
    assert section.ratio(cpu) == pytest.approx(cpu.median / cpu_floor.median)
    assert section.ratio(floor) == section.ratio(cpu_floor) == 1.0  # the floors say so
    python = rows["python -c pass"]
    for name in ("python -S -c pass", bench_up.LAUNCH_ROW):
        assert section.ratio(rows[name]) == pytest.approx(rows[name].median / python.median)


@pytest.mark.slow
def test_status_over_1000_records_is_a_ratio_to_python_of_the_same_run() -> None:
    """The issue's scale row: status --json over 1,000 records of a 50-service layout,
    wall and CPU each a ratio to python -c pass of the same run (python -S beside)."""
    from benchmarks import bench_instance

    rows, _, extra = bench_instance.big_status_rows(hold=2, repeats=1)
    assert extra["status_1000"] == {"alive": 2, "instances": 1000}
    section = Section("scale", rows=rows)
    by = {r.name: r for r in rows}
    names = [r.name for r in rows]
    status = next(n for n in names if n.startswith("portpool status --json (1,000 records"))
    floor = by["python -c pass (beside the 1,000 records)"]
    cpu_floor = by["python -c pass (beside the 1,000 records), CPU"]
    assert section.ratio(by[status]) == pytest.approx(by[status].median / floor.median)
    cpu = by[f"{status}, CPU"]
    assert section.ratio(cpu) == pytest.approx(cpu.median / cpu_floor.median)
    assert "python -S -c pass (beside the 1,000 records)" in by
    assert len(set(names)) == len(names)  # no floor name is ambiguous


def test_each_reference_service_is_a_ratio_to_its_own_imports() -> None:
    """The issue's reference-app row: each service's time to answering beside its
    floor, a python importing what that service imports (named by its module)."""
    from benchmarks import bench_services

    from portpool.services import SERVICES

    rows = {bench_services.imports_row(kind): m for kind, m in bench_services.IMPORTS.items()}
    for name, module in SERVICES.items():
        floor = bench_services.service_floor(name)
        assert f"portpool.services.{module}" in rows[floor], (name, floor)
    section = Section(
        "reference app",
        rows=[
            Row(bench_services.PYTHON_ROW, [10.0], unit="ms"),
            Row(bench_services.service_floor("api-server"), [400.0], unit="ms"),
            Row(
                "up -> api-server answering",
                [600.0],
                floor=bench_services.service_floor("api-server"),
            ),
        ],
    )
    assert section.ratio(section.rows[2]) == 1.5


@pytest.mark.slow
def test_quick_restart_benchmark_refuses_nothing_with_the_socket_kept() -> None:
    from benchmarks.bench_restart import run

    section = run(quick=True)
    assert section.extra["kept_refused"] == [0, 0, 0]
    # The restart loop that rebinds refuses connections while the service is down.
    refused = section.extra["rebind_refused"]
    assert isinstance(refused, list) and all(n > 0 for n in refused)
    for row in section.rows:
        assert row.median > 0
