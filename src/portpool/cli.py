"""The ``portpool`` command: a thin click layer over the library.

Every command calls the library, turns its errors into a clear message on stderr and
the contract's exit code: 0 ok; 1 error; 2 usage; 3 nothing started (no free slot or a
pool exhausted); 4 the shield tripped; 5 a service exited on its own.

Here: the group and the commands that start or read instances (status, layout, doctor,
gc, run, up). The commands that act on a running instance from another terminal are in
``portpool._cli_control``; what every command shares, in ``portpool._cli_common``.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
from typing import TYPE_CHECKING, Any

import click

from portpool._cli_common import (
    CommandAfterOptions,
    F,
    JsonAwareGroup,
    check_seconds,
    config_option,
    display,
    drop_stdout,
    echo_json,
    echo_json_listing,
    finish,
    from_echo,
    handle_errors,
    inherited_fds,
    instance_option,
    json_option,
    layout_for,
    occupy_closed_std_fds,
    reader_gone,
    refuse_unknown_option,
)
from portpool._cli_control import COMMANDS, up_detached

# The library loads in the commands that use it: `--help` and the read-only commands
# must not pay for sockets, threads and logging they never use (tests/test_imports.py).
if TYPE_CHECKING:
    from collections.abc import Iterable

    from portpool.instance import Instance
    from portpool.records import InstanceInfo

# Commands that log nothing (no threads, no instance): they skip importing logging.
_SILENT_COMMANDS = frozenset({"status", "layout", "gc"})


@click.group(cls=JsonAwareGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="portpool")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Exclusive, predictable ports for every instance of a multi-service app."""
    if ctx.invoked_subcommand not in _SILENT_COMMANDS:
        import logging

        logging.basicConfig(level=logging.WARNING, format="portpool: %(levelname)s: %(message)s")


# ---------------------------------------------------------------- status / layout / doctor / gc


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


@cli.command()
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


@cli.command("layout")
@config_option
@json_option
@handle_errors
def layout_command(config: str | None, as_json: bool) -> None:
    """The pools of every admissible instance, then warnings (errors fail with exit 1)."""
    from portpool._host_warnings import layout_warnings
    from portpool.layout import describe_layout

    if as_json:
        from portpool._layout_document import layout_document

        echo_json(layout_document(layout_for(config)))
        return
    layout = layout_for(config)
    for line in describe_layout(layout, list(layout_warnings(layout))):
        click.echo(line)


@cli.command()
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


@cli.command()
@config_option
@json_option
@handle_errors
def gc(config: str | None, as_json: bool) -> None:
    """Remove metadata left by dead holders (never anything a live holder has).

    Ports are shared by every app of the state dir, so the whole state dir is cleaned;
    a --config is checked like everywhere else.
    """
    from portpool._gc import gc as run_gc

    if config is not None:
        layout_for(config)
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


# ---------------------------------------------------------------- run / up


def _announce(instance: Instance, quiet: bool, *, up: bool = True) -> None:
    """On stderr, so the command's stdout stays clean: one line per service that did not
    get its pool's first port and why (always), then the instance and its ports.
    ``up``: False for ``run``, whose services bind their ports only without ``--fds``."""
    for lease in instance.leases.values():
        note = lease.skip_note()
        if note:
            click.echo(f"portpool: {note}", err=True)
    _report_plain_bind(instance, up=up)
    if not quiet:
        ports = " ".join(f"{name}={port}" for name, port in instance.ports.items())
        click.echo(f"portpool: instance {instance.number} of {instance.app}: {ports}", err=True)


def _report_plain_bind(instance: Instance, *, up: bool = True) -> None:
    """One line per port handed over by number that a plain bind cannot take yet."""
    from portpool._handover import handed_over, plain_bind_notes

    leases = handed_over(instance.layout, instance.leases.values(), up=up)
    for note in plain_bind_notes(leases):
        click.echo(f"portpool: {note}", err=True)


