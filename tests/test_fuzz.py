"""Fuzzing every reader of the state dir and the layout file with hypothesis.

Whatever bytes or JSON a port record, an instance record or a layout file holds, its
reader answers or raises its one documented error — never a crash, never an exception
outside the ``PortPoolError`` tree — and a port whose lock is really held (by another
process) never reads as "free", whatever its metadata says.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import unicodedata
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tests.helpers import hold_port_lock, portpool, write_layout

from portpool import _jsonfile
from portpool._cli_common import echo_json, echo_json_listing, from_echo
from portpool._jsonfile import read_json_file
from portpool._portstatus import inspect_port
from portpool._record import RECORD_SIZE, PortRecord, decode_record, encode_record, read_port_record
from portpool.cli import cli
from portpool.errors import LayoutError, PortPoolError
from portpool.layout import load_layout, name_problem, parse_layout
from portpool.records import list_instances, read_instance
from portpool.statedir import StateDir

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# JSON values of every shape, including the numbers that break naive float handling:
# integers too large for a float, and the non-standard NaN/Infinity json.loads accepts.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)


def nested(
    leaf: st.SearchStrategy[Any], *, size: int, key_size: int, leaves: int
) -> st.SearchStrategy[Any]:
    """``leaf`` values, and lists and string-keyed dicts of them (``size`` items at most,
    keys of ``key_size`` characters), nested up to ``leaves`` leaves."""
    return st.recursive(
        leaf,
        lambda inner: (
            st.lists(inner, max_size=size)
            | st.dictionaries(st.text(max_size=key_size), inner, max_size=size)
        ),
        max_leaves=leaves,
    )


json_values = nested(scalars, size=6, key_size=12, leaves=25)


def _with_crc(text: bytes) -> bytes:
    """A port record body with a correct checksum, so the parser gets past the CRC."""
    return (text + b"\n#%08x\n" % zlib.crc32(text)).ljust(RECORD_SIZE, b" ")[: RECORD_SIZE + 1]


def _valid_record(port: int = 40000) -> PortRecord:
    return PortRecord(port, 4242, "tok", "boot", "app", 1, "svc", "127.0.0.1", 1.0, 2.0)


PORT_FIELDS = {
    "v": st.just(1) | json_values,
    "port": st.integers(-5, 70000) | json_values,
    "pid": st.integers(-5, 2**32) | json_values,
    "instance": st.integers(-1, 2000) | json_values,
    "start_token": st.text(max_size=300) | json_values,
    "boot_id": st.text(max_size=20) | json_values,
    "app": st.text(max_size=20) | json_values,
    "service": st.text(max_size=20) | json_values,
    "host": st.text(max_size=20) | json_values,
    "acquired_at": st.floats() | st.integers(min_value=10**300, max_value=10**400) | json_values,
    "heartbeat_at": st.floats() | st.integers(min_value=10**300, max_value=10**400) | json_values,
}
port_like = st.fixed_dictionaries({}, optional=PORT_FIELDS)


def _dump(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# ---------------------------------------------------------------- port records


@FUZZ
@given(st.binary(max_size=RECORD_SIZE + 8))
def test_decode_record_random_bytes(data: bytes) -> None:
    try:
        result = decode_record(data)
    except ValueError:
        return
    assert result is None or isinstance(result, PortRecord)


@FUZZ
@given(st.integers(0, RECORD_SIZE - 1), st.binary(min_size=1, max_size=16))
def test_decode_record_damaged_valid_record(offset: int, junk: bytes) -> None:
    data = bytearray(encode_record(_valid_record()))
    data[offset : offset + len(junk)] = junk
    try:
        result = decode_record(bytes(data[: RECORD_SIZE + 1]))
    except ValueError:
        return
    assert result is None or isinstance(result, PortRecord)


@FUZZ
@given(json_values | port_like)
@example({**_valid_record().to_dict(), "acquired_at": 10**400})
@example({**_valid_record().to_dict(), "pid": 10**400})
def test_decode_record_random_json_with_good_checksum(value: Any) -> None:
    try:
        result = decode_record(_with_crc(_dump(value)))
    except ValueError:
        return
    assert result is None or isinstance(result, PortRecord)


@pytest.fixture
def held_port(home: Path, state: StateDir) -> Any:
    """A port whose lock is held by another process (a child that flocks it and waits)."""
    port = 40123
    child = hold_port_lock(port)
    yield port
    assert child.stdin is not None
    child.stdin.close()
    child.wait(timeout=30)


def test_read_port_record_and_inspect_port_never_free_while_held(
    state: StateDir, held_port: int
) -> None:
    path = Path(state.path) / "ports" / f"{held_port}.json"

    @FUZZ
    @given(
        st.binary(max_size=RECORD_SIZE + 64)
        | (json_values | port_like).map(lambda v: _with_crc(_dump(v)))
    )
    @example(b"")
    @example(b"\0" * RECORD_SIZE)
    @example(b"x" * (1 << 16))
    @example(_with_crc(_dump({**_valid_record(held_port).to_dict(), "pid": 1})))
    @example(_with_crc(_dump({**_valid_record(held_port).to_dict(), "heartbeat_at": 10**400})))
    def check(data: bytes) -> None:
        path.write_bytes(data)  # a hostile writer: replaces whatever the holder wrote
        try:
            record = read_port_record(state.ports(), held_port)
        except ValueError:
            record = None
        assert record is None or isinstance(record, PortRecord)
        seen = inspect_port(state, held_port)
        assert seen.state != "free", seen
        assert not seen.is_free
        assert isinstance(seen.describe(), str)

    check()


# ---------------------------------------------------------------- instance records

SERVICE_ITEM = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=70) | json_values,
        "pool": st.lists(st.integers(-3, 70000), max_size=4) | json_values,
        "port": st.integers(-3, 70000) | json_values,
        "pid": st.integers(-3, 2**32) | json_values,
    },
)
instance_like = st.fixed_dictionaries(
    {},
    optional={
        "v": st.just(1) | json_values,
        "pid": st.integers(-3, 2**32) | json_values,
        "start_token": st.text(max_size=20) | json_values,
        "started_at": st.floats() | st.integers(min_value=10**300, max_value=10**400) | json_values,
        "heartbeat_at": st.floats() | st.integers(min_value=10**300, max_value=10**400),
        "services": st.lists(SERVICE_ITEM | json_values, max_size=4) | json_values,
    },
)
instance_bytes = (
    st.binary(max_size=2048)
    | (json_values | instance_like).map(_dump)
    | st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth)
)
GOOD_INSTANCE = {
    "v": 1,
    "pid": 4242,
    "start_token": "t",
    "started_at": 1.0,
    "heartbeat_at": 2.0,
    "services": [{"name": "alpha", "pool": [1, 2], "port": 1, "pid": 4242}],
}


def test_instance_record_readers_never_crash(state: StateDir) -> None:
    directory = state.instances("fuzzapp")
    path = Path(directory.path)

    @FUZZ
    @given(st.lists(instance_bytes, min_size=1, max_size=3))
    @example([_dump({**GOOD_INSTANCE, "started_at": 10**400})])
    @example([_dump({**GOOD_INSTANCE, "heartbeat_at": float("nan")})])
    @example([b"[" * 100_000])
    def check(records: list[bytes]) -> None:
        for number, data in enumerate(records, start=1):
            (path / f"{number}.json").write_bytes(data)
            with contextlib.suppress(ValueError):
                read_json_file(directory, f"{number}.json")
            info = read_instance(directory, number)
            assert info.number == number
            json.dumps(info.to_dict(), allow_nan=False)  # what status --json prints
        infos = list_instances("fuzzapp", state)
        assert {i.number for i in infos} <= set(range(1, len(records) + 1))
        for name in os.listdir(path):
            os.unlink(path / name)

    check()


# Supervised entries' fields and the encodings only the json module reads, so that the
# comparison below meets every branch: state, restarts, refusals, a BOM, UTF-16, NaN.
SUPERVISED_ITEM = st.fixed_dictionaries(
    {"name": st.sampled_from(["alpha", "beta"]), "pool": st.just([1, 2]), "port": st.just(1)},
    optional={
        "pid": st.integers(-(2**65), 2**65),
        "state": st.sampled_from(["ready", "exited", "x"]) | json_values,
        "restarts": st.integers(-(2**65), 2**65) | st.integers(10**300, 10**400),
        "planned_restarts": st.integers(-(2**65), 2**65),
        "last_exit_status": st.integers(-(2**65), 2**65),
        "started_at": st.floats() | st.integers(-(2**70), 2**70),
        "refusals": st.lists(
            st.fixed_dictionaries(
                {"port": st.integers(-(2**65), 2**65), "reason": st.text(), "detail": st.text()}
            ),
            max_size=2,
        )
        | json_values,
    },
)
supervised_record = st.builds(
    lambda extra, services: {**GOOD_INSTANCE, **extra, "services": services},
    st.fixed_dictionaries(
        {},
        optional={
            "pid": st.integers(-(2**65), 2**65),
            "dir": st.text(max_size=8),  # surrogates: written escaped, as os.fsdecode gives
            "started_at": st.integers(-(2**70), 2**70) | st.floats(),
        },
    ),
    st.lists(SUPERVISED_ITEM, max_size=3),
)


def _encodings(doc: object) -> st.SearchStrategy[bytes]:
    text = json.dumps(doc)
    return st.sampled_from(
        [
            text.encode(),
            json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass"),
            b"\xef\xbb\xbf" + text.encode(),
            text.encode("utf-16"),
        ]
    )


def test_every_record_reads_as_the_json_module_reads_it(state: StateDir) -> None:
    """Records are decoded with orjson, the json module taking what orjson refuses: the
    instance each record makes must be the one the json module alone makes."""
    directory = state.instances("fuzzapp")
    path = Path(directory.path)

    @FUZZ
    @given(
        (instance_bytes | (supervised_record | instance_like).flatmap(_encodings)),
    )
    @example(_dump({**GOOD_INSTANCE, "dir": "/src/\udcff"}))
    @example(_dump({**GOOD_INSTANCE, "pid": 2**64 + 4242}))
    @example(_dump({**GOOD_INSTANCE, "services": [{**SERVICE_ONE, "restarts": 2**64}]}))
    @example(_dump({**GOOD_INSTANCE, "services": [{**SERVICE_ONE, "restarts": -(2**63) - 1}]}))
    @example(b"\xef\xbb\xbf" + _dump(GOOD_INSTANCE))
    @example(_dump({**GOOD_INSTANCE, "services": [{**SERVICE_ONE, "started_at": 10**20}]}))
    @example(_dump({**GOOD_INSTANCE, "services": [{**SERVICE_ONE, "ready_at": -(2**63) - 1}]}))
    def check(data: bytes) -> None:
        (path / "1.json").write_bytes(data)
        ours = read_instance(directory, 1)
        documents = []
        for decode in (json.loads, _jsonfile._decode):
            try:
                documents.append(decode(data))
            except (ValueError, RecursionError):
                documents.append(ValueError)
        expected_doc, doc = documents
        if len(data) < 2048 and not _has_int_beyond_64_bits(expected_doc):  # not 3,000 deep
            assert repr(doc) == repr(expected_doc)  # repr: NaN != NaN; also float vs int
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_jsonfile, "_decode", json.loads)  # the reference: the json module
            reference = read_instance(directory, 1)
        assert ours.to_dict() | {"heartbeat_age_s": 0} == reference.to_dict() | {
            "heartbeat_age_s": 0
        }
        os.unlink(path / "1.json")

    check()


SERVICE_ONE = {"name": "alpha", "pool": [1, 2], "port": 1, "pid": 4242, "state": "ready"}


def _has_int_beyond_64_bits(value: object) -> bool:
    """Whether ``value`` holds an integer orjson reads as a float (no reader accepts one)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif type(item) is int and not -(2**63) <= item < 2**64:
            return True
    return False


