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


@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_help_and_version_import_no_machinery(argv: list[str]) -> None:
    # Start-up stays at the interpreter's floor only if nothing heavy loads before a command
    # runs: no framework, no numpy, not the api (whose bench module pulls in the backends).
    code = f"from bncheck.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    mods = _modules_after(code)
    heavy = {"torch", "onnxruntime", "onnx", "numpy", "bncheck.api", "bncheck.bench"}
    assert not heavy & mods, sorted(heavy & mods)
    assert not [m for m in mods if m.startswith(("bncheck.api.", "bncheck.backends"))]


def test_a_command_parses_its_options_without_pydantic() -> None:
    # typer 0.29 coerces every parameter through pydantic (~0.3 s a run on 2 cores); the
    # pin in pyproject.toml keeps a version that does not. This fails if that pin is lost.
    sample = ROOT / "sample_models" / "resnet.onnx"
    code = (
        "from bncheck.cli import main\ntry:\n"
        f"    main(['inspect', {str(sample)!r}, '-q', '--fail-on', 'never'])\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code"
    )
    mods = _modules_after(code)
    assert "bncheck.api._inspect" in mods  # the command did run
    assert not [m for m in mods if m.split(".")[0] in {"pydantic", "pydantic_core"}]
    # ...and loads only what it uses: a one-line report needs no rich console or table (0.05 s
    # of a 0.5 s run), static findings no math, data rules or onnxruntime
    unused = {"rich.console", "rich.table", "onnxruntime", "torch", "bncheck.numerics"}
    unused |= {"bncheck.mismatch", "bncheck.rules_data", "secrets"}
    assert not unused & mods, sorted(unused & mods)


def test_import_bncheck_is_lazy_but_complete() -> None:
    mods = _modules_after("import bncheck")
    assert not {"numpy", "bncheck.api"} & mods
    # ...and every public name still resolves, loading only its own module
    mods = _modules_after("import bncheck\nassert callable(bncheck.inspect)")
    assert "bncheck.api._inspect" in mods and "bncheck.api._bench" not in mods
    # every public name of bncheck and bncheck.api resolves to a real object
    code = (
        "import bncheck, bncheck.api\n"
        "for mod in (bncheck, bncheck.api):\n"
        "    for name in mod.__all__:\n"
        "        assert getattr(mod, name) is not None, name\n"
        "assert bncheck.fold is bncheck.api.fold\n"
    )
    _modules_after(code)
