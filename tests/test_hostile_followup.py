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


# ---------------------------------------------------------------- layout checks in bounded memory


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_AS is POSIX")
def test_many_services_sharing_one_huge_pool_are_rejected_in_bounded_memory(
    home: Path, tmp_path: Path
) -> None:
    """1,000 services sharing one 64,000-port pool: the checks once expanded every pool
    to its ports (64 million of them, 2.7 GB) and ended in a MemoryError traceback."""
    import resource

    lines = ['app = "big"', "max_instances = 1"]
    for i in range(1000):
        lines += [f"[services.s{i}]", "base = 1025", "size = 64000", "stride = 1"]
    config = tmp_path / "big.toml"
    config.write_text("\n".join(lines) + "\n")

    def one_gib() -> None:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = 1 << 30
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    for command in (["layout"], ["run"]):
        args = [*PORTPOOL, *command, "--config", str(config)]
        if command == ["run"]:
            args += ["--", sys.executable, "-c", "pass"]
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=120, preexec_fn=one_gib, check=False
        )
        assert done.returncode == 1, (command, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr
        out = done.stdout + done.stderr
        assert "in instance 1, s1's pool 1025..65024 and s0's pool 1025..65024 share" in out
        # The first overlaps in full, then how many more: a bounded report.
        assert "... and 499480 more overlaps" in out
        assert len(out.splitlines()) <= 25, out
