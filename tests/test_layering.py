"""The import rules of docs/architecture.md: data flows one way, no stage imports a later one."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "shears"

# room -> rooms of shears it may import (besides itself)
ALLOWED = {
    "evaluation": set(),
    "pruning": set(),
    "quantization": {"pruning"},
    "adapters": {"quantization"},
    "training": {"adapters"},
    "search": {"adapters"},
    "export": {"adapters", "pruning", "quantization"},
    "atomic": set(),  # the atomic-write helper every room may use
}


def allowed(room: str, target: str) -> bool:
    """Whether ``room`` may import ``shears.<target>``: its own room, one it may import,
    or the atomic-write helper, which imports nothing of shears."""
    top = target.split(".")[0]
    return top == room or top == "atomic" or any(
        target == a or target.startswith(a + ".") for a in ALLOWED[room])


def room_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def shears_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n.removeprefix("shears.") for n in names if n.startswith("shears.")}
    return found


FILES = [p for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layering(path):
    room = room_of(path)
    for target in shears_imports(path):
        assert allowed(room, target), f"{path.relative_to(ROOT)} ({room}) imports shears.{target}"


def test_the_atomic_helper_imports_nothing_of_shears():
    assert shears_imports(ROOT / "atomic.py") == set()
