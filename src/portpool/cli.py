"""The ``portpool`` command: a thin click layer over the library.

Every command calls the library, turns its errors into a clear message on stderr and
the contract's exit code: 0 ok; 1 error; 2 usage; 3 nothing started (no free slot or a
pool exhausted); 4 the shield tripped; 5 a service exited on its own.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import click

from portpool.errors import LayoutError, PortPoolError, ShieldTripped
from portpool.layout import Layout, describe_layout, resolve_layout

if TYPE_CHECKING:
    import subprocess

    from portpool.instance import Instance
    from portpool.pool import Lease

F = TypeVar("F", bound=Callable[..., Any])


# C0/C1 controls (ANSI escapes start with ESC), lone surrogates (unencodable: status
# crashed on one), bidi controls (they reorder what the user reads), and the Unicode
# line and paragraph separators (they start a new line in some terminals and tools).
_UNSAFE_TEXT = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c\u2028\u2029]"
)


def display(text: str) -> str:
    """``text`` safe to print to a terminal: every control character, lone surrogate
    and bidi override shown as a Python escape (``\\x1b``), the rest unchanged.

    Text from the state dir is written by whoever shares our uid (or a bug): printed
    raw, an ANSI sequence reached the user's terminal.
    """
    return _UNSAFE_TEXT.sub(lambda m: ascii(m.group())[1:-1], text)


def _fail(error: PortPoolError) -> None:
    lines = str(error).split("\n")  # messages may span lines; each is escaped alone
    click.echo(
        "\n".join(display(line) for line in [f"portpool: error: {lines[0]}", *lines[1:]]), err=True
    )
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


def instance_option(func: F) -> F:
    return click.option(
        "--instance",
        "-i",
        "instance_number",
        type=click.IntRange(min=1),
        default=None,
        help="Instance number. Default: this checkout's instance, else the only running one "
        "(up/run: this checkout's last number if free, else the lowest free one).",
    )(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(func)


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


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def status(config: str | None, as_json: bool) -> None:
    """Every instance of the app: number, pid, alive, heartbeat age, services and ports."""
    from portpool.records import list_instances
    from portpool.statedir import StateDir

    layout = _layout(config)
    with StateDir.open(create=False) as state:  # read-only: creates nothing
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
        click.echo(f"app {layout.app} (state dir {display(state.path)})")
        if not infos:
            click.echo("no instances")
            return
        click.echo(f"{'#':>3}  {'pid':>7}  {'alive':<5}  {'heartbeat':<11}  services")
        for info in infos:
            pid = str(info.pid) if info.pid is not None else "-"
            alive = "yes" if info.alive else "no"
            if info.readable:
                services = "  ".join(f"{s.name}={s.port}" for s in info.services)
            else:
                services = info.problem or "record unreadable"
            if info.directory:
                services += f"  (dir {info.directory})"
            services = display(services)  # record text: whoever shares our uid wrote it
            click.echo(
                f"{info.number:>3}  {pid:>7}  {alive:<5}  {_age(info.heartbeat_age_s):<11}  "
                f"{services}"
            )


@cli.command("layout")
@config_option
@json_option
@handle_errors
def layout_command(config: str | None, as_json: bool) -> None:
    """The pools of every admissible instance, then warnings (errors fail with exit 1)."""
    if as_json:
        from portpool.control import layout_document

        click.echo(json.dumps(layout_document(_layout(config))))
        return
    for line in describe_layout(_layout(config)):
        click.echo(line)


@cli.command()
@click.argument("service", required=False)
@config_option
@click.option("--all", "show_all", is_flag=True, help="List free ports too.")
@json_option
@handle_errors
def doctor(service: str | None, config: str | None, show_all: bool, as_json: bool) -> None:
    """What blocks which pool port (of SERVICE, or all), naming foreign holders where the
    OS says; free ports are only counted unless --all. Kills nothing."""
    from portpool.diagnosis import examine_layout

    layout = _layout(config)
    report = examine_layout(layout, service=service)
    if as_json:
        click.echo(json.dumps(report.to_dict(), separators=(",", ":")))
        return
    click.echo(f"app {layout.app}: {layout.max_instances} instances, host {layout.host}")
    number = 0
    for verdict in report.verdicts:
        if verdict.refusal is None and not show_all:
            continue
        if verdict.instance != number:
            number = verdict.instance
            click.echo(f"instance {number}:")
        # record text from the state dir: escaped for the terminal
        click.echo(f"  {verdict.service:<16} {verdict.port:>5}  {display(verdict.describe())}")
    counts = report.counts()
    other = sum(n for kind, n in counts.items() if kind not in ("free", "held", "foreign"))
    click.echo(
        f"{counts['free']} free, {counts['held']} held by portpool, "
        f"{counts['foreign']} used by foreign processes"
        + (f", {other} refused" if other else "")
        + ("" if show_all or not counts["free"] else " (--all lists the free ones)")
    )
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
    from portpool.records import gc as run_gc

    if config is not None:
        _layout(config)
    report = run_gc()
    if as_json:
        click.echo(json.dumps(report.to_dict(), separators=(",", ":")))
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
    for problem in report.problems:
        click.echo(f"portpool: error: gc skipped {display(problem)}", err=True)
    if report.problems:
        sys.exit(1)


# ---------------------------------------------------------------- run / up


def _report_skips(leases: Iterable[Lease]) -> None:
    """One line per service that did not get its pool's first port, and why."""
    for lease in leases:
        note = lease.skip_note()
        if note:
            click.echo(f"portpool: {note}", err=True)


