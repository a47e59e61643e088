"""The ``portpool`` commands that act on a running instance from another terminal.

``port``, ``env``, ``stop`` and ``logs`` (registered on the ``portpool`` group by
``portpool.cli``), and what ``up --detach`` prints; the work
is the library's (``_find``, ``_stop``, ``_logs``, ``_detach``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import click

from portpool._cli_common import (
    JsonAwareCommand,
    check_seconds,
    config_option,
    display,
    echo_json,
    fail,
    handle_errors,
    instance_option,
    json_option,
    layout_for,
)

if TYPE_CHECKING:
    from portpool._stop import Stopped
    from portpool.layout import Layout

__all__ = ["COMMANDS", "up_detached"]


def up_detached(
    layout: Layout,
    grace: float,
    instance_number: int | None,
    quiet: bool,
    config: str | None = None,
) -> None:
    """Start ``layout``'s instance in the background (``up --detach``) and print where
    it is: its number, ports, log and how to stop it (with ``--config`` as ``config``
    was given: without it, run where printed, they read another layout).
    ``instance_number`` is checked by start_detached (UsageError)."""
    from portpool._detach import Detached, start_detached
    from portpool._relay import SignalScope
    from portpool._text import shell_word
    from portpool.statedir import StateDir

    gone: list[BrokenPipeError] = []

    def say_up(started: Detached) -> None:
        # Said with the stop signals held: one that comes before is for the background
        # up too (stopped), one that comes once it is said is for this command alone.
        for note in started.notes:  # its warnings (a skipped slot, ...) are for this terminal
            click.echo(display(note), err=True)
        click.echo(f"portpool: instance {started.number} of {layout.app} is up (pid {started.pid})")
        try:
            say_where(started)
        except BrokenPipeError as e:  # `| head -1` read "is up": that instance stays
            gone.append(e)

    def say_where(started: Detached) -> None:
        for name, port in started.ports.items():
            click.echo(f"  {name:<16} {port:>5}")
        where = f" --config {shell_word(config)}" if config is not None else ""
        if started.log_placed:
            shown = display(started.log)
            click.echo(f"logs: portpool logs --instance {started.number}{where}   ({shown})")
        else:  # `portpool logs` refuses what holds its place (the warning above says what)
            click.echo(f"logs: tail -f {display(shell_word(started.log))}")
        click.echo(f"stop: portpool stop {started.number}{where}")

    # A Ctrl-C while waiting for it to be up ended this process alone and left the
    # background up starting, unseen: the scope turns it into Interrupted, on which
    # start_detached stops what it started, and the command then dies of the signal.
    with StateDir.open() as state, SignalScope():
        start_detached(
            layout,
            state=state,
            number=instance_number,
            grace_s=grace,
            quiet=quiet,
            announce=say_up,
        )
    if gone:
        raise gone[0]  # dies of SIGPIPE, as a pipeline's writer


@click.command(cls=JsonAwareCommand)
@click.argument("service")
@instance_option
@config_option
@json_option
@handle_errors
def port(service: str, instance_number: int | None, config: str | None, as_json: bool) -> None:
    """Print the port SERVICE holds in a running instance (for `$(portpool port api)`)."""
    from portpool._find import service_port
    from portpool.statedir import StateDir

    layout = layout_for(config)
    with StateDir.open(create=False) as state:  # read-only: creates nothing
        info, number = service_port(layout, service, instance_number, state=state)
    if as_json:
        doc = {"app": layout.app, "instance": info.number, "service": service, "port": number}
        echo_json(doc)
    else:
        click.echo(number)


@click.command()
@instance_option
@config_option
@click.option("--export", is_flag=True, help="Print `export KEY=value` lines for `eval`.")
@handle_errors
def env(instance_number: int | None, config: str | None, export: bool) -> None:
    """A running instance's environment as KEY=value lines (a docker compose --env-file)."""
    from portpool._find import format_env, instance_env
    from portpool.statedir import StateDir

    layout = layout_for(config)
    with StateDir.open(create=False) as state:  # read-only: creates nothing
        click.echo(format_env(instance_env(layout, instance_number, state=state), export=export))


@click.command(cls=JsonAwareCommand)
@click.argument("number", type=int, required=False)  # range: check_number, as --instance
@click.option("--all", "every", is_flag=True, help="Stop every running instance of the app.")
@config_option
@click.option(
    "--timeout",
    type=float,  # check_seconds, below
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
    from portpool._stop import stop_instances
    from portpool.errors import StopFailed
    from portpool.statedir import StateDir

    if every and number is not None:
        raise click.UsageError("give an instance NUMBER or --all, not both")
    check_seconds("--timeout", timeout)
    layout = layout_for(config)
    done: list[Stopped] = []

    def stopped(s: Stopped) -> None:
        # Said as each goes down: `--all` that refuses one record stops the others first.
        done.append(s)
        if not as_json:
            click.echo(f"portpool: instance {s.number} of {layout.app} stopped (pid {s.pid})")

    with StateDir.open(create=False) as state:  # it only signals: creates nothing
        try:
            stop_instances(
                layout,
                number,
                every=every,
                timeout_s=timeout,
                state=state,
                given_as="NUMBER",
                on_stopped=stopped,
            )
        except StopFailed as e:
            if not as_json:
                raise
            # what was stopped, even none: a script reads one shape whenever stop refused
            fail(e, as_json=True, done={"app": layout.app, "stopped": _dicts(done)})
    if as_json:
        echo_json({"app": layout.app, "stopped": _dicts(done)})


def _dicts(stopped: list[Stopped]) -> list[dict[str, object]]:
    return [s.to_dict() for s in stopped]


@click.command()
@click.argument("service", required=False)
@instance_option
@config_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the instance stops.")
@handle_errors
def logs(
    service: str | None, instance_number: int | None, config: str | None, follow: bool
) -> None:
    """The output of a detached instance (`up --detach`), with `up`'s prefixes."""
    from portpool._logs import follow_log
    from portpool.statedir import StateDir

    layout = layout_for(config)
    with StateDir.open(create=False) as state:  # read-only: creates nothing
        follow_log(
            layout,
            # As the service wrote it and as up's console shows it: piped, click dropped
            # colour codes but kept other escapes, so neither raw nor escaped.
            functools.partial(click.echo, color=True),
            service=service,
            number=instance_number,
            follow=follow,
            state=state,
        )


COMMANDS = (port, env, stop, logs)
