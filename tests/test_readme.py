"""Every code block of the README runs as written.

The blocks run in order in one scratch directory with a private PORTPOOL_HOME. A block
whose first line is ``# file: NAME`` (``// file: NAME`` in JavaScript) is a file: it is
saved under NAME and checked (a TOML layout must load, Python must compile, JavaScript
must pass ``node --check``). Every other block is run (shell with bash, Python, Node)
and must exit 0. A block preceded by the line ``<!-- fragment -->`` is skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from portpool.layout import load_layout

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FRAGMENT = "<!-- fragment -->"
LANGUAGES = {
    "sh": "sh",
    "bash": "sh",
    "shell": "sh",
    "console": "sh",
    "python": "python",
    "py": "python",
    "toml": "toml",
    "js": "js",
    "javascript": "js",
    "node": "js",
}
_FENCE = re.compile(r"^```(\S*)\s*$")
_TEST_FUNCTION = re.compile(r"^def (test_\w+)\(", re.MULTILINE)
_FILE = re.compile(r"^(?:#|//) file: (\S+)\s*$")
BLOCK_TIMEOUT_S = 120


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str  # "" when the fence names none
    text: str
    fragment: bool

    @property
    def file_name(self) -> str | None:
        first = self.text.split("\n", 1)[0]
        found = _FILE.match(first)
        return found.group(1) if found else None


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"README line {start + 1}: code block never closed"
        fragment = start > 0 and lines[start - 1].strip() == FRAGMENT
        blocks.append(Block(start + 1, opening.group(1), "\n".join(body) + "\n", fragment))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def test_every_block_is_runnable_or_marked() -> None:
    assert len(BLOCKS) >= 8
    for block in BLOCKS:
        if block.fragment:
            continue
        assert block.language in LANGUAGES, (
            f"README line {block.line}: a ```{block.language} block cannot be run; "
            f"use one of {sorted(LANGUAGES)} or mark it {FRAGMENT}"
        )
    # `make run` / `make test` are a fragment: running them here would run the suite again.
    assert BLOCKS[0].fragment
    assert "make run" in BLOCKS[0].text
    assert "make test" in BLOCKS[0].text
    assert sum(not b.fragment for b in BLOCKS) > 2 * sum(b.fragment for b in BLOCKS)
    # The README names its only two fragments: a third must be named there too.
    fragments = [b for b in BLOCKS if b.fragment]
    assert len(fragments) == 2 and "initdb" in fragments[1].text, [b.line for b in fragments]


def test_parser_sees_fragments_and_files() -> None:
    text = "x\n<!-- fragment -->\n```sh\nrm -rf /\n```\n\n```js\n// file: a.js\n1\n```\n"
    parsed = readme_blocks(text)
    assert [(b.line, b.language, b.fragment, b.file_name) for b in parsed] == [
        (3, "sh", True, None),
        (7, "js", False, "a.js"),
    ]


def test_a_block_of_tests_runs_its_tests(tmp_path: Path) -> None:
    # Run as a script, a block of pytest tests defined them and exited 0: the README's
    # pytest examples were never run, and one that broke still passed here.
    env = _env(tmp_path / "state")
    failing = Block(7, "python", "def test_it():\n    assert 1 == 2\n", False)
    with pytest.raises(AssertionError, match="README line 7: exit 1"):
        _run_python(failing, tmp_path, env)
    skipped = Block(9, "python", "import pytest\n\n\ndef test_it():\n    pytest.skip()\n", False)
    with pytest.raises(AssertionError, match="test_it did not pass"):
        _run_python(skipped, tmp_path, env)
    two = "def test_it():\n    pass\n\n\ndef test_too():\n    pass\n"
    passing = Block(11, "python", two, False)
    assert "2 passed" in _run_python(passing, tmp_path, env)


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PORTPOOL_HOME"] = str(home)
    # `portpool`, `python3` and `pip` of the environment running the tests come first,
    # as they do for a user with the project's venv activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("LISTEN_FDS", None)
    return env


def _run(argv: list[str], block: Block, cwd: Path, env: dict[str, str]) -> str:
    try:
        done = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"README line {block.line}: block still running after {BLOCK_TIMEOUT_S} s:\n"
            f"{block.text}\nstdout: {e.stdout!r}\nstderr: {e.stderr!r}"
        ) from None
    assert done.returncode == 0, (
        f"README line {block.line}: exit {done.returncode}\n{block.text}\n"
        f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )
    return done.stdout


def _run_python(block: Block, cwd: Path, env: dict[str, str]) -> str:
    """Run a Python block: a block of pytest tests under pytest (as plain Python it
    only defined them, and a broken example passed), every test passing, else as a
    script."""
    script = cwd / f"readme_block_{block.line}.py"
    if not _TEST_FUNCTION.search(block.text):
        script.write_text(block.text)
        return _run([sys.executable, str(script)], block, cwd, env)
    script = cwd / f"test_readme_block_{block.line}.py"
    script.write_text(block.text)
    tests = _TEST_FUNCTION.findall(block.text)
    # -rA: every test's outcome by name, so one skipped or never collected is seen.
    # A leaked pipe or socket fails it: the worker example left its stdout open.
    argv = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"]
    argv += ["-W", "error::ResourceWarning"]
    argv += ["-W", "error::pytest.PytestUnraisableExceptionWarning", str(script)]
    out = _run(argv, block, cwd, env)
    for name in tests:
        assert f"PASSED {script.name}::{name}" in out, (
            f"README line {block.line}: {name} did not pass\n{block.text}\n--- pytest\n{out}"
        )
    return out


def _check_file(block: Block, path: Path, cwd: Path, env: dict[str, str]) -> None:
    kind = LANGUAGES[block.language]
    if kind == "toml":
        load_layout(str(path))  # raises LayoutError naming the key
    elif kind == "python":
        compile(block.text, str(path), "exec")
    elif kind == "js":
        node = shutil.which("node")
        if node is not None:
            _run([node, "--check", str(path)], block, cwd, env)


def test_readme_blocks_run_as_written(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = _env(tmp_path / "state")
    node = shutil.which("node")
    ran: dict[str, int] = {}
    outputs: list[str] = []
    try:
        for block in BLOCKS:
            if block.fragment:
                continue
            kind = LANGUAGES[block.language]
            name = block.file_name
            if name is not None:
                path = work / name
                path.write_text(block.text)
                _check_file(block, path, work, env)
                continue
            if kind == "sh":
                outputs.append(
                    _run(["bash", "-euo", "pipefail", "-c", block.text], block, work, env)
                )
            elif kind == "python":
                outputs.append(_run_python(block, work, env))
            elif kind == "js":
                if node is None:
                    continue  # reported below: the README's Node block needs node
                script = work / f"readme_block_{block.line}.js"
                script.write_text(block.text)
                outputs.append(_run([node, str(script)], block, work, env))
            else:  # a TOML block that is not a file: it must be a valid layout
                path = work / f"readme_block_{block.line}.toml"
                path.write_text(block.text)
                load_layout(str(path))
            ran[kind] = ran.get(kind, 0) + 1
    finally:
        # A block that failed half-way must not leave a detached instance behind.
        if (work / "portpool.toml").exists():
            subprocess.run(
                [sys.executable, "-m", "portpool.cli", "stop", "--all", "--timeout", "30"],
                cwd=work, env=env, capture_output=True, timeout=60, check=False,
            )  # fmt: skip
    everything = "".join(outputs)
    # What the examples print when they did what they say.
    assert "is up" in everything
    assert '"instance": "1"' in everything  # the api-server answered over HTTP
    assert "hello from portpool" in everything  # the library example served and asked
    assert ran.get("sh", 0) >= 3
    assert ran.get("python", 0) >= 2
    # The pytest examples (aiohttp, uvicorn, http.server, the factory, the instance) ran.
    test_blocks = [b for b in BLOCKS if not b.fragment and _TEST_FUNCTION.search(b.text)]
    assert len(test_blocks) >= 5
    assert everything.count(" passed in ") == len(test_blocks), everything
    if node is None:
        pytest.skip("node is not installed: the README's Node example was only saved, not run")
    assert "api-server of instance" in everything
