"""The dashboard in a real browser: two `portpool up`, headless Chromium, the rendered DOM.

Needs Debian's ``chromium`` (``.ci/run`` installs it); skips with a message where it is
missing. A screenshot is kept under ``artifacts/`` for people to look at.
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from test_services import ALL_SERVICES, Up, start_up, stop, stop_up, wait_up

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
BROWSER_TIMEOUT_S = 90
# Virtual time lets the page's script fetch and render (several refreshes) before the dump.
VIRTUAL_TIME_MS = "8000"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")


def browse(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        *args,
        url,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=True
    )


class DashboardDom(HTMLParser):
    """What the rendered page shows: its state, the instance cards and their service rows."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str | None] = {}
        self.summary: dict[str, str | None] = {}
        self.instances: dict[int, dict[str, str | None]] = {}
        self.services: dict[int, dict[str, dict[str, str | None]]] = {}
        self._card: int | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "body":
            self.body = a
        elif a.get("id") == "summary":
            self.summary = a
        elif tag == "article" and "instance" in classes:
            self._card = int(a["data-instance"] or 0)
            self.instances[self._card] = a
            self.services[self._card] = {}
        elif tag == "tr" and "service" in classes and self._card is not None:
            self.services[self._card][a["data-service"] or ""] = a


@pytest.mark.slow
def test_dashboard_shows_both_instances_healthy(home: Path, tmp_path: Path) -> None:
    chromium()
    logs = [tmp_path / "up1.log", tmp_path / "up2.log"]
    procs = [start_up(home, log) for log in logs]
    ups: list[Up] = []
    try:
        ups = [wait_up(home, p, log) for p, log in zip(procs, logs, strict=True)]
        ups.sort(key=lambda u: u.number)
        url = ups[0].url("api-server", "/")

        dump = browse(url, tmp_path / "profile-dom", "--dump-dom")
        dom = DashboardDom()
        dom.feed(dump.stdout)
        assert dom.body.get("data-state") == "ready", dump.stdout[:2000]
        assert sorted(dom.instances) == [1, 2]
        assert dom.instances[1]["data-self"] == "true"
        for up in ups:
            rows = dom.services[up.number]
            assert sorted(rows) == sorted(ALL_SERVICES)
            for name, row in rows.items():
                assert row["data-port"] == str(up.ports[name])
                assert row["data-pid"] == str(up.pids[name])
                assert row["data-healthy"] == "true", (up.number, name, row)
                assert (row["data-state"], row["data-restarts"]) == ("ready", "0"), row
        assert dom.summary["data-healthy"] == dom.summary["data-total"] == "12"

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        browse(url, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,900")
        assert shot.stat().st_size > 10_000
    finally:
        for proc in procs:
            stop(proc)
        for up in ups:
            stop_up(up)
