"""The state dir: private, ours, never a symlink; refused loudly otherwise."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
from tests.helpers import EXHAUST_DESCRIPTORS, run_python

from portpool.errors import StateDirError
from portpool.statedir import StateDir, check_name, default_path

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX modes and owners")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_created_private_even_with_a_permissive_umask(tmp_path: Path):
    old = os.umask(0)
    try:
        with StateDir.open(str(tmp_path / "a" / "state")) as state:
            state.ports()
            state.instances("my-app")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a" / "state") == 0o700
    # The missing directories above it too: they were 0777, and others could rename
    # the state dir away beneath them (a mistyped PORTPOOL_HOME made them).
    assert _mode(tmp_path / "a") == 0o700
    assert _mode(tmp_path / "a" / "state" / "ports") == 0o700
    assert _mode(tmp_path / "a" / "state" / "apps" / "my-app" / "instances") == 0o700


def test_portpool_home_overrides_the_default(home: Path):
    assert default_path() == str(home)
    with StateDir.open() as state:
        assert state.path == str(home)


def test_default_is_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("PORTPOOL_HOME", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_path() == str(tmp_path / "portpool")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_path() == os.path.join(tempfile.gettempdir(), f"portpool-{os.getuid()}")


def test_an_empty_or_relative_portpool_home_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """ "" once fell back to the shared default without a word; a relative path named a
    state dir in each working directory, whose locks do not exclude each other."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PORTPOOL_HOME", "")
    with pytest.raises(StateDirError) as info:
        StateDir.open()
    assert info.value.path == "PORTPOOL_HOME=''"
    assert info.value.problem.startswith("is set but empty; unset it")
    monkeypatch.setenv("PORTPOOL_HOME", "state")
    with pytest.raises(StateDirError) as info:
        StateDir.open()
    assert info.value.path == "PORTPOOL_HOME='state'"
    assert f"absolute path (e.g. PORTPOOL_HOME={tmp_path / 'state'})" in info.value.problem
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("PORTPOOL_HOME", str(tmp_path / "a" / ".." / "state"))
    assert default_path() == str(tmp_path / "state")
    # Given to StateDir.open, the same paths are refused alike: "state" was created in
    # the working directory, and "" opened the per-user default.
    for given, problem in (("state", "is a relative path"), ("", "is empty")):
        with pytest.raises(StateDirError) as info:
            StateDir.open(given)
        assert info.value.path == repr(given) and info.value.problem.startswith(problem)
    assert os.listdir(tmp_path) == []


def test_a_log_path_is_only_for_an_instance_number(state: StateDir) -> None:
    from portpool._logs import log_path
    from portpool.errors import UsageError

    assert log_path(state, "app", 1).endswith(os.path.join("apps", "app", "logs", "1.log"))
    for number in (0, -3, True):  # "logs/0.log", "logs/-3.log"
        with pytest.raises(UsageError, match="instance number must be 1 or more"):
            log_path(state, "app", number)


def test_a_relative_xdg_runtime_dir_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The XDG spec: a relative path there is invalid and must be ignored."""
    monkeypatch.delenv("PORTPOOL_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", "run")
    assert default_path() == os.path.join(tempfile.gettempdir(), f"portpool-{os.getuid()}")


def test_an_xdg_runtime_dir_of_another_user_is_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """The XDG spec: it MUST be the user's. Inherited through `sudo -E`, root's state
    dir went into the user's runtime dir, and then refused every command of the user."""
    monkeypatch.delenv("PORTPOOL_HOME", raising=False)
    theirs = tmp_path / "run"
    theirs.mkdir(mode=0o700)
    other = 65534 if os.getuid() != 65534 else 65533
    try:
        os.chown(theirs, other, -1)
    except PermissionError:
        pytest.skip("cannot give a directory to another user without privileges")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(theirs))
    assert default_path() == os.path.join(tempfile.gettempdir(), f"portpool-{os.getuid()}")


def test_symlinked_state_dir_is_refused(tmp_path: Path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(StateDirError) as info:
        StateDir.open(str(link))
    assert info.value.path == str(link)
    assert "symbolic link" in info.value.problem


def test_a_file_in_its_place_is_refused(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateDirError) as info:
        StateDir.open(str(tmp_path / "file"))
    assert info.value.path == str(tmp_path / "file")
    assert "not a directory" in info.value.problem


def test_foreign_owned_state_dir_is_refused(tmp_path: Path):
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    other = 65534 if os.getuid() != 65534 else 65533
    try:
        os.chown(path, other, -1)
    except PermissionError:
        pytest.skip("cannot give a directory to another user without privileges")
    with pytest.raises(StateDirError) as info:
        StateDir.open(str(path))
    assert info.value.path == str(path)
    assert f"owned by uid {other}" in info.value.problem
    assert "PORTPOOL_HOME" in info.value.problem  # says what to do


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702, 0o720])
def test_group_or_world_writable_state_dir_is_refused(tmp_path: Path, mode: int):
    path = tmp_path / "open"
    path.mkdir()
    path.chmod(mode)
    with pytest.raises(StateDirError) as info:
        StateDir.open(str(path))
    assert info.value.path == str(path)
    assert "writable by group or others" in info.value.problem
    assert "chmod" not in info.value.problem  # never advise opening up /tmp or a home
    assert f"PORTPOOL_HOME={path / 'portpool'}" in info.value.problem
    assert _mode(path) == mode  # refused, not silently "repaired"


