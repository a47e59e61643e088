"""Reading a layout file: the file's kind and size, its text, and TOML syntax errors.

Turns a path into the TOML document ``portpool.layout.parse_layout`` validates, or a
``LayoutFileError`` (the file cannot be used at all) / ``LayoutError`` (line and column,
or the key set twice) naming the file. Which file to read (``--config``, then
``./portpool.toml``) is decided here too.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Sequence
from typing import Any

from portpool.errors import LayoutError, LayoutFileError, UsageError

# Patterns, not compiled objects: only a file with a TOML error needs them, and compiling
# them on every import cost every command 2 M instructions (re caches them on use).
_AT = r"\s*\(at (line (\d+), column (\d+)|end of document)\)\s*$"
_DECLARED_TWICE = r"Cannot declare \(((?:'(?:[^'\\]|\\.)*',? ?)+)\) twice"
_HEADER = r"^\s*\[\[?\s*([^\]]*?)\s*\]\]?\s*(#.*)?$"
_KEY_LINE = r"^\s*([^=#\[]+?)\s*="


def _dotted(raw: str) -> list[str]:
    return [p.strip().strip("\"'") for p in raw.split(".")]


def _duplicate_key(text: str, message: str, line: int | None) -> list[str] | None:
    """The dotted key a TOML "declared twice" / "cannot overwrite" / "cannot mutate"
    error is about, if it can be told; tomllib only gives the position."""
    m = re.search(_DECLARED_TWICE, message)
    if m:
        return re.findall(r"'((?:[^'\\]|\\.)*)'", m.group(1))
    if line is None or not ("Cannot overwrite a value" in message or "immutable" in message):
        return None
    lines = text.splitlines()
    if not 1 <= line <= len(lines):
        return None
    own = re.match(_HEADER, lines[line - 1])
    if own:  # a [table] or [[array]] header: its own key ("[[services.b]]")
        return _dotted(own.group(1))
    km = re.match(_KEY_LINE, lines[line - 1])
    if not km:
        return None
    header: list[str] = []
    for previous in reversed(lines[: line - 1]):
        hm = re.match(_HEADER, previous)
        if hm:
            header = _dotted(hm.group(1))
            break
    return header + _dotted(km.group(1))


def _closed_parent(text: str, key: Sequence[str], line: int) -> str | None:
    """Why ``key``, which tomllib says is declared twice at ``line``, cannot be declared
    when the lines before it never declared it, or None (they did: a true duplicate, or
    this cannot be told). Such a key extends what an earlier key set as an inline table
    or a value, which TOML closes: it read "duplicate service name" for a service that
    appears once, after ``services = { a = {...} }``."""
    import tomllib

    try:
        node: object = tomllib.loads("\n".join(text.splitlines()[: line - 1]))
    except tomllib.TOMLDecodeError:
        return None
    for depth, part in enumerate(key):
        if not isinstance(node, dict) or part not in node:
            parent = ".".join(key[:depth])
            break
        node = node[part]
    else:
        if isinstance(node, dict) or not re.match(_HEADER, text.splitlines()[line - 1]):
            return None  # declared before: a true duplicate
        # A [table] header onto a value: "invalid TOML: Cannot overwrite a value".
        return f"is set to a value by an earlier line, so a [{'.'.join(key)}] table cannot follow"
    if not parent:
        return None
    if isinstance(node, dict):
        return (
            f"cannot be added to {parent}, which an earlier line wrote as an inline table "
            f"({{ ... }}), closed at its braces: move {key[depth]} into those braces, or "
            f"write {parent} as a [{parent}] table"
        )
    return f"cannot be added to {parent}, which an earlier line set to a value, not a table"


def _syntax_error(path: str, text: str, error: ValueError) -> LayoutError:
    message = str(error)
    m = re.search(_AT, message)
    line: int | None = None
    if m and m.group(2):
        line = int(m.group(2))
        where = f"line {line}, column {m.group(3)}"
    elif m:
        where = "end of document"
    else:
        where = "<document>"
    bare = message[: m.start()] if m else message
    key = _duplicate_key(text, bare, line)
    closed = _closed_parent(text, key, line) if key and line else None
    if key and closed:
        return LayoutError(path, ".".join(key), f"{closed} (at {where})")
    if key is not None and len(key) == 2 and key[0] == "services":
        return LayoutError(
            path, ".".join(key), f"duplicate service name (declared again at {where})"
        )
    if key:
        return LayoutError(path, ".".join(key), f"is set twice (again at {where})")
    return LayoutError(path, where, f"invalid TOML: {bare}")


LAYOUT_MAX_BYTES = 1 << 20  # a real layout is a few KiB; /dev/zero once read until MemoryError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(mode: int) -> str:
    """``a FIFO``, ``a symbolic link``, ... for an ``st_mode``: what a file is."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def working_directory() -> str:
    """``os.getcwd()``. Raises UsageError if the working directory was removed (a bare
    FileNotFoundError traceback before, from every command that needed it)."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        raise UsageError(
            "the current directory no longer exists (it was removed): cd to one that does"
        ) from None


def absolute_path(path: str) -> str:
    """``path`` joined to the working directory if relative (not resolved). Raises
    UsageError if it is relative and the working directory was removed."""
    return path if os.path.isabs(path) else os.path.join(working_directory(), path)


def _read_layout_file(path: str) -> bytes:
    """The bytes of the regular file at ``path``, at most ``LAYOUT_MAX_BYTES``.

    O_NONBLOCK: opening a FIFO must not wait for a writer (it hung forever). The kind
    is checked on the open file (fstat), so it cannot be swapped after the check.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        if os.path.islink(path):
            problem = "is a dangling symbolic link: its target does not exist"
            raise LayoutFileError(path, problem) from e
        absolute_path(path)  # a relative path in a removed directory: say that
        raise LayoutFileError(path, f"cannot be read: {e.strerror or e}") from e
    except OSError as e:
        # A socket cannot be opened at all ("No such device or address"): say what it is.
        with contextlib.suppress(OSError):
            _refuse_special(path, os.stat(path).st_mode)
        raise LayoutFileError(path, f"cannot be read: {e.strerror or e}") from e
    try:
        _refuse_special(path, os.fstat(fd).st_mode)
        chunks: list[bytes] = []
        size = 0
        while size <= LAYOUT_MAX_BYTES:
            chunk = os.read(fd, LAYOUT_MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise LayoutFileError(path, f"cannot be read: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if size > LAYOUT_MAX_BYTES:
        raise LayoutFileError(path, f"is larger than {LAYOUT_MAX_BYTES} bytes; not a layout")
    return b"".join(chunks)


def _refuse_special(path: str, mode: int) -> None:
    """Raise LayoutFileError naming the kind of file at ``path`` (of ``mode``) unless it
    is a regular file."""
    if not stat.S_ISREG(mode):
        kind = file_kind(mode)
        raise LayoutFileError(path, f"is {kind}, not a regular file; give a TOML file")


def _wide_text(raw: bytes) -> str | None:
    """What wide encoding ``raw`` is in ("is UTF-16 text (...)"), or None.

    Windows PowerShell's `>` writes UTF-16: "line 1: not UTF-8" said no more. Without a
    byte order mark, ASCII in UTF-16 is valid UTF-8 (every other byte NUL), which read
    as "line 1, column 2: invalid TOML: Expected '='"; UTF-32's mark was called UTF-16.
    """
    if raw.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "is UTF-32 text (it starts with a UTF-32 byte order mark)"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "is UTF-16 text (it starts with a UTF-16 byte order mark)"
    head = raw[:4096]
    if len(head) < 4 or b"\x00" not in head:
        return None  # TOML text never holds a NUL: a file with none is not wide
    for unit, name in ((4, "UTF-32"), (2, "UTF-16")):
        # ASCII text in it: in (nearly) every unit, all bytes but the low one are NUL.
        units = [head[i : i + unit] for i in range(0, len(head) - unit + 1, unit)]
        nul = b"\x00" * (unit - 1)
        little = sum(u[1:] == nul for u in units)
        big = sum(u[:-1] == nul for u in units)
        if max(little, big) * 10 >= len(units) * 9:
            return f"is {name} text (ASCII with NUL bytes between)"
    return None


def read_layout_document(path: str) -> dict[str, Any]:
    """The TOML document in the file at ``path`` (a regular file of at most
    ``LAYOUT_MAX_BYTES``; a leading UTF-8 byte order mark is accepted).

    Raises LayoutFileError (exit code 2) if the file cannot be used at all, LayoutError
    naming the file and the line and column (or the key set twice) of a syntax error.
    """
    raw = _read_layout_file(path)
    wide = _wide_text(raw)
    if wide is not None:
        raise LayoutError(path, "<document>", f"{wide}: save it as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)  # in bytes, 1-based
        raise LayoutError(path, f"line {line}, column {column}", "is not valid UTF-8 text") from e
    text = text.removeprefix("\ufeff")  # editors on Windows write a BOM; TOML tools skip it
    import tomllib  # only when a file is read: keeps `import portpool` light

    try:
        data = tomllib.loads(text)
    except RecursionError as e:
        raise LayoutError(path, "<document>", "invalid TOML: nested too deeply") from e
    except ValueError as e:  # TOMLDecodeError, and integers too long to convert
        raise _syntax_error(path, text, e) from e
    return data


def layout_path(config: str | None, cwd: str | None = None) -> str | None:
    """The layout file to read: ``config`` if given (relative to ``cwd``), else
    ``portpool.toml`` in ``cwd`` (default: the current directory) if there is anything
    by that name, else None (the built-in layout).

    Raises LayoutFileError for an empty ``config``, a ``cwd`` that is not a directory,
    or if ``portpool.toml`` cannot even be looked at; UsageError if the working
    directory was removed. One that exists but is unusable is read (and refused) by
    ``read_layout_document``.
    """
    base = cwd if cwd is not None else ""
    if config == "":  # `--config "$UNSET"`: the message named no file at all
        raise LayoutFileError("--config ''", "is empty: give the layout file's path")
    if config is not None:
        return os.path.join(base, config) if base else config
    local = os.path.join(base, "portpool.toml") if base else "portpool.toml"
    try:
        os.lstat(local)
    except FileNotFoundError:
        # In a removed directory there is no portpool.toml either: status and layout
        # showed the built-in app there, where run said the directory was gone.
        if cwd is None:
            working_directory()
        elif not os.path.isdir(cwd):
            raise LayoutFileError(cwd, "is not a directory: no portpool.toml to look for") from None
        return None
    except OSError as e:
        raise LayoutFileError(local, f"cannot be read: {e.strerror or e}") from e
    return local
