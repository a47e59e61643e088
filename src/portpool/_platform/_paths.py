"""Where a user's private state lives by default, and whether POSIX modes guard it."""

from __future__ import annotations

import os
import stat
import sys


def posix_modes() -> bool:
    """Whether POSIX modes keep a directory private here. False on Windows, where the
    ACLs of %LOCALAPPDATA% do and POSIX modes mean little."""
    return sys.platform != "win32"


def default_state_dir() -> str:
    """The per-user default state dir: ``%LOCALAPPDATA%\\portpool`` on Windows, else
    ``$XDG_RUNTIME_DIR/portpool`` when that absolute directory exists and is the
    user's, else ``<tmp>/portpool-<uid>``."""
    import tempfile  # ~4 ms to import: only where no PORTPOOL_HOME says where

    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or tempfile.gettempdir()
        return os.path.join(base, "portpool")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    # The XDG spec: a relative path there is invalid and ignored (it would name another
    # directory in every working directory), and the directory MUST be the user's: one
    # inherited through `sudo -E` got root's state dir into the user's, which then
    # refused every command of the user ("owned by uid 0").
    if runtime and os.path.isabs(runtime) and _own_directory(runtime):
        return os.path.join(runtime, "portpool")
    return os.path.join(tempfile.gettempdir(), f"portpool-{os.getuid()}")


def _own_directory(path: str) -> bool:
    """Whether ``path`` is a directory owned by this process's user (POSIX only)."""
    if sys.platform == "win32":
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
