"""The ``portpool`` command: a thin click layer over the library.

Every command calls the library, turns its errors into a clear message on stderr and
the contract's exit code: 0 ok; 1 error; 2 usage; 3 nothing started (no free slot or a
pool exhausted); 4 the shield tripped; 5 a service exited on its own.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from portpool.errors import PortPoolError
from portpool.layout import Layout, describe_layout, resolve_layout

if TYPE_CHECKING:
    from portpool.instance import Instance
    from portpool.records import ServiceInfo
    from portpool.supervisor import Outcome

F = TypeVar("F", bound=Callable[..., Any])


def _fail(error: PortPoolError) -> None:
    click.echo(f"portpool: error: {error}", err=True)
    sys.exit(error.exit_code)


def handle_errors(func: F) -> F:
    """Turn library errors into one message and the contract's exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PortPoolError as e:
            _fail(e)

    return wrapper  # type: ignore[return-value]


def config_option(func: F) -> F:
    return click.option(
        "--config",
        "-c",
        "config",
        type=click.Path(),
        default=None,
        help="Layout file (TOML). Default: ./portpool.toml if present, else the built-in layout.",
    )(func)


def _layout(config: str | None) -> Layout:
    return resolve_layout(config)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="portpool")
def cli() -> None:
    """Exclusive, predictable ports for every instance of a multi-service app."""
    logging.basicConfig(level=logging.WARNING, format="portpool: %(levelname)s: %(message)s")


# ---------------------------------------------------------------- status / layout / doctor / gc


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago"


def _service_text(s: ServiceInfo) -> str:
    """``name=port``, plus ``(state, N restarts, last exit S)`` for a supervised service."""
    if s.state is None:
        return f"{s.name}={s.port}"
    extra = [s.state]
    if s.restarts:
        extra.append(f"{s.restarts} restart{'s' if s.restarts != 1 else ''}")
    if s.last_exit_status is not None:
        extra.append(f"last exit {s.last_exit_status}")
    return f"{s.name}={s.port} ({', '.join(extra)})"


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def status(config: str | None, as_json: bool) -> None:
    """Every instance of the app: number, pid, alive, heartbeat age, services and ports."""
    from portpool.records import list_instances
    from portpool.statedir import StateDir

    layout = _layout(config)
    with StateDir.open() as state:
        infos = list_instances(layout.app, state)
        if as_json:
            doc = {
                "app": layout.app,
                "state_dir": state.path,
                "instances": [i.to_dict() for i in infos],
            }
            # Compact: the indenting encoder is pure Python and 6x slower at 1,000 instances.
            click.echo(json.dumps(doc, separators=(",", ":")))
            return
        click.echo(f"app {layout.app} (state dir {state.path})")
        if not infos:
            click.echo("no instances")
            return
        click.echo(f"{'#':>3}  {'pid':>7}  {'alive':<5}  {'heartbeat':<11}  services")
        for info in infos:
            pid = str(info.pid) if info.pid is not None else "-"
            alive = "yes" if info.alive else "no"
            if info.readable:
                services = "  ".join(_service_text(s) for s in info.services)
            else:
                services = info.problem or "record unreadable"
            click.echo(
                f"{info.number:>3}  {pid:>7}  {alive:<5}  {_age(info.heartbeat_age_s):<11}  "
                f"{services}"
            )


@cli.command("layout")
@config_option
@handle_errors
def layout_command(config: str | None) -> None:
    """The pools of every admissible instance, then warnings (errors fail with exit 1)."""
    for line in describe_layout(_layout(config)):
        click.echo(line)


@cli.command()
@config_option
@handle_errors
def doctor(config: str | None) -> None:
    """What blocks which pool port, naming foreign holders where the OS says. Kills nothing."""
    from portpool._platform import listeners, locked_inodes
    from portpool.lock import inspect_port
    from portpool.pool import describe_foreign
    from portpool.statedir import StateDir

    layout = _layout(config)
    listening = {listener.port for listener in listeners()}
    counts = {"free": 0, "held": 0, "foreign": 0}
    with StateDir.open() as state:
        locked = locked_inodes()
        click.echo(f"app {layout.app}: {layout.max_instances} instances, host {layout.host}")
        for number in range(1, layout.max_instances + 1):
            click.echo(f"instance {number}:")
            for service in layout.services:
                for port in service.pool(number):
                    seen = inspect_port(state, port, locked)
                    if not seen.is_free:
                        counts["held"] += 1
                        text = seen.describe()
                    elif port in listening:
                        counts["foreign"] += 1
                        text = describe_foreign(port)
                    else:
                        counts["free"] += 1
                        text = "free"
                    click.echo(f"  {service.name:<16} {port:>5}  {text}")
    click.echo(
        f"{counts['free']} free, {counts['held']} held by portpool, "
        f"{counts['foreign']} used by foreign processes"
    )


