"""OS primitives on POSIX: flock, directories by fd, identity, liveness, listeners.

The Windows module is type-checked with ``mypy --platform win32``; it cannot run here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import run_python

from portpool import _platform as plat
from portpool._platform import DirHandle, ProcessIdentity

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX primitives")

TRY_LOCK = (
    "import os, sys\n"
    "from portpool._platform import try_lock\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "print(try_lock(fd))\n"
)


def _other_process_can_lock(path: Path) -> bool:
    done = run_python(TRY_LOCK, str(path))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


def test_try_lock_is_exclusive_across_processes_and_freed_by_unlock(tmp_path: Path):
    path = tmp_path / "x.lock"
    path.touch()
    fd = os.open(path, os.O_RDWR)
    try:
        assert plat.try_lock(fd)
        assert not _other_process_can_lock(path)
        plat.unlock(fd)
        assert _other_process_can_lock(path)
    finally:
        os.close(fd)


def test_a_second_open_in_the_same_process_does_not_share_the_lock(tmp_path: Path):
    path = tmp_path / "x.lock"
    path.touch()
    a, b = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        assert plat.try_lock(a)
        assert not plat.try_lock(b)  # no deadlock, no silent sharing
    finally:
        os.close(a)
        os.close(b)


def test_locked_inodes_shows_our_lock_and_pid(tmp_path: Path):
    if not sys.platform.startswith("linux"):
        assert plat.locked_inodes() is None
        return
    path = tmp_path / "x.lock"
    path.touch()
    fd = os.open(path, os.O_RDWR)
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)  # /proc/locks prints hex major:minor: same device
        assert key not in (plat.locked_inodes() or {})
        assert plat.try_lock(fd)
        assert (plat.locked_inodes() or {}).get(key) == os.getpid()
    finally:
        os.close(fd)
    assert key not in (plat.locked_inodes() or {})


def test_dir_handle_refuses_symlinks(tmp_path: Path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OSError):
        DirHandle.open_path(str(tmp_path / "link"))
    d = DirHandle.open_path(str(real))
    try:
        (real / "target").write_text("keep")
        (real / "planted").symlink_to(real / "target")
        with pytest.raises(OSError):
            d.open_file("planted", os.O_RDWR)
        st = d.stat_entry("planted")
        assert st is not None
        assert os.path.islink(real / "planted")
        assert d.stat_entry("missing") is None
        with pytest.raises(OSError):
            d.subdir("planted")
    finally:
        d.close()
    assert (real / "target").read_text() == "keep"


def test_dir_handle_operations_are_relative_to_the_fd(tmp_path: Path):
    d = DirHandle.open_path(str(tmp_path))
    try:
        sub = d.subdir("sub")
        assert sub.path == str(tmp_path / "sub")
        fd = sub.open_file("a", os.O_RDWR | os.O_CREAT)
        assert plat.write_at(fd, b"hello", 0) == 5
        assert plat.read_at(fd, 10, 0) == b"hello"
        os.close(fd)
        sub.rename("a", "b")
        assert sub.listdir() == ["b"]
        sub.unlink("b")
        assert sub.listdir() == []
        assert sub.identity == (os.stat(tmp_path / "sub").st_dev, os.stat(tmp_path / "sub").st_ino)
        assert stat_mode(tmp_path / "sub") == 0o700
        sub.close()
        sub.close()  # twice is fine
    finally:
        d.close()


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_current_identity_is_stable_and_alive():
    me = plat.current_identity()
    assert me.pid == os.getpid()
    assert me == plat.current_identity()
    assert me.boot_id == plat.boot_id()
    assert plat.is_alive(me)
    assert plat.identity_of(os.getpid()) == me
    assert me.to_dict() == {"pid": me.pid, "start_token": me.start_token, "boot_id": me.boot_id}


def test_a_dead_process_and_a_reused_pid_are_not_alive():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        ident = plat.identity_of(proc.pid)
        assert ident is not None
        assert plat.is_alive(ident)
        # Same pid, another start: a reused pid must not look like the old process.
        assert not plat.is_alive(ProcessIdentity(proc.pid, "0.000", ident.boot_id))
        # Same process as recorded in an earlier boot: not alive either.
        assert not plat.is_alive(ProcessIdentity(proc.pid, ident.start_token, "old-boot"))
    finally:
        proc.kill()
        proc.wait()
    assert not plat.is_alive(ident)
    assert plat.identity_of(proc.pid) is None
    assert plat.identity_of(0) is None
    assert plat.identity_of(-5) is None


def test_forked_child_has_its_own_identity():
    parent = plat.current_identity()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(w, str(plat.current_identity().pid).encode())
        finally:
            os._exit(0)
    os.close(w)
    child_pid = int(os.read(r, 32))
    os.close(r)
    os.waitpid(pid, 0)
    assert child_pid == pid != parent.pid


def test_process_name():
    import psutil

    assert plat.process_name(os.getpid()) == psutil.Process().name()
    assert plat.process_name(2**22 + 12345) is None


def test_listeners_find_our_socket_and_its_owner(port_base: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", port_base))
        s.listen(1)
        found = plat.listeners(port_base)
        assert [(x.address, x.port) for x in found] == [("127.0.0.1", port_base)]
        inode = plat.socket_inode(s)
        if sys.platform.startswith("linux"):
            assert found[0].inode == inode
            assert os.getpid() in plat.owners_of_inode(inode or 0)
        assert any(x.port == port_base for x in plat.listeners())
    assert plat.listeners(port_base) == []


def test_ipv6_listener_address(port_base: int):
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", port_base))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with s:
        s.listen(1)
        assert [x.address for x in plat.listeners(port_base)] == ["::1"]


def _bind_listen(sock: socket.socket, port: int) -> None:
    sock.bind(("127.0.0.1", port))
    sock.listen(1)


def test_exclusive_bind_options_never_share_the_port(port_base: int):
    a = socket.socket()
    b = socket.socket()
    try:
        plat.exclusive_bind_options(a)
        plat.exclusive_bind_options(b)
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        a.bind(("127.0.0.1", port_base))
        a.listen(1)
        with pytest.raises(OSError):
            _bind_listen(b, port_base)
    finally:
        a.close()
        b.close()


def test_ephemeral_port_range():
    found = plat.ephemeral_port_range()
    assert found is not None
    low, high = found
    assert 0 < low <= high <= 65535


def test_user_id_is_ours():
    assert plat.user_id() == os.getuid()


def test_platform_exports_are_complete_and_sorted():
    assert plat.__all__ == sorted(plat.__all__)
    for name in plat.__all__:
        assert hasattr(plat, name), name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_start_tokens_read_from_proc_equal_psutils(tmp_path: Path) -> None:
    # Records written through psutil and tokens read from /proc must name the same
    # process: a mismatch would make every live holder look dead (or a dead one alive).
    import shutil

    import psutil

    from portpool._platform._identity import _linux_start_token

    odd = tmp_path / "a) b (c"  # the name field holds spaces and parentheses
    shutil.copy(shutil.which("sleep") or "/bin/sleep", odd)
    procs = [subprocess.Popen([str(odd), "30"]), subprocess.Popen(["sleep", "30"])]
    try:
        for pid in (os.getpid(), os.getppid(), 1, *(p.pid for p in procs)):
            assert _linux_start_token(pid) == f"{psutil.Process(pid).create_time():.3f}", pid
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert _linux_start_token(procs[0].pid) is None


@pytest.mark.skipif(sys.platform != "linux", reason="sock_diag is Linux's")
def test_sock_diag_dump_of_one_port_has_its_sockets_in_every_state_and_no_other() -> None:
    """The kernel walks its tables for the port asked (no whole-host dump); the
    listener, an accepted connection and a TIME_WAIT on that port are all there."""
    import time

    from portpool._platform._sockdiag import diag_dump

    other = socket.create_server(("127.0.0.1", 0))  # another port, which must not show
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)) as first:
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its end of this one waits in TIME_WAIT
        first.recv(1)
    client = socket.create_connection(("127.0.0.1", port))
    live, _ = server.accept()
    try:
        states: set[str] = set()
        for _ in range(50):  # the TIME_WAIT appears once the client's close is through
            found = diag_dump(socket.AF_INET, port=port)
            assert {s.port for s in found} == {port}
            states = {s.state for s in found}
            if "time-wait" in states:
                break
            time.sleep(0.02)
        assert {"listen", "established", "time-wait"} <= states
        assert other.getsockname()[1] in {s.port for s in diag_dump(socket.AF_INET)}
    finally:
        for sock in (live, client, server, other):
            sock.close()
