"""Where a user's private state lives by default, and whether POSIX modes guard it."""

from __future__ import annotations

import os
import sys


def posix_modes() -> bool:
    """Whether POSIX modes keep a directory private here. False on Windows, where the
    ACLs of %LOCALAPPDATA% do and POSIX modes mean little."""
    return sys.platform != "win32"


def default_state_dir() -> str:
    """The per-user default state dir: ``%LOCALAPPDATA%\\portpool`` on Windows, else
    ``$XDG_RUNTIME_DIR/portpool`` when that absolute directory exists, else
    ``<tmp>/portpool-<uid>``."""
    import tempfile  # ~4 ms to import: only where no PORTPOOL_HOME says where

    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or tempfile.gettempdir()
        return os.path.join(base, "portpool")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    # The XDG spec: a relative path there is invalid and ignored (it would name another
    # directory in every working directory).
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return os.path.join(runtime, "portpool")
    return os.path.join(tempfile.gettempdir(), f"portpool-{os.getuid()}")
