"""The core never imports a framework: numerics, rules, mismatch and layers stay pure."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

PURE = ["numerics", "rules", "mismatch", "layers"]
FORBIDDEN = {"torch", "onnx", "onnxruntime", "typer", "rich", "safetensors"}


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_import_no_framework(name):
    pkg = ROOT / "bncheck"
    files = [pkg / f"{name}.py"] if (pkg / f"{name}.py").exists() else []
    files += sorted((pkg / name).glob("*.py")) if (pkg / name).is_dir() else []
    assert files, f"bncheck/{name} is missing"
    for path in files:
        bad = FORBIDDEN.intersection(_imports(path))
        assert not bad, f"{path.name} imports {sorted(bad)}"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return set(out.stdout.split())


def test_help_does_not_import_torch():
    mods = _modules_after(
        "from bncheck.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert "torch" not in mods
    assert "onnxruntime" not in mods
