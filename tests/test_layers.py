"""The import direction of STYLE.md's layers, checked on the source (every import statement, lazy ones
included) and at run time (importing all of features/ loads neither torch nor mlflow).

common/ <- features/ <- fm/, experts/ <- fmx/ (CLI, DAG helpers, servers); dags/ is wiring nobody imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "common": {"features", "fm", "experts", "fmx", "dags", "airflow"},
    "features": {"torch", "mlflow", "fm", "experts", "fmx", "dags", "airflow"},
    "fm": {"experts", "fmx", "dags", "airflow"},
    "experts": {"fm", "fmx", "dags", "airflow"},
    "fmx": {"dags"},
}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (relative imports resolve to its own package)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(path.relative_to(ROOT).parts[0] if node.level else (node.module or "").split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package: str) -> None:
    wrong = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package])
             for f in sorted((ROOT / package).rglob("*.py"))}
    assert not {f: names for f, names in wrong.items() if names}, f"{package}/ imports a layer above it"


def test_the_data_layer_loads_no_torch_or_mlflow() -> None:
    modules = sorted(f"features.{f.stem}" for f in (ROOT / "features").glob("*.py") if f.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(n for n in ('torch', 'mlflow', 'airflow') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
