"""Follow-ups to the hostile-input work: what a second look at each kind still broke.

Real files, real processes and a temporary PORTPOOL_HOME, like the rest of the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers import PORTPOOL, write_layout

# ---------------------------------------------------------------- out of descriptors


@pytest.mark.skipif(os.name != "posix", reason="ulimit -n is POSIX")
def test_every_low_descriptor_limit_is_one_line_of_error_never_a_traceback(
    home: Path, tmp_path: Path, port_base: int
) -> None:
    """With almost no descriptor left, the error path once had to load ``resource`` (a
    shared object: one more descriptor) and ended in an ImportError traceback."""
    import resource

    config = write_layout(tmp_path / "one.toml", port_base, services={"web": {}})
    failed = 0
    for limit in range(8, 14):

        def low_limit(limit: int = limit) -> None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

        done = subprocess.run(
            [*PORTPOOL, "run", "--config", str(config), "--", sys.executable, "-c", "pass"],
            capture_output=True, text=True, timeout=60, preexec_fn=low_limit, check=False,
        )  # fmt: skip
        if done.returncode == 0:
            continue
        failed += 1
        assert done.returncode == 1, (limit, done.stderr)
        assert done.stderr.startswith(
            f"portpool: error: out of open files (the limit is {limit}); this layout needs "
        ), (limit, done.stderr)
        assert done.stderr.count("\n") == 1, (limit, done.stderr)
    assert failed, "no limit was low enough to run out: the test proved nothing"
