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
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import click

from portpool.errors import LayoutError, PortPoolError, ShieldTripped
from portpool.layout import Layout, describe_layout, resolve_layout

if TYPE_CHECKING:
    import subprocess

    from portpool.records import ServiceInfo

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


def _install_handlers(handler: Callable[[int], None], signals: list[int]) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        handler(signum)

    for signum in signals:
        signal.signal(signum, on_signal)


def _stop_signals() -> list[int]:
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


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
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
def run(config: str | None, services: tuple[str, ...], fds: bool, command: tuple[str, ...]) -> None:
    """Start an instance, run COMMAND with its ports, release when it exits.

    Exits with COMMAND's exit code (3 if nothing could start, 4 if the shield tripped).
    """
    from portpool._platform import in_terminal_foreground
    from portpool.errors import CommandNotFound
    from portpool.instance import start_instance
    from portpool.supervisor import (
        base_environment,
        exit_status,
        find_program,
        spawn,
        stop_children,
    )

    layout = _layout(config)
    problem = find_program(command)
    if problem is not None:
        raise CommandNotFound(command[0], problem)
    # Handlers first: a signal that arrives while the command starts is kept and
    # delivered once it runs, never left to kill us and orphan the command.
    child: list[subprocess.Popen[bytes]] = []
    pending: list[int] = []

    def forward(signum: int) -> None:
        if not child:
            pending.append(signum)
        elif signum == signal.SIGINT and in_terminal_foreground():
            pass  # the terminal's Ctrl-C reached the command too: once is enough
        elif child[0].poll() is None:
            child[0].send_signal(signum)

    _install_handlers(forward, _stop_signals())
    instance = start_instance(layout, services=list(dict.fromkeys(services)) or None)
    done = threading.Event()
    tripped: list[str] = []
    try:
        names = list(instance.leases)
        env = base_environment(instance.env(names[0] if len(names) == 1 else None))
        sockets = [(lease.fileno(), name) for name, lease in instance.leases.items()] if fds else []
        if not fds:
            for lease in instance.leases.values():
                lease.close_socket()  # the lock stays: no portpool user can take the port
        proc = spawn(command, env, sockets=sockets, watch_parent=True)
        child.append(proc)
        try:
            for signum in pending:
                forward(signum)
            instance.set_service_pids(dict.fromkeys(names, proc.pid))

            def on_lost(lease: object, reason: str) -> None:
                tripped.append(reason)
                stop_children({"command": proc})
                done.set()

            instance.start_shield(on_lost=on_lost, own_pids=lambda: [proc.pid])

            def wait_child() -> None:
                proc.wait()
                done.set()

            threading.Thread(target=wait_child, name="portpool-run-wait", daemon=True).start()
            while not done.wait(0.5):
                pass
            returncode = proc.wait()
        except BaseException:
            # Never leave the command running without the leases it was started with.
            stop_children({"command": proc})
            raise
    finally:
        instance.release()
    if tripped:
        click.echo(f"portpool: shield tripped: {tripped[0]}", err=True)
        sys.exit(ShieldTripped.exit_code)
    sys.exit(exit_status(returncode))


@cli.command()
@config_option
@click.option(
    "--grace",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds services get to stop after SIGTERM before SIGKILL.",
)
@handle_errors
def up(config: str | None, grace: float) -> None:
    """Start an instance with every service of the layout; hold it until Ctrl-C/SIGTERM."""
    from portpool.instance import start_instance
    from portpool.supervisor import Outcome, Supervisor, find_program

    layout = _layout(config)
    for service in layout.services:
        problem = service.command and find_program(service.command)
        if problem:
            raise LayoutError(layout.source, f"services.{service.name}.command", problem)
    instance = start_instance(layout)
    supervisor = Supervisor(instance, grace_s=grace)
    instance.on_release(supervisor.stop)
    try:
        _install_handlers(
            lambda signum: supervisor.finish(
                Outcome(0, f"stopping on {signal.Signals(signum).name}")
            ),
            [s for s in _stop_signals() if s != getattr(signal, "SIGHUP", None)],
        )
        if hasattr(signal, "SIGHUP"):  # a rolling restart on the same sockets
            _install_handlers(lambda _signum: supervisor.request_rolling_restart(), [signal.SIGHUP])
        supervisor.start()
        instance.start_shield(
            on_lost=lambda lease, reason: supervisor.finish(
                Outcome(4, f"shield tripped: {reason}")
            ),
            own_pids=supervisor.own_pids,
        )
        if supervisor.wait_ready():
            click.echo(f"portpool: instance {instance.number} of {layout.app} is up")
            click.echo(f"  {'service':<16} {'port':>5}  {'pid':>7}")
            pids = {name: k.pid for name, k in supervisor.keepers.items()}
            for name, lease in instance.leases.items():
                pid = pids.get(name)
                click.echo(f"  {name:<16} {lease.port:>5}  {pid if pid else '-':>7}")
            sys.stdout.flush()
        outcome = supervisor.wait()
    finally:
        instance.release()
    if outcome.message:
        click.echo(f"portpool: {outcome.message}", err=outcome.code != 0)
    click.echo(f"portpool: instance {instance.number} stopped; its ports are free")
    sys.exit(outcome.code)


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="portpool")
    except KeyboardInterrupt:  # Ctrl-C before our handlers were installed
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
