"""Windows and macOS primitives. They run on those systems and skip elsewhere; on Linux
the same code is type-checked with ``mypy --platform win32`` / ``--platform darwin``."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from portpool import _platform
from portpool.pool import bind_listen

windows = pytest.mark.skipif(sys.platform != "win32", reason="Windows primitives")
macos = pytest.mark.skipif(sys.platform != "darwin", reason="macOS primitives")


@windows
def test_lockfileex_is_exclusive_across_processes(tmp_path: Path) -> None:
    import os

    path = tmp_path / "p.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert _platform.try_lock(fd)
        probe = (
            "import os, sys; from portpool import _platform\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "sys.exit(0 if _platform.try_lock(fd) else 3)\n"
        )
        held = subprocess.run([sys.executable, "-c", probe, str(path)], check=False, timeout=60)
        assert held.returncode == 3
        _platform.unlock(fd)
        free = subprocess.run([sys.executable, "-c", probe, str(path)], check=False, timeout=60)
        assert free.returncode == 0
    finally:
        os.close(fd)


@windows
def test_exclusive_addr_use_refuses_a_second_binder() -> None:
    owner = bind_listen("127.0.0.1", 0)
    try:
        port = owner.getsockname()[1]
        intruder = socket.socket()
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError):
            intruder.bind(("127.0.0.1", port))
        intruder.close()
    finally:
        owner.close()


@windows
def test_windows_dir_handle_refuses_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    try:
        link.symlink_to(target, target_is_directory=True)
    except OSError:
        pytest.skip("creating symlinks needs developer mode or admin rights")
    with pytest.raises(OSError):
        _platform.DirHandle.open_path(str(link))


@macos
def test_macos_ephemeral_range_comes_from_sysctl() -> None:
    found = _platform.ephemeral_port_range()
    assert found is not None
    low, high = found
    out = subprocess.run(
        ["sysctl", "-n", "net.inet.ip.portrange.first"], capture_output=True, text=True, check=True
    ).stdout
    assert low == int(out)
    assert low < high <= 65535


@macos
def test_macos_owning_socket_cannot_be_shadowed_by_a_specific_address() -> None:
    # On BSD, SO_REUSEADDR would let 127.0.0.1:p bind over a wildcard listener: the
    # owning socket must not set it, so a wildcard holder makes our bind fail.
    wildcard = socket.socket()
    wildcard.bind(("0.0.0.0", 0))
    wildcard.listen()
    try:
        port = wildcard.getsockname()[1]
        with pytest.raises(OSError):
            bind_listen("127.0.0.1", port)
    finally:
        wildcard.close()
