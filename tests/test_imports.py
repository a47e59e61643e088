"""What each entry point imports: ``import portpool`` and every CLI command load only
what they use.

Asserted on module names, never on times (the benchmark report, ``bench_cli``, turns
them into milliseconds). Each process runs with ``-X importtime``, which names every
module it imports; what a bare ``python -c pass`` imports in the same environment is
subtracted, so site hooks of the venv never count.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import write_layout

from portpool.instance import Instance, start_instance
from portpool.layout import load_layout
from portpool.statedir import StateDir

# The HTTP/ASGI/MCP stacks of the reference services and the integrations.
SERVER_STACKS = {
    "aiohttp",
    "anyio",
    "asyncio",
    "email",
    "fastapi",
    "h11",
    "http",
    "httpx",
    "mcp",
    "pydantic",
    "socketserver",
    "ssl",
    "starlette",
    "uvicorn",
    "websockets",
}
# click's parts for other uses: completion scripts, the test runner, pager/progress bar.
CLICK_OPTIONAL = {"click.shell_completion", "click.testing", "click._termui_impl"}
# What the read-only commands have no use for (each costs milliseconds of every start).
NOT_FOR_READING = {"psutil", "socket", "subprocess", "logging", "tempfile"}
# The CLI and its parts: all that `--help` may load of portpool (and _text, which
# imports nothing: how untrusted text is printed).
CLI_MODULES = {
    "portpool",
    "portpool.cli",
    "portpool._cli_common",
    "portpool._cli_control",
    "portpool._cli_inspect",
    "portpool._text",
}
LIBRARY = {
    "portpool.instance",
    "portpool.pool",
    "portpool.shield",
    "portpool._up",
    "portpool._platform._net",
    # reading a layout's restart key needs its words, not the supervisor's restart machinery
    "portpool._restart",
}


def imported(*argv: str, expect_status: int = 0) -> set[str]:
    """Every module a ``python ARGV`` process imports (by ``-X importtime``)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == expect_status, done.stderr[-2000:]
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            field = line.rsplit("|", 1)[-1].strip()
            if field != "package":  # the header line
                names.add(field)
    assert names, "no -X importtime output"
    return names


@pytest.fixture(scope="module")
def startup() -> set[str]:
    """What the interpreter itself imports here: never portpool's doing."""
    return imported("-c", "pass")


def roots(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def portpool_modules(modules: set[str]) -> set[str]:
    return {m for m in modules if m == "portpool" or m.startswith("portpool.")}


# The console script users type: its entry module (``_portpool_entry``) runs before the
# CLI and is part of what `portpool --help` loads; `-m portpool.cli` would skip it.
SCRIPT = Path(sys.executable).with_name("portpool")


def cli(*args: str) -> list[str]:
    """The ``portpool`` command as users type it, as arguments to this python."""
    assert SCRIPT.exists(), f"the console script {SCRIPT} is not installed"
    return [str(SCRIPT), *args]


def test_import_portpool_loads_only_the_package(startup: set[str]) -> None:
    loaded = imported("-c", "import portpool") - startup
    assert portpool_modules(loaded) == {"portpool"}
    assert not roots(loaded) & (SERVER_STACKS | NOT_FOR_READING | {"click", "threading"})


def test_public_names_load_on_first_use() -> None:
    code = (
        "import sys, portpool\n"
        "assert 'portpool.pool' not in sys.modules\n"
        "from portpool import Lease, PortPoolError\n"
        "assert Lease.__module__ == 'portpool.pool'\n"
        "assert PortPoolError.__module__ == 'portpool.errors'\n"
        "assert set(portpool.__all__) <= set(dir(portpool))\n"
        "try:\n"
        "    portpool.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "ns = {}\n"
        "exec('from portpool import *', ns)\n"
        "missing = set(portpool.__all__) - set(ns)\n"
        "assert not missing, missing\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


def test_help_loads_click_and_the_cli_only(startup: set[str]) -> None:
    for args in (["--help"], ["status", "--help"]):
        loaded = imported(*cli(*args)) - startup
        assert "click" in loaded  # the process did run the CLI
        assert "_portpool_entry" in loaded  # ... through the console script's entry point
        assert portpool_modules(loaded) <= CLI_MODULES, args
        assert not loaded & CLICK_OPTIONAL, args
        assert not roots(loaded) & (SERVER_STACKS | NOT_FOR_READING), args


@pytest.fixture
def live_instance(tmp_path: Path, home: Path, port_base: int) -> Iterator[tuple[Path, Instance]]:
    """A layout file and a live instance of it, held by this process."""
    config = write_layout(tmp_path / "portpool.toml", port_base)
    state = StateDir.open(str(home))
    instance = start_instance(load_layout(str(config)), state=state, heartbeat=False)
    try:
        yield config, instance
    finally:
        instance.release()
        state.close()


def test_read_only_commands_load_no_process_or_network_code(
    startup: set[str], live_instance: tuple[Path, Instance]
) -> None:
    config, instance = live_instance
    for args in (["status"], ["status", "--json"], ["layout"], ["gc"]):
        loaded = imported(*cli(*args, "--config", str(config))) - startup
        assert "portpool.layout" in loaded  # the command did run
        assert not portpool_modules(loaded) & LIBRARY, args
        assert not loaded & CLICK_OPTIONAL, args
        assert not roots(loaded) & (SERVER_STACKS | NOT_FOR_READING), args
    # ... and status did read the live instance's record.
    done = subprocess.run(
        [sys.executable, *cli("status", "--config", str(config))],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert f"alpha={instance.leases['alpha'].port}" in done.stdout


def test_run_starts_a_command_without_server_stacks(
    startup: set[str], tmp_path: Path, home: Path, port_base: int
) -> None:
    config = write_layout(tmp_path / "one.toml", port_base, services={"web": {}})
    marker = tmp_path / "ran"
    loaded = imported(*cli("run", "--config", str(config), "--", "touch", str(marker)))
    assert marker.exists()  # the command did run, with its instance acquired
    loaded -= startup
    assert "portpool.instance" in loaded
    # psutil loads only to find and stop what the command left running (a process tree
    # is psutil's job); a command that left nothing (no child of ours at all) needs
    # none of it, nor do identity and start.
    assert "psutil" not in roots(loaded)
    assert not loaded & CLICK_OPTIONAL
    assert not roots(loaded) & SERVER_STACKS
    # up's service keepers and readiness probes: run starts no service.
    assert not portpool_modules(loaded) & {
        "portpool._keeper",
        "portpool._readiness",
        "portpool._services",
    }


def test_up_starts_services_without_server_stacks(
    startup: set[str], tmp_path: Path, home: Path, port_base: int
) -> None:
    # A service that exits at once: up stops with exit 5 after loading what it needs.
    services = {"web": {"command": ["true"], "ready": "none"}}
    config = write_layout(tmp_path / "up.toml", port_base, services=services)
    loaded = imported(*cli("up", "--config", str(config)), expect_status=5) - startup
    assert {"portpool.instance", "portpool._services", "portpool._keeper"} <= loaded
    assert not loaded & CLICK_OPTIONAL
    assert not roots(loaded) & SERVER_STACKS
