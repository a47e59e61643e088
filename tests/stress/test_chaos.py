"""The chaos harness in CI size: 48 processes, SIGKILLs, 120 s, every count zero.

``python -m benchmarks.chaos`` runs as long as asked; here it runs for two minutes with
at least 48 workers, checked by its kernel-reading checker (see benchmarks/chaos.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 120
WORKERS = 48


def _chaos(
    tmp_path: Path, timeout_s: float, *args: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``python -m benchmarks.chaos ARGS`` with a state dir and a JSON report in
    ``tmp_path``; its result and the report's path."""
    report = tmp_path / "chaos.json"
    argv = [sys.executable, "-m", "benchmarks.chaos", *args]
    argv += ["--state", str(tmp_path / "state"), "--json", str(report)]
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    return done, report


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 240)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the checker reads /proc")
def test_chaos_two_minutes_48_workers_all_counts_zero(tmp_path: Path) -> None:
    done, report = _chaos(
        tmp_path, SECONDS + 200, "--seconds", str(SECONDS), "--workers", str(WORKERS)
    )
    assert report.exists(), done.stdout + done.stderr
    doc = json.loads(report.read_text())
    counts, stats = doc["counts"], doc["stats"]
    assert counts == dict.fromkeys(counts, 0), (counts, doc["details"], done.stderr[-4000:])
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert doc["config"]["workers"] >= 48
    assert stats["elapsed_s"] >= SECONDS
    # Real work happened: many acquisitions of both kinds, dozens of kills in every phase,
    # and the probes that check a victim's port and slot came free.
    assert stats["acquisitions"] > 300, stats
    assert stats["instances"] > 100, stats
    assert stats["port_leases"] > 100, stats
    assert stats["kills"] > 50, stats
    assert stats["kills_acquiring"] > 5, stats
    assert stats["kills_holding"] > 5, stats
    assert stats["probes"] > 20, stats
    assert stats["samples"] > 100, stats


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the checker reads /proc")
def test_chaos_checker_counts_a_rule_breaker(tmp_path: Path) -> None:
    """The checker is not vacuous: a process that listens on pool ports without their lock
    and flocks lock files without listening is counted, and the run fails."""
    done, report = _chaos(
        tmp_path, 200, "--seconds", "15", "--workers", "8", "--rogue", "1", "--quiet"
    )
    doc = json.loads(report.read_text())
    assert done.returncode == 1, done.stdout + done.stderr[-4000:]
    assert doc["ok"] is False
    assert doc["counts"]["listen_without_lock"] > 0, doc["counts"]
    assert doc["counts"]["lock_without_listen"] > 0, doc["counts"]
