"""The package's own attributes as users and their type checkers see them."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import portpool


def test_version_comes_from_the_installed_metadata() -> None:
    assert portpool.__version__ == version("portpool")


def test_version_is_a_str_under_mypy_strict(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is a dev tool: pip install -e .[dev]")
    program = tmp_path / "uses_version.py"
    program.write_text("import portpool\n\nversion: str = portpool.__version__\n")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), program],
        cwd=tmp_path,  # no project config: what a user's mypy reads
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # It was "object", __getattr__'s return type: the assignment was an error.
    assert done.returncode == 0, done.stdout + done.stderr
