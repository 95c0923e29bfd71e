"""The distribution's metadata: license, extras, and what the test suite needs installed."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]
METADATA = importlib.metadata.metadata("stalk")


def requirements(extra: str | None) -> set[str]:
    """The distributions ``stalk`` requires with ``extra`` (``None``: without any extra)."""
    found = set()
    for line in METADATA.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None:
            wanted = extra is None
        elif extra is None:
            wanted = marker.evaluate({"extra": ""})
        else:
            wanted = marker.evaluate({"extra": extra}) and not marker.evaluate({"extra": ""})
        if wanted:
            found.add(requirement.name.lower())
    return found


def test_license_is_mit_and_shipped() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the stalk authors\n")
    assert METADATA["License-Expression"] == "MIT"
    assert METADATA.get_all("License-File") == ["LICENSE"]


def test_extras() -> None:
    assert set(METADATA.get_all("Provides-Extra") or []) == {"trio", "test", "dev", "docs"}
    assert requirements(None) == {"noiseprotocol", "cryptography", "msgpack", "anyio"}
    assert requirements("trio") == {"trio"}
    assert requirements("dev") == {"ruff", "mypy", "msgpack-types"}
    assert requirements("docs") == {"sphinx", "myst-parser", "furo"}
    assert "ruff" not in requirements("test")
    # `make test` runs lint, typecheck, the tests and the docs build: its virtualenv gets
    # the three extras.
    assert re.search(r"pip install .* -e '\.\[test,dev,docs\]'", (ROOT / "Makefile").read_text())


def imported_roots(path: Path) -> set[str]:
    """The top-level modules a Python file imports (absolute imports only)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_test_extra_provides_every_third_party_import_of_the_tests() -> None:
    local = {path.stem for path in (ROOT / "tests").rglob("*.py")} | {"stalk", "adversarial"}
    imported = set().union(*map(imported_roots, (ROOT / "tests").rglob("*.py")))
    third_party = imported - set(sys.stdlib_module_names) - local
    by_module = importlib.metadata.packages_distributions()
    provided = requirements(None) | requirements("test")
    missing = {
        module
        for module in third_party
        if not {name.lower() for name in by_module.get(module, [])} & provided
    }
    assert third_party >= {"pytest", "hypothesis", "trio", "dissononce"}
    assert missing == set()
