"""The port record: who holds a port, as a fixed-size, checksummed file, and its codec.

A record is written in place with one ``pwrite`` (no truncate, no rename: each of those
costs ~200 us on ext4 and acquire is on the hot path). A reader that races a write can
see a torn record, so the record ends with a CRC32 of its text: a torn or damaged record
reads as "unreadable", and unreadable never means "free" — whether a port is held is
decided by the kernel lock alone. The file is one JSON object (its last member, ``crc``,
the checksum of the object's text without it) padded with spaces, so that ``json.load``
and ``jq`` read it as people expect of a ``.json`` file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import zlib
from typing import Any

from portpool._dataclass import dataclass
from portpool._platform import DirHandle, ProcessIdentity, read_at
from portpool._text import printable
from portpool.errors import LockError

RECORD_SIZE = 1024
# A released port's record, left for the next holder: an empty JSON object.
BLANK_RECORD = b"{}".ljust(RECORD_SIZE, b" ")
_READ_RETRIES = 3


@dataclass(frozen=True)
class PortRecord:
    """Who holds a port, as its metadata says."""

    port: int
    pid: int
    start_token: str
    boot_id: str
    app: str
    instance: int
    service: str
    host: str
    acquired_at: float
    heartbeat_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": 1,
            "port": self.port,
            "pid": self.pid,
            "start_token": self.start_token,
            "boot_id": self.boot_id,
            "app": self.app,
            "instance": self.instance,
            "service": self.service,
            "host": self.host,
            "acquired_at": self.acquired_at,
            "heartbeat_at": self.heartbeat_at,
        }

    @property
    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(self.pid, self.start_token, self.boot_id)

    def describe(self) -> str:
        """Who holds the port, in plain words, also for a lease taken with ``acquire()``
        outside an instance (it read "instance 0 of  (pid 12, service )")."""
        # Its labels are whoever wrote the record's text: a newline in one split the
        # `run` warning that names the holder into two lines, BEL and bidi went raw.
        name, label = printable(self.app), printable(self.service)
        service = f", service {label}" if label else ""
        if self.instance > 0 and name:
            return f"instance {self.instance} of {name} (pid {self.pid}{service})"
        app = f" of app {name}" if name else ""
        return f"pid {self.pid}{app}, outside any instance{service}"


_INT_FIELDS = ("port", "pid", "instance")
_STR_FIELDS = ("start_token", "boot_id", "app", "service", "host")
_FLOAT_FIELDS = ("acquired_at", "heartbeat_at")
# Seconds since 1970 of the year 2286: a time of day in a record lies in 0..this.
LAST_WALL_CLOCK = 1e10
_MAX_STR = 256


# The last member of a record's object: `,"crc":"<8 hex digits>"}`.
_CRC_HEAD = b',"crc":"'
_CRC_TAIL_LEN = len(_CRC_HEAD) + 8 + 2


def encode_record(record: PortRecord) -> bytes:
    """The fixed-size bytes of ``record``: its compact JSON object, whose last member
    ``crc`` is the CRC32 of the object's text without that member, a newline, then
    space padding.

    Raises LockError if a text field is over 256 characters (``decode_record`` would
    refuse it: never write a record we cannot read back) or the record does not fit
    its fixed size. Plain ``json.dumps``: a hand-written encoder with a cache saved
    about 6 us a lease, under 2% of an instance's start (benchmarks/bench_instance).
    """
    for name in _STR_FIELDS:
        if len(getattr(record, name)) > _MAX_STR:
            raise LockError(f"port {record.port}: record field {name!r} is over {_MAX_STR} chars")
    text = json.dumps(record.to_dict(), separators=(",", ":")).encode("ascii")
    body = text[:-1] + _CRC_HEAD + b'%08x"}\n' % zlib.crc32(text)
    if len(body) > RECORD_SIZE:
        raise LockError(f"port {record.port}: metadata record too large ({len(body)} bytes)")
    return body.ljust(RECORD_SIZE, b" ")


def decode_record(data: bytes) -> PortRecord | None:
    """Parse a record. None for a blank (released) record: ``{}``, or only spaces.

    Raises ValueError for anything torn, damaged or hostile; never anything else.
    """
    if len(data) > RECORD_SIZE:
        raise ValueError("record larger than its fixed size")
    stripped = data.rstrip(b" \n\0")
    if stripped in (b"", b"{}"):
        return None
    tail = stripped[-_CRC_TAIL_LEN:]
    if tail.startswith(_CRC_HEAD) and tail.endswith(b'"}'):
        text, crc_hex = stripped[:-_CRC_TAIL_LEN] + b"}", tail[len(_CRC_HEAD) : -2]
    else:  # as written before the record was one JSON object: a line, then "#<crc>"
        text, sep, crc_hex = stripped.rpartition(b"\n#")
        if not sep or len(crc_hex) != 8:
            if b'"crc"' in stripped:  # reformatted (spaces, order): not "has no checksum"
                raise ValueError("record was rewritten: its checksum is not as portpool writes it")
            raise ValueError("record has no checksum")
    try:
        crc = int(crc_hex, 16)
    except ValueError:
        raise ValueError("record checksum is not hex") from None
    if zlib.crc32(text) != crc:
        raise ValueError("record checksum mismatch (torn or damaged)")
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError("record is not JSON") from None
    if not isinstance(raw, dict) or raw.get("v") != 1:
        raise ValueError("record is not a version-1 object")
    values: dict[str, Any] = {}
    for name in _INT_FIELDS:
        v = raw.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**31:
            raise ValueError(f"record field {name!r} is not a valid integer")
        values[name] = v
    for name in _STR_FIELDS:
        v = raw.get(name)
        if not isinstance(v, str) or len(v) > _MAX_STR:
            raise ValueError(f"record field {name!r} is not a string")
        values[name] = v
    for name in _FLOAT_FIELDS:
        v = raw.get(name)
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise ValueError(f"record field {name!r} is not a number")
        try:
            number = float(v)  # an int too large for a float raises OverflowError
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"record field {name!r} is not a finite number")
        if not 0 <= number <= LAST_WALL_CLOCK:
            raise ValueError(f"record field {name!r} is no time of day ({number:.6g})")
        values[name] = number
    return PortRecord(**values)


def read_record_fd(fd: int) -> PortRecord | None:
    """Read a record, retrying a torn read a few times. Raises ValueError if unreadable."""
    error = ValueError("record could not be read")
    for _ in range(_READ_RETRIES):
        try:
            data = read_at(fd, RECORD_SIZE + 1, 0)
        except InterruptedError:
            continue
        except OSError as e:
            raise ValueError(f"record read failed: {e.strerror}") from e
        try:
            return decode_record(data)
        except ValueError as e:
            error = e
    raise error


def read_port_record(directory: DirHandle, port: int) -> PortRecord | None:
    """The record of ``port`` (None if blank or absent). Raises ValueError if unreadable."""
    try:
        fd = directory.open_file(f"{port}.json", os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW's answer; its text names no symlink
            raise ValueError("record is a symbolic link, not a record") from None
        raise ValueError(f"record cannot be opened: {e.strerror or e}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("record is not a regular file")
        return read_record_fd(fd)
    finally:
        os.close(fd)