def test_readable_by_others_is_refused_never_re_permissioned(tmp_path: Path):
    """PORTPOOL_HOME=$HOME once left the home directory at 0700 (and /usr, as root)."""
    path = tmp_path / "readable"
    path.mkdir()
    path.chmod(0o755)
    for create in (True, False):
        with pytest.raises(StateDirError) as info:
            StateDir.open(str(path), create=create)
        assert "readable by group or others (mode 755)" in info.value.problem
        assert f"PORTPOOL_HOME={path / 'portpool'}" in info.value.problem  # says what to do
        assert "did not create: point PORTPOOL_HOME at a new directory" in info.value.problem
        assert _mode(path) == 0o755
        assert list(path.iterdir()) == []  # nothing created in it


def test_opened_without_create_creates_nothing(tmp_path: Path):
    missing = tmp_path / "parent" / "state"
    with StateDir.open(str(missing), create=False) as state:
        assert state.root is None and state.path == str(missing)
        assert state.find("ports") is None and state.find_instances("app") is None
        assert state.apps() == []
        with pytest.raises(StateDirError, match="does not exist"):
            state.ports()
    assert not (tmp_path / "parent").exists()
    existing = tmp_path / "state"
    existing.mkdir(mode=0o700)
    with StateDir.open(str(existing), create=False) as state:
        assert state.find("ports") is None
        with pytest.raises(StateDirError, match="does not exist"):
            state.instances("app")
    assert list(existing.iterdir()) == []


def test_a_subdirectory_of_another_user_is_named_with_what_to_do(tmp_path: Path):
    root = tmp_path / "state"
    with StateDir.open(str(root)) as state:
        ports = Path(state.ports().path)
    other = 65534 if os.getuid() != 65534 else 65533
    try:
        os.chown(ports, other, -1)
    except PermissionError:
        pytest.skip("cannot give a directory to another user without privileges")
    with StateDir.open(str(root)) as state, pytest.raises(StateDirError) as info:
        state.ports()
    assert info.value.path == str(ports)
    # Not "set PORTPOOL_HOME": the state dir is the user's own; this entry of it is not.
    assert info.value.problem == (
        f"is owned by uid {other}, not by you (uid {os.getuid()}); portpool creates its "
        "subdirectories private: remove it once nothing uses this state dir, or point "
        "PORTPOOL_HOME at a new directory"
    )


def test_hostile_subdirectories_are_refused(tmp_path: Path):
    root = tmp_path / "state"
    with StateDir.open(str(root)) as state:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        (root / "ports").symlink_to(elsewhere)
        with pytest.raises(StateDirError) as info:
            state.ports()
        assert info.value.path == str(root / "ports")
        (root / "ports").unlink()
        (root / "apps").mkdir(mode=0o700)
        (root / "apps").chmod(0o777)
        with pytest.raises(StateDirError) as info:
            state.instances("app")
        assert "writable by group or others" in info.value.problem
        assert not any(elsewhere.iterdir())


def test_state_dir_swapped_after_open_is_not_followed(tmp_path: Path):
    """Operations go through the opened directory, not its name."""
    root = tmp_path / "state"
    with StateDir.open(str(root)) as state:
        ports = state.ports()
        moved = tmp_path / "moved"
        root.rename(moved)
        decoy = tmp_path / "decoy"
        decoy.mkdir(mode=0o700)
        root.symlink_to(decoy)
        fd = ports.open_file("1.lock", os.O_RDWR | os.O_CREAT)
        os.close(fd)
        assert (moved / "ports" / "1.lock").exists()
        assert not any(decoy.iterdir())


def test_names_that_would_be_paths_are_refused():
    assert check_name("app", "qwen-valencia") == "qwen-valencia"
    for bad in ("", "..", ".hidden", "a/b", "a\\b", "x" * 65, "ünïcode", "a b"):
        with pytest.raises(StateDirError):
            check_name("app", bad)


def test_apps_lists_only_valid_names(tmp_path: Path):
    with StateDir.open(str(tmp_path / "state")) as state:
        state.instances("one")
        state.instances("two")
        (tmp_path / "state" / "apps" / ".junk").mkdir()
        assert state.apps() == ["one", "two"]


def test_subdir_handles_are_shared_and_closed(tmp_path: Path):
    state = StateDir.open(str(tmp_path / "state"))
    assert state.ports() is state.ports()
    ports = state.ports()
    state.close()
    assert ports.fd == -1
    assert state.root.fd == -1


OUT_OF_FDS = (
    """
import os, resource, sys
from portpool.errors import ResourceLimit, StateDirError
from portpool.statedir import StateDir
StateDir.open(sys.argv[1]).close()  # it exists: only the open can fail
"""
    + EXHAUST_DESCRIPTORS
    + """
try:
    StateDir.open(sys.argv[1])
except (ResourceLimit, StateDirError) as e:
    print(type(e).__name__, e.exit_code)
"""
)


def test_out_of_descriptors_opening_it_is_a_resource_limit(tmp_path: Path) -> None:
    # It read "state dir ... cannot be opened safely: Too many open files", blaming a
    # directory that is fine (the CLI's run and up translated it; the library did not).
    done = run_python(OUT_OF_FDS, str(tmp_path / "state"))
    assert (done.returncode, done.stdout) == (0, "ResourceLimit 1\n"), done.stderr
