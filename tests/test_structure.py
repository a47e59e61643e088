"""The package's shape, as the design states it: small modules of one concern each, and
every module under the import-linter contracts that keep dependencies pointing down."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "portpool"
# "~450 lines at most": a module that grows past this is several modules.
MAX_LINES = 460
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_a_module_is_small_and_its_docstring_says_its_concern(path: Path) -> None:
    text = path.read_text()
    lines = text.count("\n")
    assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines (at most ~450)"
    doc = ast.get_docstring(ast.parse(text))
    assert doc and doc.splitlines()[0].strip(), f"{module_name(path)} has no docstring"


def test_every_module_is_under_a_layers_or_forbidden_contract() -> None:
    """A new module left out of pyproject's contracts could import upwards unnoticed."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    named: set[str] = set()
    for contract in config["contracts"]:
        for layer in contract.get("layers", []):
            named.update(m.strip() for m in layer.replace(":", "|").split("|"))
        named.update(contract.get("source_modules", []))
    missing = []
    for path in MODULES:
        name = module_name(path)
        # a package's modules are covered by the package; the package itself is the API
        covered = any(name == n or name.startswith(n + ".") for n in named)
        if name != "portpool" and not covered:
            missing.append(name)
    assert not missing, f"not in any import-linter contract of pyproject.toml: {missing}"


def test_layout_and_errors_may_import_no_layered_module() -> None:
    """Every module of the layers is in the forbidden list of layout and errors."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers, independent = config["contracts"][0], config["contracts"][1]
    layered = {m.strip() for layer in layers["layers"] for m in layer.replace(":", "|").split("|")}
    assert layered - set(independent["forbidden_modules"]) == set()


def test_every_public_callable_says_what_it_raises() -> None:
    """The package's functions document their errors (or that they raise none)."""
    import inspect

    import portpool

    for name in portpool.__all__:
        value = getattr(portpool, name)
        if inspect.isfunction(value):
            doc = inspect.getdoc(value) or ""
            assert "raise" in doc.lower(), f"portpool.{name}'s docstring names no errors"
        elif inspect.isclass(value):
            assert inspect.getdoc(value), f"portpool.{name} has no docstring"


def test_every_public_method_and_property_says_what_it_raises() -> None:
    """A public class's own methods and properties document their errors (or that they
    raise none); what tuple, NamedTuple or Exception define is theirs to document."""
    import functools
    import inspect

    import portpool

    inherited = set(dir(tuple)) | set(dir(Exception))
    missing = []
    for name in portpool.__all__:
        cls = getattr(portpool, name)
        if not inspect.isclass(cls):
            continue
        for attr, member in vars(cls).items():
            if attr.startswith("_") or attr in inherited:
                continue
            value = member.__func__ if isinstance(member, staticmethod | classmethod) else member
            if isinstance(value, property | functools.cached_property):
                doc = value.__doc__ or ""
            elif inspect.isfunction(value):
                doc = inspect.getdoc(value) or ""
            else:
                continue  # a field, a constant
            if "raise" not in doc.lower():
                missing.append(f"{name}.{attr}")
    assert not missing, f"docstrings that name no errors: {missing}"
