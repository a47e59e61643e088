"""The secure state dir: where lock files and records live.

Per user and private: ``$XDG_RUNTIME_DIR/portpool``, else ``<tempdir>/portpool-<uid>``,
on Windows ``%LOCALAPPDATA%\\portpool``; ``PORTPOOL_HOME`` replaces it. A state dir that
is a symlink, not a directory, owned by someone else, or writable by group/others is
refused: each of those lets another user forge or delete our locks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading

from portpool._layout_load import file_kind
from portpool._platform import (
    DirHandle,
    default_state_dir,
    open_files_limit,
    posix_modes,
    user_id,
)
from portpool._text import printable
from portpool.errors import ResourceLimit, StateDirError


def default_path() -> str:
    """The state dir this process uses: ``PORTPOOL_HOME``, else the per-user default.

    Raises StateDirError for an empty or relative ``PORTPOOL_HOME``: an empty one once
    fell back to the shared default without a word, and a relative one named another
    state dir in every working directory, whose locks do not exclude each other.
    """
    home = os.environ.get("PORTPOOL_HOME")
    if home is None:
        return default_state_dir()
    if not home:
        raise StateDirError(
            "PORTPOOL_HOME=''",
            "is set but empty; unset it to use the per-user default "
            f"({default_state_dir()}), or set it to an absolute path",
        )
    if not os.path.isabs(home):
        raise StateDirError(
            f"PORTPOOL_HOME={home!r}",
            "is a relative path: it would name another state dir in every working "
            "directory, and their locks would not exclude each other; set it to an "
            f"absolute path (e.g. PORTPOOL_HOME={printable(os.path.abspath(home))})",
        )
    return os.path.abspath(home)


def check_name(kind: str, name: str) -> str:
    """An app or service name, which becomes a path component: no separators, no dots."""
    # Imported here: a pytest run that asks for no port fixes its state dir's path at
    # start-up (importing this module) and has no use for layout parsing.
    from portpool.layout import name_problem

    problem = name_problem(kind, name)
    if problem is not None:
        raise StateDirError(name, problem)
    return name


def _check_mode(path: str, st: os.stat_result, root: bool = False) -> None:
    """Refuse a directory that is not ours, writable by others, or (the ``root`` of the
    state dir) readable by others. Never change its mode: one handed to us may be a home
    directory or ``/usr`` (PORTPOOL_HOME=/usr once closed /usr to every other user).
    Inside a private root, a subdirectory readable by others is out of their reach."""
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(path, "is not a directory")
    if not posix_modes():
        return  # ACLs of %LOCALAPPDATA% keep it private; POSIX modes mean little there
    if st.st_uid != user_id():
        raise StateDirError(
            path,
            f"is owned by uid {st.st_uid}, not by you (uid {user_id()}); "
            # Inside our own state dir, "set PORTPOOL_HOME" sent users away from it.
            + ("use your own directory (set PORTPOOL_HOME)" if root else _subdir_advice()),
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateDirError(
            path,
            f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            + (_new_dir_advice(path) if root else _subdir_advice()),
        )
    if root and st.st_mode & 0o077:
        raise StateDirError(
            path,
            f"is readable by group or others (mode {stat.S_IMODE(st.st_mode):o}): others "
            "could read who holds which port; portpool never changes the mode of a "
            f"directory it did not create: {_new_dir_advice(path)}",
        )


def _new_dir_advice(path: str) -> str:
    # Never advise a chmod: the directory may be /tmp or a home that others rely on.
    return (
        f"point PORTPOOL_HOME at a new directory, which portpool creates private "
        f"(e.g. PORTPOOL_HOME={printable(os.path.join(path, 'portpool'))})"
    )


def _subdir_advice() -> str:
    # The state dir's own subdirectory: a new PORTPOOL_HOME inside it would not help.
    return (
        "portpool creates its subdirectories private: remove it once nothing uses this "
        "state dir, or point PORTPOOL_HOME at a new directory"
    )


def _entry_problem(parent: DirHandle, name: str, error: OSError) -> str:
    """Why the entry ``name`` of ``parent`` cannot be opened as a subdirectory: what it
    is (a symlink is never followed), else ``error``'s text."""
    try:
        st = parent.stat_entry(name)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        return "is a symbolic link; refusing to follow it"
    if st is not None and not stat.S_ISDIR(st.st_mode):
        return f"is {file_kind(st.st_mode)}, not a directory"
    return f"cannot be used: {error.strerror or error}"


