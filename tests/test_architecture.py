"""The layout rules of docs/architecture.md that import-linter does not check.

Bugs these catch: a module that reaches into another's private helpers (`from .lens import
_replay`, as a bench once did), and a module that grows back into a 1,200-line file.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "steerdiff"
MAX_LINES = 450  # "about 400": a little slack, so a docstring does not fail CI


def python_files() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    return [f for f in files if f.parent.name != "data"]  # data/ holds a maintainer script


def private_imports(path: Path) -> list[str]:
    """`from <steerdiff module> import _name` statements in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").startswith("steerdiff")
            names = [a.name for a in node.names if a.name.startswith("_") and a.name[:2] != "__"]
            if ours and names:
                found.append(f"{path}:{node.lineno} imports {names}")
    return found


def test_private_import_check_sees_one(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from .lens import _replay, activation_difference_lens\n"
        "from steerdiff.fit import fit\n"
        "from os import _exit\n"  # not ours: allowed
    )
    assert private_imports(bad) == [f"{bad}:1 imports ['_replay']"]


def test_no_module_imports_another_modules_private_names() -> None:
    found = [line for f in python_files() for line in private_imports(f)]
    assert not found, "import public names only:\n" + "\n".join(found)


def test_no_package_module_is_oversized() -> None:
    sizes = {
        str(f.relative_to(ROOT)): len(f.read_text().splitlines())
        for f in python_files()
        if f.is_relative_to(PACKAGE)
    }
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not big, f"split these into one-concept modules (<= ~400 lines): {big}"
