"""The layout is the architecture: a shared core, training and the service as leaves, the inference
engine in its own package. Checked on the source, so a stray import fails CI rather than a review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "training", "engine", "app", "bench")
FORBIDDEN = {
    "core": {"training", "engine", "app", "bench"},  # the middle: depends on nothing of ours
    "training": {"engine", "app", "bench"},  # training never imports the serving stack
    "engine": {"training", "app", "bench"},
    "app": {"training", "bench"},  # the service never imports training code
}


def imported_packages(package: str) -> dict[str, set[str]]:
    """file → our top-level packages it imports (anywhere in the file, lazy imports included)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names & set(PACKAGES)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layers(package: str) -> None:
    offending = {file: sorted(names & FORBIDDEN[package])
                 for file, names in imported_packages(package).items() if names & FORBIDDEN[package]}
    assert not offending, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {offending}"


def test_one_forward_definition_per_purpose() -> None:
    """GatedNet (core/model.py) trains and evaluates; CompactNet (engine/compact.py) serves."""
    defined = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name.endswith("Net"):
                    defined.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    assert defined == {"GatedNet": ["core/model.py"], "CompactNet": ["engine/compact.py"]}
