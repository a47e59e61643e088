"""Fixtures shared by every test: a private PORTPOOL_HOME and free port blocks."""

from __future__ import annotations

import os
import random
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from portpool.statedir import StateDir


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state dir path, exported as PORTPOOL_HOME for this test and its children."""
    path = tmp_path / "state"
    monkeypatch.setenv("PORTPOOL_HOME", str(path))
    return path


@pytest.fixture
def state(home: Path) -> Iterator[StateDir]:
    """The opened state dir of ``home``."""
    opened = StateDir.open(str(home))
    yield opened
    opened.close()


def _block_is_free(base: int, size: int) -> bool:
    for port in range(base, base + size):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def find_free_block(size: int = 20, low: int = 20000, high: int = 30000) -> int:
    """The first port of ``size`` consecutive ports that are bindable right now.

    Below the ephemeral range, so outgoing connections do not wander into it.
    """
    rng = random.Random(os.getpid() ^ id(object()))
    for _ in range(200):
        base = rng.randrange(low, high - size)
        if _block_is_free(base, size):
            return base
    raise RuntimeError(f"no {size} free consecutive ports in {low}..{high}")


@pytest.fixture
def port_base() -> int:
    """The first of 20 consecutive free loopback ports, for this test's pools."""
    return find_free_block()


@pytest.fixture
def python() -> str:
    return sys.executable
