"""The ``portpool`` command: a thin click layer over the library.

Every command calls the library, turns its errors into a clear message on stderr and
the contract's exit code: 0 ok; 1 error; 2 usage; 3 nothing started (no free slot or a
pool exhausted); 4 the shield tripped; 5 a service exited on its own.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

# The library loads in the commands that use it: `--help` and the read-only commands
# must not pay for sockets, threads and logging they never use (tests/test_imports.py).
if TYPE_CHECKING:
    from portpool.errors import PortPoolError
    from portpool.instance import Instance
    from portpool.layout import Layout
    from portpool.records import ServiceInfo
    from portpool.supervisor import Outcome

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


def _fail(error: PortPoolError, *, as_json: bool = False) -> None:
    if as_json:  # a script reading stdout gets the error as JSON too
        click.echo(json.dumps({"error": str(error), "exit_code": error.exit_code}))
    lines = str(error).split("\n")  # messages may span lines; each is escaped alone
    click.echo(
        "\n".join(display(line) for line in [f"portpool: error: {lines[0]}", *lines[1:]]), err=True
    )
    sys.exit(error.exit_code)


def handle_errors(func: F) -> F:
    """Turn library errors into one message and the contract's exit code; for a command
    called with ``--json`` (an ``as_json`` flag, see ``json_option``), also into one JSON
    object on stdout."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from portpool.errors import PortPoolError

        try:
            return func(*args, **kwargs)
        except PortPoolError as e:
            _fail(e, as_json=kwargs.get("as_json") is True)
        except click.ClickException as e:  # a usage error found by the command itself
            if kwargs.get("as_json") is True:
                click.echo(json.dumps({"error": e.format_message(), "exit_code": e.exit_code}))
            raise

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
    """``--json`` (as ``as_json``); with it, ``handle_errors`` also prints an error as
    ``{"error": message, "exit_code": n}`` on stdout, so a script always gets JSON."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(func)


def _layout(config: str | None) -> Layout:
    from portpool.layout import resolve_layout

    return resolve_layout(config)


# Commands that log nothing (no threads, no instance): they skip importing logging.
_SILENT_COMMANDS = frozenset({"status", "layout", "gc"})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
                services = "  ".join(_service_text(s) for s in info.services)
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
    from portpool.layout import describe_layout, host_is_literal_remote

    if as_json:
        from portpool.control import layout_document

        click.echo(json.dumps(layout_document(_layout(config))))
        return
    layout = _layout(config)
    warning = None
    if host_is_literal_remote(layout.host):  # only then a socket is needed to tell
        from portpool._addresses import host_warning

        warning = host_warning(layout.host)
    for line in describe_layout(layout, warning):
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
        doc = report.to_dict(show_free=show_all)
        click.echo(json.dumps(doc, separators=(",", ":")))
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


def _announce(instance: Instance, quiet: bool) -> None:
    """On stderr, so the command's stdout stays clean: one line per service that did not
    get its pool's first port and why (always), then the instance and its ports."""
    for lease in instance.leases.values():
        note = lease.skip_note()
        if note:
            click.echo(f"portpool: {note}", err=True)
    _report_plain_bind(instance)
    if not quiet:
        ports = " ".join(f"{name}={port}" for name, port in instance.ports.items())
        click.echo(f"portpool: instance {instance.number} of {instance.app}: {ports}", err=True)


def _report_plain_bind(instance: Instance) -> None:
    """One line per port handed over by number that a plain bind cannot take yet."""
    from portpool.diagnosis import handed_over, plain_bind_notes

    for note in plain_bind_notes(handed_over(instance.layout, instance.leases.values())):
        click.echo(f"portpool: {note}", err=True)


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
    from portpool.supervisor import run_command

    outcome = run_command(
        _layout(config),
        command,
        services=list(dict.fromkeys(services)),
        fds=fds,
        number=instance_number,
        announce=lambda instance: _announce(instance, quiet),
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
@instance_option
@click.option("--detach", "-d", is_flag=True, help="Start in the background; return once up.")
@quiet_option
@handle_errors
@_interrupted
def up(
    *, config: str | None, grace: float, instance_number: int | None, detach: bool, quiet: bool
) -> None:
    """Start an instance with every service of the layout; hold it until Ctrl-C/SIGTERM."""
    from portpool.supervisor import run_up

    layout = _layout(config)
    if detach:
        _up_detached(layout, config, grace, instance_number)
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

    outcome = run_up(layout, grace_s=grace, number=instance_number, on_up=on_up, announce=announce)
    if outcome.message:
        click.echo(f"portpool: {outcome.message}", err=outcome.code != 0 and outcome.signum is None)
    stopped = f"portpool: instance {numbers[0]} stopped; its ports are free" if numbers else None
    _finish(outcome, stopped)


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
    for note in started.notes:  # its warnings (a skipped slot, ...) are for this terminal too
        click.echo(display(note), err=True)
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
    with StateDir.open(create=False) as state:  # read-only: creates nothing
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
    with StateDir.open(create=False) as state:  # read-only: creates nothing
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
    with StateDir.open(create=False) as state:  # it only signals: creates nothing
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
    with StateDir.open(create=False) as state:  # read-only: creates nothing
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
    """Console-script entry point.

    Ctrl-C ends a command at once by SIGINT's default action, quietly, as for any Unix
    tool that holds nothing (click would print "Aborted!" and exit 1, which a calling
    shell takes for an error); ``run`` and ``up`` take the signals over while they hold
    an instance.
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored by the caller: kept
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        cli(prog_name="portpool")
    except KeyboardInterrupt:  # Ctrl-C before run/up took over the signals
        from portpool._relay import die_of

        die_of(signal.SIGINT)
    except OSError as e:
        if not _from_echo(e):
            raise
        _output_failed(e)


if __name__ == "__main__":
    main()
