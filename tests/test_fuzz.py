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
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tests.helpers import write_layout

from portpool.cli import cli
from portpool.errors import LayoutError, PortPoolError
from portpool.layout import load_layout, parse_layout
from portpool.lock import (
    RECORD_SIZE,
    PortRecord,
    decode_record,
    encode_record,
    inspect_port,
    read_port_record,
)
from portpool.records import list_instances, read_instance, read_json_file
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
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=25,
)


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
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from portpool.lock import PortLock\n"
            "from portpool.statedir import StateDir\n"
            f"lock = PortLock.acquire(StateDir.open(), {port})\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "held"
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
            assert inst["heartbeat_age_s"] is None or inst["heartbeat_age_s"] >= 0
        for name in os.listdir(path):
            os.unlink(path / name)

    check()


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
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
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
