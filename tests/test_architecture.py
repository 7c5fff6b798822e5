"""The package's layering, checked on its source: core → compression → backends → hf → evaluation → cli.

Each layer imports only layers before it (and the leaf packages ``config`` and ``io``); the tensor maths
(``core``, ``compression``) and the compute paths (``backends``) import no transformers. A module that breaks the
direction fails here with the line that does it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "chunked_decomp"
ORDER = ["core", "compression", "backends", "hf", "evaluation", "benchmarking", "cli"]
LEAVES = {"config", "io"}  # imported from anywhere, import nothing of the layers
NO_TRANSFORMERS = {"core", "compression", "backends", "config"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a source file, absolute names."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "chunked_decomp":
                out += [(node.lineno, f"chunked_decomp.{a.name}") for a in node.names]
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "chunked_decomp" and len(parts) > 1 else None


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layering(path: Path) -> None:
    rel = path.relative_to(PACKAGE)
    own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    problems = []
    for line, module in _imports(path):
        if own in NO_TRANSFORMERS and module.split(".")[0] == "transformers":
            problems.append(f"line {line}: {own}/ imports transformers ({module})")
        target = _layer(module)
        if target is None or target == own or target in LEAVES:
            continue
        if own in LEAVES:
            problems.append(f"line {line}: {own} is a leaf and imports {module}")
        elif own in ORDER and target in ORDER and ORDER.index(target) > ORDER.index(own):
            problems.append(f"line {line}: {own}/ imports {module}, a later layer")
    assert problems == [], f"{rel}: " + "; ".join(problems)


def test_every_module_sits_in_a_layer() -> None:
    loose = {p.name for p in PACKAGE.glob("*.py")} - {"__init__.py", "io.py"}
    assert loose == set()
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(
        ORDER
    ) | {"config"}
