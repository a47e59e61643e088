"""What every ``portpool`` command shares: safe text, errors to exit codes, common options.

Only click and the standard library at import: the library loads in the commands that
use it (tests/test_imports.py).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from portpool._text import printable

if TYPE_CHECKING:
    from portpool._outcome import Outcome
    from portpool.errors import PortPoolError
    from portpool.layout import Layout

__all__ = [
    "F",
    "JsonAwareCommand",
    "JsonAwareGroup",
    "check_seconds",
    "config_option",
    "display",
    "drop_stdout",
    "echo_json",
    "echo_json_listing",
    "fail",
    "finish",
    "from_echo",
    "handle_errors",
    "instance_option",
    "json_option",
    "layout_for",
    "reader_gone",
]

F = TypeVar("F", bound=Callable[..., Any])


def display(text: str) -> str:
    """``text`` safe to print to a terminal: every control character, lone surrogate
    and bidi override shown as a Python escape (``\\x1b``), the rest unchanged.

    Text from the state dir is written by whoever shares our uid (or a bug): printed
    raw, an ANSI sequence reached the user's terminal.
    """
    return printable(text)


def drop_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered can never be written, and
    must not fail once more at exit. Raises nothing."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def from_echo(error: BaseException) -> bool:
    """Whether ``error`` was raised while printing (in ``click.echo`` or writing
    ``echo_json``'s output), not elsewhere (reading what ``echo_json_listing`` prints)."""
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code is _write_stdout.__code__ or (
            code.co_name == "echo" and code.co_filename == click.utils.__file__
        ):
            return True
        tb = tb.tb_next
    return False


def reader_gone(error: BrokenPipeError) -> NoReturn:
    """The reader of our stdout went away (``portpool logs -f | head``): die of SIGPIPE,
    quietly, as a pipeline's writer does (click exited 1). Raises ``error`` where the
    OS has no SIGPIPE."""
    from portpool._relay import die_of

    pipe = getattr(signal, "SIGPIPE", None)
    if pipe is None:
        raise error
    drop_stdout()
    die_of(pipe)


def fail(
    error: PortPoolError, *, as_json: bool = False, done: dict[str, Any] | None = None
) -> NoReturn:
    """Print ``error`` on stderr (and as one JSON object on stdout with ``as_json``, with
    ``done``'s members: what the command did before it failed) and exit with its code."""
    lines = str(error).split("\n")  # messages may span lines; each is escaped alone
    # stderr first: a JSON reader that is gone (SIGPIPE) must not take the message along
    click.echo(
        "\n".join(display(line) for line in [f"portpool: error: {lines[0]}", *lines[1:]]), err=True
    )
    if as_json:  # a script reading stdout gets the error as JSON too
        echo_json({**(done or {}), "error": str(error), "exit_code": error.exit_code})
    sys.exit(error.exit_code)


def _usage_as_json(error: click.ClickException) -> None:
    """Print click's ``error`` as JSON on stdout; with that reader gone, still show
    click's usage text on stderr (click shows it only once we return), then die of
    SIGPIPE."""
    try:
        echo_json({"error": error.format_message(), "exit_code": error.exit_code})
    except BrokenPipeError as gone:
        error.show()
        reader_gone(gone)


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
            fail(e, as_json=kwargs.get("as_json") is True)
        except OSError as e:  # out of descriptors where nothing expected it (an import)
            from portpool.statedir import out_of_descriptors

            limit = out_of_descriptors(e)
            if limit is None:
                raise
            fail(limit, as_json=kwargs.get("as_json") is True)
        except click.ClickException as e:  # a usage error found by the command itself
            if kwargs.get("as_json") is True:
                _usage_as_json(e)
            raise

    return wrapper  # type: ignore[return-value]


class JsonAwareCommand(click.Command):
    """A command whose command line click cannot parse (an unknown option, a missing
    value) still prints that error as one JSON object on stdout when ``--json`` was
    given, as its own errors do: a script reading stdout got nothing for a typo."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        words = args[: args.index("--")] if "--" in args else list(args)
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            # --json=yes is --json too: the flag refuses the value, and says so as JSON.
            asked = any(w == "--json" or w.startswith("--json=") for w in words)
            if asked and any(p.name == "as_json" for p in self.params):
                _usage_as_json(e)
            raise


class JsonAwareGroup(click.Group):
    """The ``portpool`` group: its commands are ``JsonAwareCommand``s, and whatever it
    prints (``--help``, ``--version``, an error's JSON) dies of SIGPIPE when the reader
    is gone, as the commands' own output does: click exited 1 (``portpool --help | head -1``)."""

    command_class = JsonAwareCommand

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except BrokenPipeError as e:  # `portpool --help`, `portpool --version`
            if not from_echo(e):
                raise
            reader_gone(e)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:  # a command's --help, an error's JSON
            if not from_echo(e):
                raise
            reader_gone(e)


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
        # Range checked by the command against the layout (Layout.check_number), so that
        # --json reports 0 as it reports 99; click's IntRange printed usage text only.
        type=int,
        default=None,
        help="Instance number. Default: this checkout's instance, else the only running one "
        "(up/run: this checkout's last number if free, else the lowest free one).",
    )(func)


def _json_bytes(doc: object) -> bytes:
    """``doc`` as compact UTF-8 JSON. orjson, not the json module: encoding was a fifth
    of ``status --json`` over 1,000 records (benchmarks/bench_instance.py). A string
    orjson refuses (a lone surrogate, which a hostile record's ``"\\ud800"`` decodes to)
    falls back to the json module's escaped output, so nothing a record holds stops the
    command."""
    import orjson

    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:
        return json.dumps(doc, separators=(",", ":")).encode()


def echo_json(doc: object) -> None:
    """Print ``doc`` (dicts, lists, str, int, float, bool, None) as one line of compact
    UTF-8 JSON on stdout."""
    _write_stdout(_json_bytes(doc) + b"\n")


def echo_json_listing(head: dict[str, object], key: str, items: Iterable[object]) -> None:
    """Print ``{**head, key: [*items]}`` as ``echo_json`` does, ``key`` last (it must
    not be in ``head``), each item encoded as it comes: the caller need not hold them
    all at once (``status --json`` over 1,000 records of 50 services held 50,000 entries
    together, and growing the heap for them was about a fifth of its CPU). Nothing is
    printed before the last item is encoded: an error on the way prints only the error,
    and is not one of writing stdout (``from_echo``)."""
    assert key not in head  # it must come last, after what head holds
    opening = _json_bytes({**head, key: []})  # ...,"key":[]}: the items go between
    parts = [opening[:-2]]
    for n, item in enumerate(items):
        if n:
            parts.append(b",")
        parts.append(_json_bytes(item))
    parts.append(b"]}\n")
    _write_stdout(b"".join(parts))


def _write_stdout(data: bytes) -> None:
    """Write ``data`` to stdout whole, after what was printed before. Raises OSError
    (BrokenPipeError: the reader went away), which ``from_echo`` knows as its own."""
    # Written whole, never cut short in silence: a reader that goes away in the middle
    # of one large write makes the OS report a short write, not an error, and
    # click.echo ignored the count (exit 0 with the output cut). The next write fails
    # (EPIPE), so the command fails as for text output.
    sys.stdout.flush()  # what was printed before comes first
    out = sys.stdout.buffer
    view = memoryview(data)
    while view:
        written = out.write(view)
        if not written:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
        view = view[written:]
    out.flush()


def json_option(func: F) -> F:
    """``--json`` (as ``as_json``); with it, ``handle_errors`` also prints an error as
    ``{"error": message, "exit_code": n}`` on stdout, so a script always gets JSON."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(func)


def layout_for(config: str | None) -> Layout:
    """The layout ``--config`` names (see ``portpool.layout.resolve_layout``)."""
    from portpool.layout import resolve_layout

    return resolve_layout(config)


def finish(outcome: Outcome, instance_line: str | None, message: str | None = None) -> None:
    """Print how it ended (``message``, what still holds a port, ``instance_line``),
    then exit with the outcome's code or die of its signal.

    Dying of a signal, the printing is best effort: after a terminal's hangup every
    write to it fails (EIO), and `up` exited 1 saying so instead of dying of SIGHUP.
    """
    from portpool._relay import die_of

    try:
        if message:
            click.echo(f"portpool: {message}", err=outcome.code != 0 and outcome.signum is None)
        for line in outcome.lingering:
            click.echo(f"portpool: {line}", err=True)
        if instance_line is not None and not outcome.lingering:
            click.echo(instance_line)
    except OSError:
        if outcome.signum is None:
            raise
    if outcome.signum is not None:
        die_of(outcome.signum)
    sys.exit(outcome.code)


def check_seconds(option: str, value: float) -> float:
    """``value`` if it is 0 or more seconds, else click.UsageError naming ``option``.
    Checked in the command, not by a click range type: the range's error printed no
    JSON for ``--json``."""
    if not value >= 0:  # also NaN
        raise click.UsageError(f"{option} must be 0 or more seconds, not {value}")
    return value


class CommandAfterOptions(click.Command):
    """A command whose arguments are a program and its arguments. It remembers how many
    words follow the first ``--``: click drops the ``--``, and a program named ``-x``
    given after it must not be taken for an unknown option (``refuse_unknown_option``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            ctx.meta["portpool.after_dashdash"] = len(args) - args.index("--") - 1
        return super().parse_args(ctx, args)


def refuse_unknown_option(command: tuple[str, ...]) -> None:
    """Raise click.UsageError if ``command`` starts with an option the command does not
    know (``run -x``) rather than a program given after ``--`` (``run -- -x``)."""
    # The program came right after -- when the words after it are exactly the command
    # (an unknown option before --, "-x -- prog", keeps the -- in the command).
    after_dashdash = click.get_current_context().meta.get("portpool.after_dashdash")
    if command[0].startswith("-") and len(command) != after_dashdash:
        raise click.UsageError(
            f"no such option: {command[0]} (the command goes after its options, or after --)"
        )


def occupy_closed_std_fds() -> bool:
    """Open /dev/null on each of fds 0-2 that is closed; True if stdout was.

    With fd 1 closed (``portpool status >&-``) the state dir was opened as fd 1, the
    output went nowhere and the command exited 0; a command's child would inherit it
    as its stdout."""
    stdout_closed = False
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)  # inheritable, as a standard fd must be
                os.close(null)
            else:
                os.set_inheritable(fd, True)  # os.open makes fds close-on-exec
            stdout_closed = stdout_closed or fd == 1
    return stdout_closed


def inherited_fds() -> list[int]:
    """The file descriptors above 2 open in this process, sorted: called before ``run``
    opens anything, what it was started with (a shell's ``<(...)`` or ``5>file``, make's
    jobserver), for its command to get as after ``exec``. [] where fds are not listed."""
    if sys.platform == "win32":
        return []
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(listing)
        except OSError:
            continue
        fds = []
        for name in names:
            if name.isdigit() and int(name) > 2:
                try:
                    os.fstat(int(name))
                except OSError:
                    continue  # the listing's own fd, closed by now
                fds.append(int(name))
        return sorted(fds)
    return []
