"""The dashboard in a real browser: two `portpool up`, headless Chromium, the rendered DOM.

Needs Debian's ``chromium`` (``.ci/run`` installs it); skips with a message where it is
missing. A screenshot is kept under ``artifacts/`` for people to look at.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import LineReader

from test_services import (
    ALL_SERVICES,
    PORTPOOL,
    Up,
    cli_env,
    start_up,
    status_json,
    stop,
    stop_up,
    wait_up,
)

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


# Every instance card: [id, scrollWidth, clientWidth], once the page has rendered.
CARD_WIDTHS_JS = """new Promise(done => { const t = setInterval(() => {
  if (document.body && document.body.dataset.state === "ready") {
    clearInterval(t);
    done(JSON.stringify([...document.querySelectorAll("article.instance")]
      .map(c => [c.id, c.scrollWidth, c.clientWidth])));
  } }, 100); })"""


def card_widths(url: str, profile: Path, window: str) -> list[list[Any]]:
    """Each instance card's id, scrollWidth and clientWidth in headless Chromium with a
    ``window`` ("1280,900") size, read over the DevTools protocol once it rendered."""
    import asyncio
    import re
    import urllib.request

    from websockets.asyncio.client import connect

    proc = subprocess.Popen(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={profile}",
         f"--window-size={window}", "about:blank"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        port = None
        for _ in range(200):  # Chromium says where it listens within its first lines
            found = re.search(r"ws://127\.0\.0\.1:(\d+)/", proc.stderr.readline())
            if found:
                port = int(found.group(1))
                break
        assert port is not None, "Chromium named no DevTools port"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10) as answer:
            page = next(t for t in json.load(answer) if t["type"] == "page")

        async def measure() -> list[list[Any]]:
            async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                calls = 0

                async def call(method: str, **params: Any) -> dict[str, Any]:
                    nonlocal calls
                    calls += 1
                    await ws.send(json.dumps({"id": calls, "method": method, "params": params}))
                    while True:
                        message = json.loads(await ws.recv())
                        if message.get("id") == calls:
                            return dict(message)

                await call("Page.navigate", url=url)
                done = await call(
                    "Runtime.evaluate",
                    expression=CARD_WIDTHS_JS,
                    awaitPromise=True,
                    returnByValue=True,
                )
                return list(json.loads(done["result"]["result"]["value"]))

        return asyncio.run(asyncio.wait_for(measure(), BROWSER_TIMEOUT_S))
    finally:
        proc.kill()
        proc.wait(timeout=10)


class DashboardDom(HTMLParser):
    """What the rendered page shows: its state, the instance cards and their service rows."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str | None] = {}
        self.summary: dict[str, str | None] = {}
        self.instances: dict[int, dict[str, str | None]] = {}
        self.services: dict[int, dict[str, dict[str, str | None]]] = {}
        self._card: int | None = None
        self._row: dict[str, str | None] | None = None
        self._in_state = False

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
            self._row = a
        elif tag == "td" and "state" in classes and self._row is not None:
            self._in_state = True  # its text, as shown: "state-text"
            self._row["state-text"] = ""

    def handle_data(self, data: str) -> None:
        if self._in_state and self._row is not None:
            self._row["state-text"] = (self._row.get("state-text") or "") + data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_state = False


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

        # Every column fits a card: at 1280 px two 596 px cards clipped the state column.
        for window in ("1280,900", "1920,1000"):
            widths = card_widths(url, tmp_path / f"profile-{window}", window)
            assert len(widths) == 2
            for card, scroll_width, client_width in widths:
                assert scroll_width <= client_width, (window, card, scroll_width, client_width)

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


@pytest.mark.slow
def test_a_stopped_instance_is_shown_but_not_counted_as_down(home: Path, tmp_path: Path) -> None:
    """The record of a killed instance stays until the next start or `gc`: its services
    counted as down, and the summary of a healthy app read "6 / 7 services healthy"."""
    chromium()
    log = tmp_path / "up.log"
    proc = start_up(home, log)
    up: Up | None = None
    killed = None
    try:
        up = wait_up(home, proc, log)
        # An `up` of the same app with one service, killed -9 once ready: its record
        # (the service "ready") stays, its lock is gone: "not running".
        layout = tmp_path / "one.toml"
        hold = [sys.executable, "-c", "import time; time.sleep(60)"]
        layout.write_text(
            'app = "qwen-valencia"\n[services.api-server]\nbase = 9000\nsize = 1\n'
            f'command = {json.dumps(hold)}\nready = "none"\n'
        )
        killed = subprocess.Popen(
            [PORTPOOL, "up", "--config", str(layout)],
            env=cli_env(home), cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        LineReader(killed).until(lambda line: line.endswith("is up"), 60)
        killed.kill()
        killed.wait(timeout=10)
        records = {i["number"]: i["alive"] for i in status_json(home)["instances"]}
        assert records == {up.number: True, up.number + 1: False}

        dump = browse(up.url("api-server", "/"), tmp_path / "profile", "--dump-dom")
        dom = DashboardDom()
        dom.feed(dump.stdout)
        assert dom.body.get("data-state") == "ready", dump.stdout[:2000]
        assert dom.instances[up.number + 1]["data-alive"] == "false"
        assert list(dom.services[up.number + 1]) == ["api-server"]  # shown, as stopped
        # Not "ready" beside "not running", as if it ran: `status` says "(was ready)".
        assert dom.services[up.number + 1]["api-server"]["state-text"] == "was ready"
        assert dom.services[up.number]["api-server"]["state-text"] == "ready"
        assert dom.summary["data-healthy"] == dom.summary["data-total"] == "6", dom.summary
        assert "ok" in (dom.summary.get("class") or "").split()
    finally:
        if killed is not None and killed.poll() is None:
            killed.kill()
            killed.wait()
        stop(proc)
        if up is not None:
            stop_up(up)
