"""Two real users on one host: the other one can refuse to share ports (the kernel's
right) but cannot make a dead instance look alive, a live one look dead, or stop it.

Run as root: the test creates two throwaway users (useradd) and runs portpool as each
of them in a child that drops its privileges (setgid/setuid) after loading Python, so
the interpreter may live where those users cannot read. Skipped with a message otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import find_free_block
from tests.helpers import release, start_script, wait_for

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux users and tmpfs"),
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0,
        reason="needs root to create two users (run as root to test other users)",
    ),
]

# Runs portpool as another user. The interpreter may live under a directory that user
# cannot enter (/root): in a private mount namespace of the child only, that directory
# is covered with an open one holding just the interpreter's tree; nothing changes for
# the rest of the host. Then setpriv drops to the user and execs portpool.
AS_USER = r"""
set -e
home=$(dirname "$(dirname "$REAL_PYTHON")")
top=$1; shift
case "$home" in
  "$top"/*)
    mkdir -p "$STAGE"
    mount --bind "$top" "$STAGE"
    mount -t tmpfs -o mode=0755,size=64k tmpfs "$top"
    rel=${home#"$top"/}; first=${rel%%/*}
    mkdir -p "$top/$first"
    mount --bind "$STAGE/$first" "$top/$first"
    ;;
esac
uid=$1; gid=$2; shift 2
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups "$PYTHON" -m portpool.cli "$@"
"""


def _closed_ancestor(path: str) -> str:
    """The topmost directory above ``path`` that others cannot enter, or "" if none."""
    parts = Path(path).parts
    for i in range(2, len(parts)):
        top = os.path.join(*parts[:i])
        if not os.stat(top).st_mode & 0o001:
            return top
    return ""


HOLD_MANY_LOCKS = """
import fcntl, os, sys
uid, gid, directory, count = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
fds = []
for i in range(count):
    fd = os.open(os.path.join(directory, f"f{i}"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    fds.append(fd)
print("locked", flush=True)
sys.stdin.readline()
"""


def _lock_400_files(user: User) -> subprocess.Popen[str]:
    """A process of ``user`` holding locks on 400 files of its home (``release`` it)."""
    args = (str(user.uid), str(user.gid), str(user.home), "400")
    return start_script(HOLD_MANY_LOCKS, *args, ready="locked")


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: Path  # a tmpfs of its own, mode 0700: the user's PORTPOOL_HOME lives in it

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR",)}
        env.update(PORTPOOL_HOME=str(self.home / "state"), HOME=str(self.home))
        env.update(PATH="/usr/local/bin:/usr/bin:/bin", **extra)  # none under /root
        env.update(
            PYTHON=sys.executable,
            REAL_PYTHON=os.path.realpath(sys.executable),
            STAGE=str(self.home.parent / ".stage"),
        )
        return env

    def argv(self, *args: str) -> list[str]:
        python = os.path.realpath(sys.executable)
        top = _closed_ancestor(python) or "/nonexistent"
        return [
            "unshare", "--mount", "--propagation", "private", "sh", "-c", AS_USER, "sh",
            top, str(self.uid), str(self.gid), *args,
        ]  # fmt: skip

    def portpool(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env(**env),
            check=False,
            cwd="/",
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
            cwd="/",
        )

    def status(self, config: Path) -> dict[str, Any]:
        done = self.portpool("status", "--json", "--config", str(config))
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def users() -> Iterator[tuple[User, User, Path]]:
    """Two new users, each with a private tmpfs, and a shared world-readable dir."""
    for tool in ("useradd", "userdel", "unshare", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not available to run commands as test users")
    shared = Path(f"/tmp/portpool-users-{secrets.token_hex(4)}")
    shared.mkdir(mode=0o755)
    made: list[User] = []
    mounts: list[Path] = []
    try:
        for role in ("a", "m"):
            name = f"pp{role}{secrets.token_hex(3)}"
            done = _run("useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name)
            if done.returncode != 0:
                pytest.skip(f"cannot create a test user: {done.stderr.strip()}")
            import pwd

            entry = pwd.getpwnam(name)
            home = shared / name
            home.mkdir()
            mounted = _run(
                "mount", "-t", "tmpfs", "-o",
                f"size=8m,mode=0700,uid={entry.pw_uid},gid={entry.pw_gid}", "tmpfs", str(home),
            )  # fmt: skip
            if mounted.returncode != 0:
                _run("userdel", name)
                pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
            mounts.append(home)
            made.append(User(name, entry.pw_uid, entry.pw_gid, home))
        yield made[0], made[1], shared
    finally:
        for home in mounts:
            _run("umount", "-l", str(home))
        for user in made:
            _run("userdel", user.name)
            shutil.rmtree(f"/tmp/portpool-{user.uid}", ignore_errors=True)
        shutil.rmtree(shared, ignore_errors=True)


def _layout(shared: Path) -> Path:
    base = find_free_block(4)
    path = shared / "portpool.toml"
    path.write_text(
        'app = "shared"\nshield_interval = 0.2\nheartbeat_interval = 0.5\nmax_instances = 1\n'
        f"[services.web]\nbase = {base}\nsize = 2\nstride = 100\n"
        f"[services.api]\nbase = {base + 2}\nsize = 2\nstride = 100\n"
    )
    path.chmod(0o644)
    return path


def test_another_user_cannot_make_a_dead_instance_look_alive(
    users: tuple[User, User, Path],
) -> None:
    alice, mallory, shared = users
    config = _layout(shared)
    killed = alice.portpool("run", "--config", str(config), "--", "sh", "-c", "kill -9 $PPID")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (instance,) = alice.status(config)["instances"]
    assert instance["alive"] is False
    # Mallory locks the first 400 files of his own tmpfs: tmpfs numbers inodes per
    # mount from 1, so they share inode numbers with alice's lock files.
    slot = alice.home / "state" / "apps" / "shared" / "instances" / "1.lock"
    assert slot.stat().st_ino < 400
    holder = _lock_400_files(mallory)
    try:
        twin = mallory.home / f"f{slot.stat().st_ino}"
        assert any(p.stat().st_ino == slot.stat().st_ino for p in mallory.home.iterdir()), twin
        (instance,) = alice.status(config)["instances"]
        assert instance["alive"] is False
        gc = alice.portpool("gc")
        assert gc.returncode == 0, gc.stderr
        assert "removed record of dead instance shared/1" in gc.stdout
    finally:
        release(holder)


def test_another_user_cannot_make_a_live_instance_look_dead_nor_stop_it(
    users: tuple[User, User, Path],
) -> None:
    alice, mallory, shared = users
    config = _layout(shared)
    running = alice.start("run", "--config", str(config), "--", "sleep", "120")
    try:
        (instance,) = wait_for(lambda: alice.status(config)["instances"] or None, timeout=30)
        assert instance["alive"] is True
        state = alice.home / "state"
        # Mallory points portpool at alice's state dir: refused, nothing read or removed.
        for args in (["status", "--config", str(config)], ["gc"]):
            done = mallory.portpool(*args, PORTPOOL_HOME=str(state))
            assert done.returncode == 1, done.stderr
            assert "portpool: error: state dir" in done.stderr
            assert len(done.stderr.splitlines()) == 1
        # Mallory starts the same layout in his own state dir: alice's first ports are
        # refused to him (in use); he may get the others, or nothing. Never hers.
        his = mallory.portpool("run", "--config", str(config), "--", "true")
        assert his.returncode in (0, 3), his.stderr
        # Mallory holds locks on files that share inode numbers with alice's.
        holder = _lock_400_files(mallory)
        try:
            (instance,) = alice.status(config)["instances"]
            assert instance["alive"] is True
            assert instance["pid"] == running.pid
        finally:
            release(holder)
        # Several shield intervals later alice's instance still runs: nothing tripped it.
        time.sleep(1.0)
        assert running.poll() is None
        (instance,) = alice.status(config)["instances"]
        assert instance["alive"] is True
        assert all(s["port"] in s["pool"][:1] for s in instance["services"])
    finally:
        running.send_signal(signal.SIGTERM)
        running.wait(30)
    # Stopped by its own user's signal, as `run` passes it on (exit 143 or dying of it).
    assert running.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM)


def test_another_user_squatting_the_default_state_dir_is_refused(
    users: tuple[User, User, Path],
) -> None:
    alice, mallory, shared = users
    config = _layout(shared)
    squat = Path(f"/tmp/portpool-{alice.uid}")
    squat.mkdir(mode=0o700)
    os.chown(squat, mallory.uid, mallory.gid)
    env = alice.env()
    del env["PORTPOOL_HOME"]
    done = subprocess.run(
        alice.argv("run", "--config", str(config), "--", "true"),
        capture_output=True, text=True, timeout=60, env=env, check=False, cwd="/",
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == (
        f"portpool: error: state dir {squat}: is owned by uid {mallory.uid}, not by you "
        f"(uid {alice.uid}); use your own directory (set PORTPOOL_HOME)\n"
    )
    assert list(squat.iterdir()) == []