def _report_plain_bind(instance: Instance) -> None:
    """One line per port handed over by number that a plain bind cannot take yet."""
    from portpool.diagnosis import handed_over, plain_bind_notes

    for note in plain_bind_notes(handed_over(instance.layout, instance.leases.values())):
        click.echo(f"portpool: {note}", err=True)


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
@instance_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
def run(
    config: str | None,
    services: tuple[str, ...],
    fds: bool,
    instance_number: int | None,
    command: tuple[str, ...],
) -> None:
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
    instance = start_instance(
        layout, services=list(dict.fromkeys(services)) or None, number=instance_number
    )
    _report_skips(instance.leases.values())
    done = threading.Event()
    tripped: list[str] = []
    try:
        names = list(instance.leases)
        env = base_environment(instance.env(names[0] if len(names) == 1 else None))
        sockets = [(lease.fileno(), name) for name, lease in instance.leases.items()] if fds else []
        if not fds:
            for lease in instance.leases.values():
                lease.close_socket()  # the lock stays: no portpool user can take the port
        _report_plain_bind(instance)
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
@instance_option
@click.option("--detach", "-d", is_flag=True, help="Start in the background; return once up.")
@handle_errors
def up(config: str | None, grace: float, instance_number: int | None, detach: bool) -> None:
    """Start an instance with every service of the layout; hold it until Ctrl-C/SIGTERM."""
    from portpool.instance import start_instance
    from portpool.supervisor import Outcome, Supervisor, find_program

    layout = _layout(config)
    if detach:
        return _up_detached(layout, config, grace, instance_number)
    for service in layout.services:
        problem = service.command and find_program(service.command)
        if problem:
            raise LayoutError(layout.source, f"services.{service.name}.command", problem)
    instance = start_instance(layout, number=instance_number)
    _report_skips(instance.leases.values())
    _report_plain_bind(instance)
    supervisor = Supervisor(instance, grace_s=grace)
    instance.on_release(supervisor.stop)
    try:
        _install_handlers(
            lambda signum: supervisor.finish(
                Outcome(0, f"stopping on {signal.Signals(signum).name}")
            ),
            _stop_signals(),
        )
        pids = supervisor.start()
        instance.start_shield(
            on_lost=lambda lease, reason: supervisor.finish(
                Outcome(4, f"shield tripped: {reason}")
            ),
            own_pids=supervisor.own_pids,
        )
        click.echo(f"portpool: instance {instance.number} of {layout.app} is up")
        click.echo(f"  {'service':<16} {'port':>5}  {'pid':>7}")
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


# ---------------------------------------------------------------- from another terminal