def test_status_json_survives_hostile_records(home: Path, state: StateDir, tmp_path: Path) -> None:
    config = write_layout(tmp_path / "l.toml", 40200, app="fuzzapp")
    path = Path(state.instances("fuzzapp").path)
    runner = CliRunner()

    @settings(FUZZ, max_examples=60)
    @given(st.lists(instance_bytes, min_size=1, max_size=4))
    @example([_dump({**GOOD_INSTANCE, "started_at": 10**400}), b"\xff\xfe", b"{}"])
    def check(records: list[bytes]) -> None:
        for number, data in enumerate(records, start=1):
            (path / f"{number}.json").write_bytes(data)
        result = runner.invoke(cli, ["status", "--json", "--config", str(config)])
        assert result.exit_code == 0, (result.output, result.exception)
        doc = json.loads(result.output)
        assert doc["app"] == "fuzzapp"
        for inst in doc["instances"]:
            assert inst["alive"] is False
            # An age since 1970 at most: -1e300 was read as a time, its age 301 digits.
            assert inst["heartbeat_age_s"] is None or 0 <= inst["heartbeat_age_s"] <= time.time()
        for name in os.listdir(path):
            os.unlink(path / name)

    check()


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("heartbeat_at", -1e300, "-1e+300"),
        ("started_at", -1, "-1"),
        ("heartbeat_at", 1e11, "1e+11"),
    ],
)
def test_a_record_time_that_is_no_time_of_day_makes_the_record_unreadable(
    home: Path, state: StateDir, tmp_path: Path, key: str, value: float, shown: str
) -> None:
    config = write_layout(tmp_path / "l.toml", 40200, app="fuzzapp")
    path = Path(state.instances("fuzzapp").path)
    (path / "1.json").write_bytes(_dump({**GOOD_INSTANCE, key: value}))
    why = (
        f"record unreadable: record has no valid {key} ({shown} is no time of day) "
        f"({path / '1.json'})"
    )
    (inst,) = json.loads(portpool("status", "--json", "--config", str(config)).stdout)["instances"]
    assert (inst["readable"], inst["problem"]) == (False, why), inst
    text = portpool("status", "--config", str(config))
    assert text.returncode == 0 and why in text.stdout, text.stdout


