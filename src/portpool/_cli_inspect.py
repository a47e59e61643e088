"""The ``portpool`` commands that read the state dir and the layout: ``status``,
``layout``, ``doctor`` and ``gc`` (registered on the ``portpool`` group by
``portpool.cli``); the work is the library's (``records``, ``layout``, ``_doctor``,
``_gc``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from portpool._cli_common import (
    JsonAwareCommand,
    config_option,
    display,
    echo_json,
    echo_json_listing,
    handle_errors,
    json_option,
    layout_for,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from portpool.records import InstanceInfo

__all__ = ["COMMANDS", "SILENT_COMMANDS"]

# Commands that log nothing (no threads, no instance): they skip importing logging.
SILENT_COMMANDS = frozenset({"status", "layout", "gc"})


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago"


def _service_text(entry: dict[str, Any], alive: bool) -> str:
    """``name=port`` of a service entry (``InstanceInfo.service_entries``), plus ``(state,
    N restarts, last exit S)`` for a supervised service; ``was <state>`` when its
    instance is dead (kill -9: "ready" beside "alive no").

    The entry, not ``ServiceInfo``: making one per service was a quarter of text
    ``status`` over 1,000 records of 50 services (``benchmarks.bench_instance``)."""
    name, state = entry["name"], entry.get("state")
    port = "-" if entry["port"] is None else entry["port"]  # as the pid column: not "None"
    if state is None:
        return f"{name}={port}"
    extra = [state if alive else f"was {state}"]
    restarts, last = entry.get("restarts", 0), entry.get("last_exit_status")
    if restarts:
        extra.append(f"{restarts} restart{'s' if restarts != 1 else ''}")
    if last is not None:
        extra.append(f"last exit {last}")
    return f"{name}={port} ({', '.join(extra)})"


@click.command(cls=JsonAwareCommand)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def status(config: str | None, as_json: bool) -> None:
    """Every instance of the app: number, pid, alive, heartbeat age, services and ports."""

    from portpool.records import iter_instances
    from portpool.statedir import StateDir

    layout = layout_for(config)
    with StateDir.open(create=False) as state:  # read-only: creates nothing
        # One record at a time (iter_instances says why); printed once all are read.
        infos = iter_instances(layout.app, state)
        if as_json:
            head: dict[str, object] = {"app": layout.app, "state_dir": state.path}
            echo_json_listing(head, "instances", (i.to_dict() for i in infos))
            return
        lines = _status_lines(infos)
        click.echo(f"app {layout.app} (state dir {display(state.path)})")
        if not lines:
            click.echo("no instances")
            return
        click.echo("\n".join(lines))


def _status_lines(infos: Iterable[InstanceInfo]) -> list[str]:
    """The lines of text ``status`` prints for ``infos``, its header first ([] for none):
    the "#" column as wide as the largest number (a 99999.json pushed its line out)."""
    rows: list[tuple[int | None, str]] = []  # (number, the rest); None: a note below
    for info in infos:
        pid = str(info.pid) if info.pid is not None else "-"
        alive = "yes" if info.alive else "no"
        if info.readable:
            services = "  ".join(_service_text(e, info.alive) for e in info.service_entries)
            services += f"  ({info.problem})" if info.problem else ""
        else:
            services = info.problem or "record unreadable"
        if info.directory:
            services += f"  (dir {info.directory})"
        services = display(services)  # record text: whoever shares our uid wrote it
        rows.append(
            (info.number, f"{pid:>7}  {alive:<5}  {_age(info.heartbeat_age_s):<11}  {services}")
        )
        # Why a service is not on its pool's first port, in run's and doctor's words.
        for entry in info.service_entries:
            for r in entry.get("refusals", ()):
                said = f"{entry['name']} skipped {r['port']}: {r['reason']} ({r['detail']})"
                rows.append((None, f"{'':>31}{display(said)}"))
    if not rows:
        return []
    width = max([3, *(len(str(n)) for n, _ in rows if n is not None)])
    head = f"{'#':>{width}}  {'pid':>7}  {'alive':<5}  {'heartbeat':<11}  services"
    return [head, *(f"{'' if n is None else n:>{width}}  {rest}" for n, rest in rows)]


@click.command("layout", cls=JsonAwareCommand)
@config_option
@json_option
@handle_errors
def layout_command(config: str | None, as_json: bool) -> None:
    """The pools of every admissible instance, then warnings (errors fail with exit 1)."""
    from portpool._host_warnings import layout_warnings
    from portpool._programs import command_warnings
    from portpool.layout import describe_layout

    layout = layout_for(config)
    commands = command_warnings(layout)
    if as_json:
        from portpool._layout_document import layout_document

        echo_json(layout_document(layout, commands))
        return
    for line in describe_layout(layout, [*layout_warnings(layout), *commands]):
        click.echo(line)


@click.command(cls=JsonAwareCommand)
@click.argument("service", required=False)
@config_option
@click.option("--all", "show_all", is_flag=True, help="List free ports too.")
@json_option
@handle_errors
def doctor(service: str | None, config: str | None, show_all: bool, as_json: bool) -> None:
    """What blocks which pool port (of SERVICE, or all), naming foreign holders where the
    OS says; free ports without a note are only counted unless --all. Kills nothing."""
    from portpool._doctor import examine_layout

    layout = layout_for(config)
    report = examine_layout(layout, service=service)
    if as_json:
        doc = report.to_dict(show_free=show_all)
        echo_json(doc)
        return
    click.echo(report.heading())
    number = 0
    for verdict in report.verdicts:
        if not (verdict.listed or show_all):
            continue
        if verdict.instance != number:
            number = verdict.instance
            click.echo(f"instance {number}:")
        # record text from the state dir: escaped for the terminal
        click.echo(f"  {verdict.service:<16} {verdict.port:>5}  {display(verdict.describe())}")
    hint = "" if show_all or not report.counts()["free"] else " (--all lists the free ones)"
    click.echo(report.tally() + hint)
    for line in report.summary():
        click.echo(line)


@click.command(cls=JsonAwareCommand)
@config_option
@json_option
@handle_errors
def gc(config: str | None, as_json: bool) -> None:
    """Remove metadata left by dead holders (never anything a live holder has).

    Ports are shared by every app of the state dir, so the whole state dir is cleaned;
    the layout (--config, or ./portpool.toml) is checked like everywhere else.
    """
    from portpool._gc import gc as run_gc

    layout_for(config)  # an unusable ./portpool.toml is an error here too, never skipped
    report = run_gc()
    if as_json:  # a failure's JSON names its error and code, as every command's does
        fault = {"error": "gc skipped " + "; ".join(report.problems), "exit_code": 1}
        echo_json(report.to_dict() | (fault if report.problems else {}))
        _gc_problems(report.problems)  # skipped entries fail here too, named on stderr
        return
    for name in report.instances:
        click.echo(f"removed record of dead instance {name}")
    for port in report.ports:
        click.echo(f"removed metadata of port {port} (holder is gone)")
    for what in report.released:
        click.echo(f"removed files left for reuse by released {what}")
    for name in report.temp_files:
        click.echo(f"removed temporary file {display(name)}")
    click.echo(f"gc: {len(report.files)} files removed")
    for name in report.files:
        click.echo(f"  {display(name)}")
    _gc_problems(report.problems)


def _gc_problems(problems: list[str]) -> None:
    """Name each entry gc skipped on stderr, then exit 1 if there was one."""
    for problem in problems:
        click.echo(f"portpool: error: gc skipped {display(problem)}", err=True)
    if problems:
        sys.exit(1)


COMMANDS = (status, layout_command, doctor, gc)
