"""The ``portpool`` command: a thin click layer over the library.

Every command calls the library, turns its errors into a clear message on stderr and
the contract's exit code: 0 ok; 1 error; 2 usage; 3 nothing started (no free slot or a
pool exhausted); 4 the shield tripped; 5 a service exited on its own.

Here: the group and the commands that start instances (run, up). The commands that
read the state dir and the layout (status, layout, doctor, gc) are in
``portpool._cli_inspect``; those that act on a running instance from another terminal,
in ``portpool._cli_control``; what every command shares, in ``portpool._cli_common``.
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
    drop_stdout,
    finish,
    from_echo,
    handle_errors,
    inherited_fds,
    instance_option,
    layout_for,
    occupy_closed_std_fds,
    reader_gone,
    refuse_unknown_option,
)
from portpool._cli_control import COMMANDS, up_detached
from portpool._cli_inspect import COMMANDS as INSPECT_COMMANDS
from portpool._cli_inspect import SILENT_COMMANDS

# The library loads in the commands that use it: `--help` and the read-only commands
# must not pay for sockets, threads and logging they never use (tests/test_imports.py).
if TYPE_CHECKING:
    from portpool.instance import Instance


@click.group(cls=JsonAwareGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="portpool")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Exclusive, predictable ports for every instance of a multi-service app."""
    if ctx.invoked_subcommand not in SILENT_COMMANDS:
        import logging

        logging.basicConfig(level=logging.WARNING, format="portpool: %(levelname)s: %(message)s")


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
    from portpool._detach import adopt_starting_log
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
        adopt_starting_log(instance)  # a detached up's, when its `up --detach` died
        _announce(instance, quiet)  # as soon as the ports are ours, before readiness

    def on_up(instance: Instance, pids: dict[str, int]) -> None:
        adopt_starting_log(instance)
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


# Reading state (status, layout, doctor, gc); from another terminal (port, env, stop, logs).
for _command in (*INSPECT_COMMANDS, *COMMANDS):
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