def out_of_descriptors(error: OSError) -> ResourceLimit | None:
    """A ResourceLimit for an EMFILE/ENFILE ``error``, else None.

    Out of descriptors once read as "no free port in pool ... (remove what is there)",
    exit 3: it is a resource limit (exit 1), and nothing on disk is at fault.
    """
    if error.errno == errno.EMFILE:
        return ResourceLimit(
            "open files",
            open_files_limit(),
            None,
            "raise the limit (ulimit -n) or start fewer services",
        )
    if error.errno == errno.ENFILE:
        return ResourceLimit(
            "open files of the whole system", None, None, "close programs or raise fs.file-max"
        )
    return None


def write_error(path: str, what: str, error: OSError) -> ResourceLimit | StateDirError:
    """The error for a failed write at ``path`` in the state dir: ResourceLimit out of
    descriptors (nothing on disk is at fault; it read "state dir ...: cannot write
    1.json: Too many open files"), else StateDirError(path, "<what>: <why>")."""
    return out_of_descriptors(error) or StateDirError(path, f"{what}: {error.strerror or error}")


class StateDir:
    """An opened, checked state dir. Use ``StateDir.open()``; close when done.

    Opened with ``create=False`` (for read-only commands) it creates nothing: ``root`` is
    None when the directory does not exist, and ``find`` answers None for what is missing.
    """

    def __init__(
        self, root: DirHandle | None, path: str | None = None, create: bool = True
    ) -> None:
        self.root = root
        self.path = root.path if root is not None else os.path.abspath(path or default_path())
        self.create = create
        self._subdirs: dict[str, DirHandle] = {}
        self._mutex = threading.Lock()
        self._users = 0  # leases and instances held in it (keep_open, let_close)
        self._close_asked = False

    @classmethod
    def open(cls, path: str | None = None, *, create: bool = True) -> StateDir:
        """Open (creating it 0700 if missing, unless ``create`` is False) and check the
        state dir at ``path``.

        ``path``: an absolute path, or None for ``default_path()``. Raises StateDirError
        naming the path and the problem (empty or relative, as for ``PORTPOOL_HOME``; a
        symlink, not ours, readable or writable by others, ...), ResourceLimit out of
        file descriptors.
        """
        if path is not None and not os.path.isabs(path):
            # As for PORTPOOL_HOME: "" opened the per-user default without a word, and a
            # relative path named another state dir in every working directory.
            where = "is empty" if not path else "is a relative path"
            raise StateDirError(
                repr(path), f"{where}: give an absolute path (None: PORTPOOL_HOME or the default)"
            )
        path = os.path.abspath(path or default_path())
        if create:
            try:
                _make_parents(os.path.dirname(path))
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            except OSError as e:
                raise StateDirError(path, f"cannot be created: {e.strerror}") from e
        try:
            lst = os.lstat(path)
        except FileNotFoundError as e:
            if not create:
                return cls(None, path, create=False)
            raise StateDirError(path, f"cannot be read: {e.strerror}") from e
        except OSError as e:
            raise StateDirError(path, f"cannot be read: {e.strerror}") from e
        if stat.S_ISLNK(lst.st_mode):
            raise StateDirError(path, "is a symbolic link; refusing to follow it")
        _check_mode(path, lst, root=True)
        try:
            handle = DirHandle.open_path(path)
        except OSError as e:
            limit = out_of_descriptors(e)  # nothing about the directory is at fault
            if limit is not None:
                raise limit from e
            raise StateDirError(path, f"cannot be opened safely: {e.strerror}") from e
        st = handle.stat()
        if (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino):
            handle.close()
            raise StateDirError(path, "was replaced while being opened")
        try:
            _check_mode(path, st, root=True)
        except StateDirError:
            handle.close()
            raise
        return cls(handle, create=create)

    def problem(self) -> str | None:
        """None while ``path`` still names the directory this opened, else what became
        of it. Moved away (``mv``), its locks stay held but a start by that path makes
        a new state dir and gets the same numbers and ports. Raises nothing."""
        if self.root is None:
            return None
        try:
            now = os.lstat(self.path)
            opened = self.root.stat()
        except FileNotFoundError:
            return f"state dir {printable(self.path)} was moved away or removed"
        except OSError as e:
            return f"state dir {printable(self.path)} cannot be examined: {e.strerror or e}"
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            where = printable(self.path)
            return f"state dir {where} was moved away: that path names another directory"
        return None

    def subdir(self, *parts: str) -> DirHandle:
        """The checked subdirectory ``parts`` (e.g. "ports"), created 0700 if missing
        (a StateDirError if it is missing in a state dir opened with ``create=False``).
        Raises StateDirError too if it is not a private directory of ours or cannot be
        opened."""
        found = self._open_subdir(parts, self.create)
        if found is None:
            where = os.path.join(self.path, *parts)
            raise StateDirError(where, "does not exist (nothing has used this state dir yet)")
        return found

    def find(self, *parts: str) -> DirHandle | None:
        """The checked subdirectory ``parts`` if it exists, else None; never creates.
        Raises StateDirError if it exists but is not a private directory of ours or
        cannot be opened."""
        return self._open_subdir(parts, False)

    def _open_subdir(self, parts: tuple[str, ...], create: bool) -> DirHandle | None:
        key = "/".join(parts)
        with self._mutex:
            found = self._subdirs.get(key)
            if found is not None:
                return found
            if self.root is None:
                return None
            handle = parent = self.root
            opened: list[DirHandle] = []
            part = ""
            try:
                for part in parts:
                    parent = handle
                    handle = parent.subdir(part, create=create)
                    opened.append(handle)
                    _check_mode(handle.path, handle.stat())
            except FileNotFoundError:
                for h in opened:
                    h.close()
                if create:
                    raise StateDirError(os.path.join(self.path, *parts), "vanished") from None
                return None
            except OSError as e:
                limit = out_of_descriptors(e)
                # The entry at fault (``apps`` a symlink), not the path asked for; looked
                # at through its parent before that is closed.
                problem = "" if limit is not None else _entry_problem(parent, part, e)
                for h in opened:
                    h.close()
                if limit is not None:
                    raise limit from e
                raise StateDirError(os.path.join(parent.path, part), problem) from e
            except StateDirError:
                for h in opened:
                    h.close()
                raise
            for h in opened[:-1]:
                h.close()
            self._subdirs[key] = handle
            return handle

    def ports(self) -> DirHandle:
        """The ``ports`` subdirectory (created 0700 on first use). Raises StateDirError
        as ``subdir`` does."""
        found = self._subdirs.get("ports")  # hot path of acquire: no mutex once opened
        return found if found is not None else self.subdir("ports")

    def instances(self, app: str) -> DirHandle:
        """The ``instances`` subdirectory of ``app`` (created 0700 if missing). Raises
        StateDirError for an invalid app name, or as ``subdir`` does."""
        return self.subdir("apps", check_name("app", app), "instances")

    def find_instances(self, app: str) -> DirHandle | None:
        """``instances`` of ``app`` if it exists, else None; never creates. Raises
        StateDirError for an invalid app name, or as ``find`` does."""
        return self.find("apps", check_name("app", app), "instances")

    def apps(self) -> list[str]:
        """Names of the apps that have ever used this state dir, sorted; [] if it cannot
        be listed. Raises StateDirError if ``apps`` exists but is not a private directory
        of ours."""
        from portpool.layout import name_problem

        try:
            apps = self.find("apps")
            return (
                sorted(n for n in apps.listdir() if name_problem("app", n) is None) if apps else []
            )
        except OSError:
            return []

    def keep_open(self) -> None:
        """Count one more lease or instance held in this state dir: ``close()`` waits
        until it is released (``let_close``). Raises nothing."""
        with self._mutex:
            self._users += 1

    def let_close(self) -> None:
        """One lease or instance held in this state dir was released: the last one
        closes it if ``close()`` was asked meanwhile. Raises nothing."""
        with self._mutex:
            self._users -= 1
            now = self._users <= 0 and self._close_asked
        if now:
            self._close_handles()

    def close(self) -> None:
        """Close every directory handle this opened, at once, or once every lease and
        instance held in it is released: closed under them, a lease released after its
        ``with StateDir.open()`` block left its record as a live holder's, and an
        instance's shield tripped on a state dir it could not examine. Raises nothing."""
        with self._mutex:
            self._close_asked = True
            if self._users > 0:
                return
        self._close_handles()

    def _close_handles(self) -> None:
        with self._mutex:
            for h in self._subdirs.values():
                h.close()
            self._subdirs.clear()
        if self.root is not None:
            self.root.close()

    def __enter__(self) -> StateDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_parents(directory: str) -> None:
    """``directory`` and every missing one above it, each created 0700 as the state dir
    is: under ``umask 000`` they were 0777, and others could rename the state dir away
    beneath them. Raises OSError."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for made in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(made, 0o700)


def special_entry(directory: DirHandle, name: str) -> str | None:
    """What ``<dir>/<name>`` is (``a FIFO``, ``a directory``, ...) when it exists and is
    not a regular file, else None; a symlink is not followed. Raises OSError if it
    cannot be examined."""
    st = directory.stat_entry(name)
    return None if st is None or stat.S_ISREG(st.st_mode) else file_kind(st.st_mode)