# ---------------------------------------------------------------- JSON output

finite_values = nested(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["\ud800", "a\udcff", "\x1b[31m"]),  # what orjson refuses to write
    size=4,
    key_size=6,
    leaves=12,
)


@FUZZ
@given(st.dictionaries(st.text(max_size=6), finite_values, max_size=3), st.lists(finite_values))
def test_a_document_printed_item_by_item_is_the_whole_document(
    capfdbinary: pytest.CaptureFixture[bytes], head: dict[str, Any], items: list[Any]
) -> None:
    head.pop("items", None)
    echo_json({**head, "items": items})
    whole = capfdbinary.readouterr().out
    echo_json_listing(head, "items", iter(items))
    listed = capfdbinary.readouterr().out
    assert listed.endswith(b"\n")
    assert listed.count(b"\n") == 1  # one line
    listed.decode("utf-8")  # strict: no raw surrogate
    assert json.loads(listed) == json.loads(whole) == {**head, "items": items}
    assert list(json.loads(listed)) == [*head, "items"]  # the list comes last


def test_a_document_printed_item_by_item_is_printed_whole_or_not_at_all(
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    def items() -> Iterator[dict[str, int]]:
        yield {"number": 1}
        raise OSError("the second slot cannot be examined")

    with pytest.raises(OSError, match="second slot") as raised:
        echo_json_listing({"app": "a"}, "instances", items())
    assert capfdbinary.readouterr().out == b""
    # Not an error of writing stdout: the command reports it (as JSON with --json).
    assert not from_echo(raised.value)


# ---------------------------------------------------------------- layout files

toml_keys = st.sampled_from(
    ["app", "host", "heartbeat_interval", "shield_interval", "max_instances", "x"]
)
service_keys = st.sampled_from(["base", "size", "stride", "command", "socket", "y"])
toml_scalars = (
    st.integers(-(2**70), 2**70)
    | st.integers(0, 70000)
    | st.floats()
    | st.booleans()
    | st.text(max_size=12)
)
toml_values = nested(toml_scalars, size=4, key_size=8, leaves=12)
layout_like = st.fixed_dictionaries(
    {},
    optional={
        "app": st.text(max_size=12) | toml_values,
        "host": st.sampled_from(["127.0.0.1", "::1", "localhost", "", "999.1.1.1"]) | toml_values,
        "heartbeat_interval": toml_scalars,
        "shield_interval": toml_scalars,
        "max_instances": toml_scalars,
        "services": st.dictionaries(
            st.text(max_size=10),
            st.dictionaries(service_keys, toml_values, max_size=6) | toml_values,
            max_size=4,
        )
        | toml_values,
    },
) | st.dictionaries(toml_keys, toml_values, max_size=6)


def _toml_value(value: object) -> str:
    """``value`` as a TOML inline value (a small emitter: the fuzzer's own, not the parser's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(value)


def _toml_document(doc: dict[str, Any]) -> str:
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in doc.items()]
    return "\n".join(lines) + "\n"


@FUZZ
@given(layout_like)
@example({"app": "a", "heartbeat_interval": 10**400, "services": {"s": {"base": 1, "size": 1}}})
@example({"app": "a", "services": {"s": {"base": 10**30, "size": 10**30, "stride": 10**30}}})
def test_parse_layout_random_structures(data: dict[str, Any]) -> None:
    try:
        parse_layout(data, "fuzz.toml")
    except LayoutError as e:
        problem = str(e)
    else:
        return
    assert "fuzz.toml" in problem


@FUZZ
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
@example(b"app = 'a'\nheartbeat_interval = 99999999999999999999999\n[services.s]\nbase=1\nsize=1\n")
@example(b"a = " + b"[" * 5000)
def test_load_layout_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "layout.toml"
    path.write_bytes(data)
    _expect_layout_error_or_layout(path)


@FUZZ
@given(layout_like)
def test_load_layout_random_toml_documents(tmp_path: Path, data: dict[str, Any]) -> None:
    path = tmp_path / "layout.toml"
    path.write_text(_toml_document(data), encoding="utf-8")
    _expect_layout_error_or_layout(path)


def _expect_layout_error_or_layout(path: Path) -> None:
    """``load_layout`` gives a Layout, or a LayoutError naming the file: nothing else."""
    try:
        load_layout(str(path))
    except LayoutError as e:
        problem = str(e)
    except PortPoolError as e:
        pytest.fail(f"load_layout raised {type(e).__name__}, not LayoutError: {e}")
    else:
        return
    assert str(path) in problem


# ---------------------------------------------------------------- file names in the state dir

# Names a careless user or another program may leave: Unicode digits ("²", "٣"),
# leading zeros, separators portpool splits on, control characters, the longest names.
unicode_digits = st.characters(categories=["Nd", "No"]).filter(lambda c: not c.isascii())
name_stems = (
    st.text(unicode_digits, min_size=1, max_size=4)
    | st.text(st.sampled_from("0123456789"), min_size=1, max_size=30)
    | st.text(st.characters(blacklist_characters="/\0"), min_size=1, max_size=20)
    | st.integers(1, 254).map(lambda n: "9" * n)
)
file_names = st.builds(
    lambda stem, ext: (stem + ext)[:255],
    name_stems,
    st.sampled_from([".json", ".lock", ".json.", ".lock.lock", "", ".tmp", ".1.2.tmp"]),
).filter(lambda n: n not in (".", "..") and len(n.encode("utf-8", "surrogatepass")) <= 255)


def _clear(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            entry.rmdir()
        else:
            entry.unlink()


def test_state_dir_file_names_never_crash_a_reader_or_gc(
    home: Path, state: StateDir, tmp_path: Path
) -> None:
    from portpool._gc import gc as run_gc

    config = write_layout(tmp_path / "l.toml", 40300, app="fuzzapp")
    instances = Path(state.instances("fuzzapp").path)
    ports = Path(state.ports().path)
    runner = CliRunner()

    @settings(FUZZ, max_examples=60)
    @given(st.lists(file_names, min_size=1, max_size=5, unique=True))
    @example(["².json", "³.lock", "٣.json", "07.json", "1.json."])
    def check(names: list[str]) -> None:
        for name in names:
            try:
                (instances / name).write_text("{}")
                (ports / name).write_text("{}")
            except (OSError, UnicodeEncodeError):
                continue  # a name this file system refuses cannot be planted either
        list_instances("fuzzapp", state)
        report = run_gc(state)
        assert report.problems == []
        for args in (["status"], ["status", "--json"], ["doctor"]):
            result = runner.invoke(cli, [*args, "--config", str(config)])
            assert result.exit_code == 0, (args, result.output, result.exception)
        _clear(instances)
        _clear(ports)

    check()


# ---------------------------------------------------------------- special files everywhere

SPECIAL_KINDS = ["fifo", "directory", "symlink", "dangling symlink", "device symlink", "device"]


def _plant(path: Path, kind: str, target: Path) -> bool:
    """A special file of ``kind`` at ``path``; False where this host cannot make one."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir(mode=0o700)
    elif kind == "symlink":
        path.symlink_to(target)
    elif kind == "dangling symlink":
        path.symlink_to(target.parent / "gone")
    elif kind == "device symlink":
        path.symlink_to("/dev/zero")
    else:
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # like /dev/zero
        except PermissionError:
            return False
    return True


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and device nodes are POSIX")
def test_special_files_in_every_place_portpool_reads(home: Path, tmp_path: Path) -> None:
    """Layout file, port and instance locks and records, the state dir's subdirectories:
    a FIFO never hangs a reader, a device is never read, nothing crashes."""
    from portpool._gc import gc as run_gc

    base = 40400
    config = write_layout(tmp_path / "l.toml", base, app="fuzzapp")
    target = tmp_path / "target.json"
    target.write_text("{}")
    home.mkdir(mode=0o700)
    runner = CliRunner()

    @settings(FUZZ, max_examples=40)
    @given(
        st.sampled_from(SPECIAL_KINDS),
        st.sampled_from(
            [
                "ports/{port}.lock",
                "ports/{port}.json",
                "apps/fuzzapp/instances/1.lock",
                "apps/fuzzapp/instances/1.json",
                "apps/fuzzapp/instances",
                "apps/fuzzapp",
                "ports",
                "layout",
            ]
        ),
    )
    def check(kind: str, where: str) -> None:
        for sub in ("ports", "apps"):
            if (home / sub).is_symlink() or ((home / sub).exists() and not (home / sub).is_dir()):
                (home / sub).unlink()
            shutil.rmtree(home / sub, ignore_errors=True)
        spot = tmp_path / "special.toml" if where == "layout" else home / where.format(port=base)
        spot.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _plant(spot, kind, target):
            return
        layout = str(spot) if where == "layout" else str(config)
        with StateDir.open(str(home)) as fresh:
            with contextlib.suppress(PortPoolError):
                list_instances("fuzzapp", fresh)
            with contextlib.suppress(PortPoolError):
                inspect_port(fresh, base)
            with contextlib.suppress(PortPoolError):
                run_gc(fresh)
        for args in (["status"], ["status", "--json"], ["doctor"], ["layout"]):
            result = runner.invoke(cli, [*args, "--config", layout])
            assert result.exception is None or isinstance(result.exception, SystemExit), (
                kind,
                where,
                args,
                result.exception,
            )
            assert result.exit_code in (0, 1, 2), (kind, where, args, result.output)
        if where == "layout":
            spot.unlink() if not spot.is_dir() or spot.is_symlink() else spot.rmdir()

    check()


# ---------------------------------------------------------------- record text on a terminal

hostile_text = st.text(
    st.characters(categories=["Cc", "Cs", "Cf", "Zl", "Zp"]) | st.sampled_from("\x1b[]31;m"),
    min_size=1,
    max_size=12,
)


def test_record_strings_with_surrogates_and_controls_are_printed_escaped(
    home: Path, state: StateDir, tmp_path: Path
) -> None:
    config = write_layout(tmp_path / "l.toml", 40500, app="fuzzapp")
    path = Path(state.instances("fuzzapp").path)

    @settings(FUZZ, max_examples=20)  # two real processes per example
    @given(st.lists(hostile_text, min_size=1, max_size=3))
    @example(["\ud800", "\x1b]0;title\x07", "\u202e"])
    def check(names: list[str]) -> None:
        services = [{"name": n, "pool": [1], "port": 1, "pid": 1} for n in names]
        (path / "1.json").write_text(
            json.dumps({**GOOD_INSTANCE, "services": services}), encoding="ascii"
        )
        plain = subprocess.run(
            [sys.executable, "-m", "portpool.cli", "status", "--config", str(config)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert plain.returncode == 0, plain.stderr
        text = plain.stdout.decode("utf-8")  # strict: no raw surrogate got out
        assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in text if c != "\n")
        assert len(text.splitlines()) == 3  # no injected lines
        as_json = subprocess.run(
            [sys.executable, "-m", "portpool.cli", "status", "--json", "--config", str(config)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert as_json.returncode == 0, as_json.stderr
        # A name no layout can have refuses the record (such names reached `env` lines).
        [info] = json.loads(as_json.stdout)["instances"]
        if all(name_problem("service", n) is None for n in names):  # "1", "m"
            if len(set(names)) == len(names):
                assert [s["name"] for s in info["services"]] == names
            else:  # a service named twice is not a record portpool wrote
                assert info["readable"] is False and "twice" in info["problem"]
        else:
            assert info["readable"] is False and "invalid name" in info["problem"]

    check()


# ---------------------------------------------------------------- numbers out of range

out_of_range = (
    st.integers(-(2**64), -1)
    | st.integers(65536, 2**64)
    | st.integers(10**300, 10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1e-300, 1e300, 1e10, -0.0, 2**63, 86400.5, 0.009])
)
NUMERIC_KEYS = ["base", "size", "stride", "max_instances", "heartbeat_interval", "shield_interval"]


@FUZZ
@given(st.sampled_from(NUMERIC_KEYS), out_of_range)
@example("heartbeat_interval", 1e10)
@example("shield_interval", 1e300)
@example("shield_interval", 1e-300)
def test_out_of_range_numbers_in_every_numeric_key(key: str, value: Any) -> None:
    service: dict[str, Any] = {"base": 20000, "size": 2, "stride": 100}
    doc: dict[str, Any] = {"app": "a", "services": {"s": service}}
    if key in service:
        service[key] = value
    else:
        doc[key] = value
    try:
        layout = parse_layout(doc, "fuzz.toml")
    except LayoutError as e:
        assert e.file == "fuzz.toml"  # noqa: PT017 - refusing is one of two right answers
        return
    # Accepted: then every value is one the threads and the pools can live with.
    assert 0.01 <= layout.heartbeat_interval_s <= 86400
    assert 0.01 <= layout.shield_interval_s <= 86400
    assert 1 <= layout.max_instances <= 1000
    for s in layout.services:
        assert all(1 <= p <= 65535 for n in range(1, layout.max_instances + 1) for p in s.pool(n))


def test_text_status_keeps_its_columns_for_a_large_instance_number(
    home: Path, state: StateDir, tmp_path: Path
) -> None:
    """A record 12345.json pushed its line's columns two places right of the others."""
    config = write_layout(tmp_path / "l.toml", 40200, app="fuzzapp")
    path = Path(state.instances("fuzzapp").path)
    for number in (1, 12345):
        (path / f"{number}.json").write_bytes(_dump(GOOD_INSTANCE))
    done = portpool("status", "--config", str(config))
    assert done.returncode == 0, done.stderr
    head, first, large = done.stdout.splitlines()[1:]
    assert head.index("pid") == first.index("4242") + 1 == large.index("4242") + 1, done.stdout
    assert head.startswith("    #  ") and large.startswith("12345  "), done.stdout