def _up_detached(
    layout: Layout, config: str | None, grace: float, instance_number: int | None
) -> None:
    from portpool.control import check_number, start_detached
    from portpool.statedir import StateDir

    check_number(layout, instance_number)
    args = ["--grace", repr(grace)]
    if config is not None:
        args += ["--config", config]
    if instance_number is not None:
        args += ["--instance", str(instance_number)]
    with StateDir.open() as state:
        started = start_detached(layout, args, state=state)
    click.echo(f"portpool: instance {started.number} of {layout.app} is up (pid {started.pid})")
    for name, port in started.ports.items():
        click.echo(f"  {name:<16} {port:>5}")
    click.echo(f"logs: portpool logs --instance {started.number}   ({started.log})")
    click.echo(f"stop: portpool stop {started.number}")


@cli.command()
@click.argument("service")
@instance_option
@config_option
@json_option
@handle_errors
def port(service: str, instance_number: int | None, config: str | None, as_json: bool) -> None:
    """Print the port SERVICE holds in a running instance (for `$(portpool port api)`)."""
    from portpool.control import check_number, service_port
    from portpool.statedir import StateDir

    layout = _layout(config)
    check_number(layout, instance_number)
    with StateDir.open() as state:
        info, number = service_port(layout, service, instance_number, state=state)
    if as_json:
        doc = {"app": layout.app, "instance": info.number, "service": service, "port": number}
        click.echo(json.dumps(doc))
    else:
        click.echo(number)


@cli.command()
@instance_option
@config_option
@click.option("--export", is_flag=True, help="Print `export KEY=value` lines for `eval`.")
@handle_errors
def env(instance_number: int | None, config: str | None, export: bool) -> None:
    """A running instance's environment as KEY=value lines (a docker compose --env-file)."""
    from portpool.control import check_number, format_env, instance_env
    from portpool.statedir import StateDir

    layout = _layout(config)
    check_number(layout, instance_number)
    with StateDir.open() as state:
        click.echo(format_env(instance_env(layout, instance_number, state=state), export=export))


@cli.command()
@click.argument("number", type=click.IntRange(min=1), required=False)
@click.option("--all", "every", is_flag=True, help="Stop every running instance of the app.")
@config_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to wait for its ports to be free.",
)
@json_option
@handle_errors
def stop(
    number: int | None, every: bool, config: str | None, timeout: float, as_json: bool
) -> None:
    """Stop instance NUMBER (default: this checkout's, else the only running one).

    SIGTERM goes only to the process holding the instance's slot lock whose identity
    matches its record; then waits until its ports are free. Exit 1 if it does not run.
    """
    from portpool.control import check_number, stop_instances
    from portpool.statedir import StateDir

    if every and number is not None:
        raise click.UsageError("give an instance NUMBER or --all, not both")
    layout = _layout(config)
    check_number(layout, number)
    with StateDir.open() as state:
        stopped = stop_instances(layout, number, every=every, timeout_s=timeout, state=state)
    if as_json:
        click.echo(json.dumps({"app": layout.app, "stopped": [s.to_dict() for s in stopped]}))
        return
    for s in stopped:
        click.echo(f"portpool: instance {s.number} of {layout.app} stopped (pid {s.pid})")


@cli.command()
@click.argument("service", required=False)
@instance_option
@config_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the instance stops.")
@handle_errors
def logs(
    service: str | None, instance_number: int | None, config: str | None, follow: bool
) -> None:
    """The output of a detached instance (`up --detach`), with `up`'s prefixes."""
    from portpool.control import check_number, follow_log
    from portpool.statedir import StateDir

    layout = _layout(config)
    check_number(layout, instance_number)
    with StateDir.open() as state:
        follow_log(
            layout,
            click.echo,
            service=service,
            number=instance_number,
            follow=follow,
            state=state,
        )


def _output_failed(error: OSError) -> None:
    """A stdout that is closed or full (``status > /dev/full``): one line, exit 1."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"portpool: error: cannot write to standard output: {error.strerror}\n")
        sys.stderr.flush()
    # What is still buffered can never be written: drop it instead of failing at exit.
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    sys.exit(1)


def _from_echo(error: BaseException) -> bool:
    """Whether ``error`` was raised while printing (in ``click.echo``), not elsewhere."""
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "echo" and code.co_filename == click.utils.__file__:
            return True
        tb = tb.tb_next
    return False


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="portpool")
    except KeyboardInterrupt:  # Ctrl-C before our handlers were installed
        sys.exit(128 + signal.SIGINT)
    except OSError as e:
        if not _from_echo(e):
            raise
        _output_failed(e)


if __name__ == "__main__":
    main()
