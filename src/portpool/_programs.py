"""Whether a command can be started, and if not why, in a shell's words: the layout's
``command`` of each service (``up`` checks them all before anything starts, ``layout``
warns of them) and ``run``'s command.

Only ``os``, ``shutil`` and ``stat``: ``portpool layout`` uses it, and the read-only commands
load no process or network code (tests/test_imports.py).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING

from portpool._layout_fields import layout_error
from portpool._layout_load import file_kind, working_directory
from portpool.errors import CommandNotFound, UsageError

if TYPE_CHECKING:
    from portpool.layout import Layout

__all__ = ["check_commands", "command_warnings", "find_program", "unexecutable"]


def check_commands(layout: Layout, cwd: str | None = None) -> None:
    """Raise LayoutError (file, ``services.<name>.command``, why; one line for every
    service whose command cannot be executed, as for the layout's other errors) per
    ``command_problems``. ``up`` and ``up --detach`` call it before anything starts: the
    detached ``up`` once found it only in the background, and its caller got "exited
    with status 1" and a log to read."""
    problems = command_problems(layout, cwd)
    if problems:
        raise layout_error(layout.source, problems)


def command_problems(layout: Layout, cwd: str | None = None) -> list[tuple[str, str]]:
    """(``services.<name>.command``, why) for every service whose command cannot be
    executed now, per ``find_program``, a relative path from ``cwd`` (default the
    current directory); [] when all can. Raises nothing."""
    path = None
    if cwd is not None:
        # The services run in ``cwd``: a relative PATH entry ("bin", "") names a
        # directory there, not here (a command found there was refused here).
        entries = os.environ.get("PATH", os.defpath).split(os.pathsep)
        path = os.pathsep.join(os.path.join(cwd, entry) for entry in entries)
    problems = []
    for service in layout.services:
        if not service.command:
            continue
        command = list(service.command)
        if cwd is not None and os.sep in command[0] and not os.path.isabs(command[0]):
            command[0] = os.path.join(cwd, command[0])
        problem = find_program(command, path)
        if problem:
            problems.append((f"services.{service.name}.command", problem))
    return problems


def command_warnings(layout: Layout) -> list[str]:
    """``FILE: services.S.command: why`` lines for ``portpool layout``: the commands
    ``up`` would refuse here and now (``run`` ignores them, so not an error of the
    layout). ``layout`` said nothing of them, and ``up`` then failed. Raises nothing."""
    return [
        f"{layout.source}: {key}: {problem}; up does not start the layout while it is so"
        for key, problem in command_problems(layout)
    ]


def find_program(command: Sequence[str], path: str | None = None) -> str | None:
    """None if ``command[0]`` can be executed, else why not (checked before anything
    starts, so a typo in a layout is an error, not a service that dies at once).
    ``path``: the PATH to search (default: ours)."""
    refused = unexecutable(command, path)
    return None if refused is None else refused.problem


def unexecutable(command: Sequence[str], path: str | None = None) -> CommandNotFound | None:
    """None if ``command[0]`` can be executed, else the CommandNotFound to raise: its
    ``exit_code`` a shell's, 127 for a program (or ``#!`` interpreter) that does not
    exist, 126 for one that exists but cannot be executed (``run`` exited 127 for a
    script without execute permission, where every shell says 126).
    ``path``: the PATH to search (default: ours)."""
    if not command:
        return CommandNotFound("", "the command is empty")
    program = command[0]
    if os.sep in program or (os.altsep and os.altsep in program):
        # A directory passes os.access(X_OK): it then failed only once started, after
        # the other services had started (exit 5, not a layout error).
        if os.path.isfile(program) and os.access(program, os.X_OK):
            return _interpreter_problem(program, path)
        where = "" if os.path.isabs(program) else f" (relative to {_working_directory()})"
        why, exists = _stat_words(program)
        problem = f"{program!r} is not an executable file{where}{why}{_not_found_hint(program)}"
        return CommandNotFound(program, problem, found=exists)
    found, special = _search_path(program, path)
    if found:
        return _interpreter_problem(found, path)
    if special:
        # An executable FIFO passes which(): reading its "#!" waited for a writer, and
        # `layout` hung. The kernel refuses to execute it (EACCES: 126).
        return CommandNotFound(
            program, f"{program!r} on PATH is {special!r}, not a regular file", found=True
        )
    # A file on PATH without execute permission exists: a shell and env say "Permission
    # denied" and 126; it read "not found on PATH" (127), hiding a missing chmod +x.
    there = shutil.which(program, mode=os.F_OK, path=path)
    if there:
        return CommandNotFound(
            program, f"{program!r} on PATH is {there!r}, not executable", found=True
        )
    return CommandNotFound(program, f"{program!r} was not found on PATH{_not_found_hint(program)}")


def _search_path(program: str, path: str | None) -> tuple[str | None, str | None]:
    """The first executable regular file named ``program`` on ``path`` (default: our
    PATH), and the first executable entry there that is no regular file (a FIFO): exec
    goes past such an entry (EACCES) to the next, so one early on PATH hid a program
    that runs. Raises nothing."""
    entries = (os.environ.get("PATH", os.defpath) if path is None else path).split(os.pathsep)
    special = None
    for entry in entries:
        found = shutil.which(program, path=entry or os.curdir)  # "" is the working directory
        if found and os.path.isfile(found):
            return found, special
        special = special or found
    return None, special


def _working_directory() -> str:
    """The working directory, in words when it was removed: ``layout`` and ``up``
    ended in a FileNotFoundError traceback there. Raises nothing."""
    try:
        return working_directory()
    except UsageError:
        return "the working directory, which was removed"


def _stat_words(program: str) -> tuple[str, bool]:
    """Why a path that is no executable file is not, and whether it counts as found
    (126) or not (127): absent, a dangling symlink, or a path through a file ("Not a
    directory": 127 as sh says; bash says 126), not found."""
    try:
        st = os.stat(program)
    except FileNotFoundError:
        return ": it does not exist", False
    except NotADirectoryError:
        return ": a part of its path is not a directory", False
    except OSError as e:
        return f": {e.strerror or e}", True
    if not stat.S_ISREG(st.st_mode):  # a FIFO (or a link to one) was refused unexplained
        return f": it is {file_kind(st.st_mode)}", True
    return "", True


def _interpreter_problem(path: str, search: str | None = None) -> CommandNotFound | None:
    """Why the ``#!`` interpreter of the script at ``path`` cannot run, or None (not a
    script, unreadable, or fine). A missing interpreter failed only once started ("No
    such file or directory" for a file that exists), after other services had started."""
    if os.name == "nt":
        return None  # no #! there
    try:
        with open(path, "rb") as f:
            first = f.read(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    line = first[2:].split(b"\n", 1)[0].decode(errors="replace")
    # As the kernel reads it: split at spaces and tabs only (a CR stays in its word).
    words = [w for w in line.replace("\t", " ").split(" ") if w]
    if not words:
        return None
    env = os.path.basename(words[0].rstrip("\r")) == "env" and len(words) > 1
    crlf = _carriage_return_problem(path, words, env, search)
    if crlf:
        return CommandNotFound(path, crlf)  # the kernel: no such file (127)
    interpreter = words[0]
    if not os.path.isabs(interpreter):
        return None
    if not (os.path.isfile(interpreter) and os.access(interpreter, os.X_OK)):
        problem = f"{path!r} starts with '#!{interpreter}', which is not an executable file"
        # Missing: the kernel says ENOENT (127); there but not executable: EACCES (126).
        return CommandNotFound(path, problem, found=os.path.exists(interpreter))
    program = words[1] if env else ""
    if (
        program
        and program[0] != "-"
        and "=" not in program
        and not shutil.which(program, path=search)
    ):
        return CommandNotFound(
            path, f"{path!r} runs {program!r} through env ('#!'), not found on PATH"
        )
    return None


def _carriage_return_problem(
    path: str, words: Sequence[str], env: bool, search: str | None = None
) -> str | None:
    """Why the ``#!`` line of ``path`` (its ``words`` as the kernel splits them; ``env``:
    it runs ``words[1]`` through env) fails for a carriage return, or None. A file with
    CRLF line endings names '/bin/sh\\r' (or has env look for 'python3\\r'): it passed
    the check and failed only once started, after the other services."""
    word = words[1] if env else words[0]
    if not word.endswith("\r") or (
        shutil.which(word, path=search) if env else os.path.exists(word)
    ):
        return None  # (a file by that very name would run)
    named = f"has env look for {word!r}" if env else f"names the interpreter {word!r}"
    return (
        f"{path!r} has CRLF line endings: its '#!' line {named}, which does not exist; "
        "convert the file to LF line endings (dos2unix)"
    )


# Shell builtins people put in a command ("cd", "export", "source"): no file runs them.
# fmt: off
_SHELL_BUILTINS = frozenset((
    "alias", "bg", "cd", "command", "exec", "export", "fg", "jobs", "read", "set", "shift",
    "source", "trap", "ulimit", "umask", "unset", "wait", ".", ":",
))
# fmt: on


def _not_found_hint(program: str) -> str:
    """Why a program that cannot be found is likely written wrong, for the message."""
    if program.startswith("~") or "$" in program:
        return (
            "; no shell expands '~' or '$VAR' in a command: write the path out, or use "
            f"['sh', '-c', 'exec {program} ...']"
        )
    if any(c.isspace() for c in program.strip()):
        return (
            "; the program and each argument are separate strings "
            f"({program.split()!r}), or use ['sh', '-c', {program!r}]"
        )
    if program in _SHELL_BUILTINS:
        return f"; {program!r} is a shell builtin: run it in a shell, ['sh', '-c', '{program} ...']"
    return ""