def _interrupted(func: F) -> F:
    """An interrupt before the command started: everything is released; die of it.
    A reader of our stdout that went away (``portpool up | head -2``): everything is
    released too; die of SIGPIPE, quietly, as a pipeline's writer does (it exited 1)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from portpool._relay import die_of
        from portpool.errors import Interrupted

        try:
            return func(*args, **kwargs)
        except Interrupted as e:
            die_of(e.signum)
        except BrokenPipeError as e:
            reader_gone(e)

    return wrapper  # type: ignore[return-value]


quiet_option = click.option(
    "--quiet", "-q", is_flag=True, help="Do not print the instance and its ports on stderr."
)


# Options end at the command: `run python -c ...` must not read -c as --config.
@cli.command(
    cls=CommandAfterOptions,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@config_option
@click.option(
    "--service",
    "-s",
    "services",
    multiple=True,
    help="Acquire this service's port (repeatable). Default: every service of the layout.",
)
@click.option(
    "--fds", is_flag=True, help="Pass the listening sockets at fds 3.. (LISTEN_FDS protocol)."
)
@instance_option
@quiet_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
@_interrupted
def run(
    *,
    config: str | None,
    services: tuple[str, ...],
    fds: bool,
    instance_number: int | None,
    quiet: bool,
    command: tuple[str, ...],
) -> None:
    """Start an instance, run COMMAND with its ports, release when it exits.

    Exits with COMMAND's exit code, or dies of the signal that killed it (3 if nothing
    could start, 4 if the shield tripped).
    """
    from portpool._run import run_command

    inherited = inherited_fds()  # before anything is opened: what run was started with
    refuse_unknown_option(command)
    layout = layout_for(config)
    layout.check_number(instance_number)  # in the words of every other command
    outcome = run_command(
        layout,
        command,
        services=list(dict.fromkeys(services)),
        fds=fds,
        number=instance_number,
        announce=lambda instance: _announce(instance, quiet, up=False),
        whole_tree=True,  # this process starts nothing else: every child of it is run's
        pass_fds=inherited,
    )
    finish(outcome, None)


@cli.command()
@config_option
@click.option(
    "--grace",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds services get to stop after the stop signal before SIGKILL.",
)
@instance_option
@click.option("--detach", "-d", is_flag=True, help="Start in the background; return once up.")
@quiet_option
@handle_errors
@_interrupted
def up(
    *, config: str | None, grace: float, instance_number: int | None, detach: bool, quiet: bool
) -> None:
    """Start an instance with every service of the layout; hold it until Ctrl-C/SIGTERM."""
    from portpool._outcome import Outcome
    from portpool._up import run_up
    from portpool.errors import ServiceExited, ShieldTripped

    check_seconds("--grace", grace)
    layout = layout_for(config)
    layout.check_number(instance_number)
    if detach:
        up_detached(layout, grace, instance_number, quiet, config)
        return
    numbers: list[int] = []

    def announce(instance: Instance) -> None:
        numbers.append(instance.number)
        _announce(instance, quiet)  # as soon as the ports are ours, before readiness

    def on_up(instance: Instance, pids: dict[str, int]) -> None:
        click.echo(f"portpool: instance {instance.number} of {layout.app} is up")
        click.echo(f"  {'service':<16} {'port':>5}  {'pid':>7}")
        for name, port in instance.ports.items():
            pid = pids.get(name)
            click.echo(f"  {name:<16} {port:>5}  {pid if pid else '-':>7}")
        sys.stdout.flush()

    try:
        outcome = run_up(
            layout,
            grace_s=grace,
            number=instance_number,
            on_up=on_up,
            announce=announce,
            whole_tree=True,  # this process starts nothing else: every child of it is up's
        )
    except (ServiceExited, ShieldTripped) as e:  # all stopped and released: say why
        click.echo(f"portpool: {e}", err=True)
        outcome = Outcome(e.exit_code, lingering=e.lingering)
    stopped = f"portpool: instance {numbers[0]} stopped; its ports are free" if numbers else None
    # A stop's "stopping on SIGINT" was said when the signal came (outcome.message).
    finish(outcome, stopped)


# From another terminal: port, env, stop, logs.
for _command in COMMANDS:
    cli.add_command(_command)


def _output_failed(error: OSError) -> None:
    """A stdout that is closed or full (``status > /dev/full``): one line, exit 1."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"portpool: error: cannot write to standard output: {error.strerror}\n")
        sys.stderr.flush()
    drop_stdout()
    sys.exit(1)


def main() -> None:
    """Console-script entry point.

    Ctrl-C ends a command at once by SIGINT's default action, quietly, as any Unix tool
    holding nothing does (click printed "Aborted!" and exited 1, an error to a calling
    shell); ``run`` and ``up`` take the signals over while they hold an instance.
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored by the caller: kept
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    stdout_closed = occupy_closed_std_fds()
    if stdout_closed and sys.argv[1:2] != ["run"]:  # run prints nothing on stdout
        click.echo("portpool: error: standard output is closed", err=True)
        sys.exit(1)
    try:
        cli(prog_name="portpool")
    except KeyboardInterrupt:  # Ctrl-C before run/up took over the signals
        from portpool._relay import die_of

        die_of(signal.SIGINT)
    except OSError as e:
        if not from_echo(e):
            raise
        if isinstance(e, BrokenPipeError):  # a usage error's (click shows it late): exited 1
            reader_gone(e)
        _output_failed(e)


if __name__ == "__main__":
    main()
