"""The package arrows point one way (shared leaves sit below the packages that use them)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "shipyard"
FORBIDDEN = {
    "settings": {"router", "control", "engine", "gateway", "tasks", "evaluate", "bench", "prepare", "cli", "stack"},
    "engine": {"router", "control", "gateway", "tasks", "evaluate", "bench", "cli", "stack"},
    "router": {"control", "gateway", "tasks", "evaluate", "bench", "prepare", "cli", "stack", "ui"},
    "control": {"gateway", "tasks", "evaluate", "bench", "prepare", "cli", "stack", "ui"},
    "tasks": {"router", "control", "gateway", "evaluate", "bench", "cli", "stack"},
    "evaluate": {"bench", "gateway", "cli", "stack"},
    "bench": {"evaluate", "gateway", "cli", "stack"},
    "gateway": {"cli", "stack", "bench", "ui"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    """shipyard packages imported (anywhere, also inside functions) by each module of ``package``."""
    root = SRC / package if (SRC / package).is_dir() else SRC / f"{package}.py"
    found: dict[str, set[str]] = {}
    for path in [root] if root.is_file() else sorted(root.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            names |= {m.split(".")[1] for m in modules if m.startswith("shipyard.")}
        found[str(path.relative_to(SRC))] = names
    return found


def test_package_arrows_are_one_way() -> None:
    crossings = [
        f"{module} imports shipyard.{target}"
        for package, forbidden in FORBIDDEN.items()
        for module, targets in imports_of(package).items()
        for target in sorted(targets & forbidden)
    ]
    assert not crossings, crossings
