"""The floors of the house: which package may import which, and where DP code lives.

bench > app > clients > strategies > secagg > privacy, data; nothing imports upward.
``privacy/`` is numpy and dp-accounting only: no TensorFlow, no Flower, no
app or client code; ``strategies/`` holds no noise or accounting code of its own.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: package -> top-level packages it must never import.
FORBIDDEN = {
    "privacy": {"app", "clients", "strategies", "data", "bench", "tensorflow", "keras",
                "tf_keras", "tensorflow_privacy", "flwr"},
    "strategies": {"app", "clients", "data", "bench", "tensorflow", "keras", "tf_keras",
                   "tensorflow_privacy"},
    "data": {"app", "clients", "strategies", "bench", "privacy"},
    "clients": {"app", "bench"},
    "secagg": {"app", "clients", "strategies", "data", "bench", "tensorflow", "keras",
               "tf_keras", "tensorflow_privacy"},
}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every absolute import in a module (including function-level ones)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_floor_above_it(package: str) -> None:
    offences = {
        str(path.relative_to(REPO)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in sorted((REPO / package).glob("*.py"))
    }
    assert {k: v for k, v in offences.items() if v} == {}


def test_importing_privacy_loads_neither_tensorflow_nor_flower() -> None:
    """Checked in a fresh interpreter: what a module pulls in transitively counts too."""
    modules = sorted(p.stem for p in (REPO / "privacy").glob("*.py") if p.stem != "__init__")
    code = (
        "import sys\n"
        + "".join(f"import privacy.{name}\n" for name in modules)
        + "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'tensorflow', 'keras', 'flwr', 'app', 'clients', 'strategies'})\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_the_client_app_module_loads_no_tensorflow_and_no_accountant() -> None:
    """A deployed SuperNode starts a process per message: the module must load fast.

    TensorFlow (5-15 s) is imported when a message needs the model;
    dp-accounting (~2 s with scipy.signal) when an epsilon is computed.
    """
    code = (
        "import sys\n"
        "import app.client_app\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'tensorflow', 'keras', 'dp_accounting', 'tensorflow_privacy'})\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


NOISE_OR_ACCOUNTING = (
    ".normal(", "standard_normal", "gauss", "dp_accounting", "RdpAccountant",
    "PLDAccountant", "compute_epsilon", "default_rng()", "SeedSequence(",
)


def test_strategies_hold_no_noise_or_accounting_code_of_their_own() -> None:
    offences = [
        f"{path.name}: {needle}"
        for path in sorted((REPO / "strategies").glob("*.py"))
        for needle in NOISE_OR_ACCOUNTING
        if needle in path.read_text(encoding="utf-8")
    ]
    assert offences == []


def test_data_has_no_import_circle() -> None:
    """``data/federation.py`` <-> ``data/public_slice.py`` imported each other."""
    federation = imported_modules(REPO / "data" / "federation.py")
    public_slice = imported_modules(REPO / "data" / "public_slice.py")
    assert not ("public_slice" in federation and "federation" in public_slice)


def imported_modules(path: Path) -> set[str]:
    """Last components of every module a file imports, relative imports included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[-1])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[-1] for alias in node.names)
    return names
