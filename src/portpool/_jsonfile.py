"""State-dir JSON files: replaced atomically, read without following or trusting them.

A file is replaced by writing a temporary file and renaming it over, so a reader sees
the old or the new text, never a torn one. A read never follows a symbolic link, never
blocks on a FIFO, refuses what is not a regular file or is over ``RECORD_MAX_BYTES``,
and turns every problem into a ValueError whose text completes "<file> ...". Also here:
the numbers in the state dir's file names (``decimal``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import threading
from typing import Any

# At the top, not where a record is first decoded: on a fresh state dir that was inside
# Instance.release(), and orjson (3.13) segfaults when a signal handler raises during
# its import, so a second Ctrl-C while stopping crashed the process. Every module that
# reads the state dir imports this one, so orjson is loaded before anything is held.
import orjson

from portpool._layout_load import file_kind
from portpool._platform import DirHandle
from portpool._text import printable
from portpool.errors import StateDirError
from portpool.statedir import out_of_descriptors, write_error

RECORD_MAX_BYTES = 1 << 20
TMP_SUFFIX = ".tmp"  # a temporary file is ".<name>.<pid>.<thread>.tmp" (gc reads the pid)


def write_atomic(directory: DirHandle, name: str, data: bytes) -> None:
    """Replace ``<dir>/<name>`` with ``data`` so readers see the old or the new, never torn."""
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
    try:
        fd = directory.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    except OSError as e:
        raise write_error(directory.path, f"cannot write {name}", e) from e
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        directory.rename(tmp, name)
    except BaseException as e:
        # Also for an exception a signal handler raised (a Ctrl-C): it left the file.
        with contextlib.suppress(OSError):
            directory.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(directory.path, f"cannot write {name}", e) from e
        raise


def not_a_record(path: str, kind: str) -> str:
    """Why ``kind`` ("a directory") at a record ``path`` keeps portpool's record out, in
    one text for every command (doctor gave the bare file name). Raises nothing."""
    return str(StateDirError(path, f"is {kind}, not a record portpool wrote (remove it)"))


def record_problem(why: object, directory: DirHandle, name: str) -> str:
    """``why`` a record cannot be used, naming the file: "record is not valid JSON
    (<dir>/<name>)". Without the path, users were told a record was unreadable and left
    to guess which of the state dir's files. Raises nothing."""
    return f"{why} ({printable(os.path.join(directory.path, name))})"


class NotAFile(ValueError):
    """A special file (symlink, FIFO, directory, ...) where a record belongs."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"is {kind}, not a record")
        self.kind = kind


def read_json_file(directory: DirHandle, name: str) -> Any:
    """The JSON in ``<dir>/<name>`` (None if absent). Raises ValueError if unreadable
    or ``null`` (which no record is), NotAFile (a ValueError) for a symlink, FIFO,
    directory, ... (never followed), ResourceLimit out of file descriptors."""
    try:
        fd = directory.open_file(name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        # O_NOFOLLOW fails a symlink with ELOOP, whose text ("Too many levels of symbolic
        # links") says nothing of what is there.
        if e.errno == errno.ELOOP:
            raise NotAFile("a symbolic link") from None
        if e.errno == errno.EISDIR:
            raise NotAFile("a directory") from None
        # Out of descriptors says nothing of the file: read as "unreadable", it made an
        # instance take its own record for one rewritten by another process.
        limit = out_of_descriptors(e)
        if limit is not None:
            raise limit from e
        raise ValueError(f"cannot be opened: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(file_kind(st.st_mode))
        # Ask for what the file holds (plus one byte to see it grow), not the maximum:
        # a 1 MiB buffer per read made listing 1,000 records twice as slow.
        data = os.read(fd, min(st.st_size, RECORD_MAX_BYTES) + 1)
    except OSError as e:
        raise ValueError(f"cannot be read: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if len(data) > RECORD_MAX_BYTES:
        raise ValueError(f"is larger than {RECORD_MAX_BYTES} bytes")
    try:
        doc = _decode(data)
    except (ValueError, RecursionError):  # a 5,000-digit number: Python's own advice
        raise ValueError("is not valid JSON") from None
    if doc is None:  # `null` read as "absent": a live slot's was "starting", not unknown
        raise ValueError("is null, not a record")
    return doc


def _decode(data: bytes) -> Any:
    """The document in ``data``, as ``json.loads`` reads it. Raises ValueError or
    RecursionError for what is not JSON.

    orjson first: decoding was the largest single part of ``status`` over 1,000 records
    (47 against 15 us a record; ``python -m benchmarks --quick --only bench_instance``).
    What orjson refuses and the json module reads (a lone surrogate, as a checkout path
    that is not UTF-8 is written; NaN; a byte order mark) is read by the json module,
    so every file reads as before. The one value orjson reads differently is an integer
    beyond 64 bits, as the float nearest it: a reader keeps integers only within bounds
    and reads a time as a float either way, so the result is the same (a message
    quoting a refused value may show 1e+20 where the json module's gave the integer).
    Nesting between the json module's depth limit and orjson's 1,024 now reads.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def decimal(text: str, max_digits: int = 6) -> int | None:
    """``text`` as a number if it is 1..``max_digits`` ASCII digits without a leading
    zero, else None. ``str.isdigit`` also accepts "²" and "٣", which ``int`` then
    refuses or reads as another number: a file named ``².json`` crashed every command."""
    if not (0 < len(text) <= max_digits and text.isascii() and text.isdigit()):
        return None
    if text[0] == "0" and len(text) > 1:
        return None  # "07.json" is not the file of slot 7: leave it alone
    return int(text)