@cli.command()
@config_option
@handle_errors
def gc(config: str | None) -> None:
    """Remove metadata left by dead holders (never anything a live holder has).

    Ports are shared by every app of the state dir, so the whole state dir is cleaned;
    a --config is checked like everywhere else.
    """
    from portpool.records import gc as run_gc

    if config is not None:
        _layout(config)
    report = run_gc()
    for name in report.instances:
        click.echo(f"removed record of dead instance {name}")
    for port in report.ports:
        click.echo(f"removed metadata of port {port} (holder is gone)")
    for name in report.temp_files:
        click.echo(f"removed temporary file {name}")
    total = len(report.instances) + len(report.ports) + len(report.temp_files)
    click.echo(f"gc: {total} removed")


# ---------------------------------------------------------------- run / up


def _announce(instance: Instance) -> None:
    ports = " ".join(f"{name}={port}" for name, port in instance.ports.items())
    click.echo(f"portpool: instance {instance.number} of {instance.app}: {ports}", err=True)


def _finish(outcome: Outcome, instance_line: str | None) -> None:
    """Print how it ended, then exit with the outcome's code or die of its signal."""
    from portpool._relay import die_of

    for line in outcome.lingering:
        click.echo(f"portpool: {line}", err=True)
    if instance_line is not None and not outcome.lingering:
        click.echo(instance_line)
    if outcome.signum is not None:
        die_of(outcome.signum)
    sys.exit(outcome.code)


def _interrupted(func: F) -> F:
    """An interrupt before the command started: everything is released; die of it."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from portpool._relay import die_of
        from portpool.errors import Interrupted

        try:
            return func(*args, **kwargs)
        except Interrupted as e:
            die_of(e.signum)

    return wrapper  # type: ignore[return-value]


quiet_option = click.option(
    "--quiet", "-q", is_flag=True, help="Do not print the instance and its ports on stderr."
)


# Options end at the command: `run python -c ...` must not read -c as --config.
@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
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
@quiet_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
@_interrupted
def run(
    config: str | None, services: tuple[str, ...], fds: bool, quiet: bool, command: tuple[str, ...]
) -> None:
    """Start an instance, run COMMAND with its ports, release when it exits.

    Exits with COMMAND's exit code, or dies of the signal that killed it (3 if nothing
    could start, 4 if the shield tripped).
    """
    from portpool.supervisor import run_command

    outcome = run_command(
        _layout(config),
        command,
        services=list(dict.fromkeys(services)),
        fds=fds,
        announce=None if quiet else _announce,
    )
    _finish(outcome, None)


@cli.command()
@config_option
@click.option(
    "--grace",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds services get to stop after the stop signal before SIGKILL.",
)
@quiet_option
@handle_errors
@_interrupted
def up(config: str | None, grace: float, quiet: bool) -> None:
    """Start an instance with every service of the layout; hold it until Ctrl-C/SIGTERM."""
    from portpool.supervisor import run_up

    layout = _layout(config)
    numbers: list[int] = []

    def on_up(instance: Instance, pids: dict[str, int]) -> None:
        numbers.append(instance.number)
        if not quiet:
            _announce(instance)
        click.echo(f"portpool: instance {instance.number} of {layout.app} is up")
        click.echo(f"  {'service':<16} {'port':>5}  {'pid':>7}")
        for name, port in instance.ports.items():
            pid = pids.get(name)
            click.echo(f"  {name:<16} {port:>5}  {pid if pid else '-':>7}")
        sys.stdout.flush()

    outcome = run_up(layout, grace_s=grace, on_up=on_up)
    if outcome.message:
        click.echo(f"portpool: {outcome.message}", err=outcome.code != 0 and outcome.signum is None)
    stopped = f"portpool: instance {numbers[0]} stopped; its ports are free" if numbers else None
    _finish(outcome, stopped)


def main() -> None:
    """Console-script entry point.

    Ctrl-C ends a command at once by SIGINT's default action, quietly, as for any Unix
    tool that holds nothing (click would print "Aborted!" and exit 1, which a calling
    shell takes for an error); ``run`` and ``up`` take the signals over while they hold
    an instance.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        cli(prog_name="portpool")
    except KeyboardInterrupt:  # Ctrl-C before run/up took over the signals
        from portpool._relay import die_of

        die_of(signal.SIGINT)


if __name__ == "__main__":
    main()
