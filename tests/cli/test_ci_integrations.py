"""The files that put bncheck into CI: ``.pre-commit-hooks.yaml`` (checked with pre-commit's own
manifest schema, then run as pre-commit runs it) and ``action.yml`` (parsed, its options checked
against the real ``inspect`` command, and its bncheck step's script run in bash as the runner
would run it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_onnx_model

yaml = pytest.importorskip("yaml") if not os.environ.get("CI") else __import__("yaml")


def _inspect_options() -> set[str]:
    import typer

    from bncheck.cli import app

    command = typer.main.get_command(app).commands["inspect"]
    return {opt for p in command.params for opt in getattr(p, "opts", [])}


def _repo(tmp_path: Path) -> Path:
    import onnx

    repo = tmp_path / "repo"
    (repo / "models/a").mkdir(parents=True)
    onnx.save(tiny_onnx_model(), repo / "models/a/good.onnx")
    (repo / "models/bad.onnx").write_bytes(b"\x08\x07\x12")  # cut short: unreadable
    (repo / "README.md").write_text("Models.\n")
    (repo / "pyproject.toml").write_text("[tool.bncheck]\n")
    return repo


# ---- pre-commit ---------------------------------------------------------------------------


def test_pre_commit_manifest_is_valid():
    path = ROOT / ".pre-commit-hooks.yaml"
    if os.environ.get("CI"):
        from pre_commit.clientlib import load_manifest
    else:
        load_manifest = pytest.importorskip("pre_commit.clientlib").load_manifest
    (hook,) = load_manifest(str(path))  # raises on anything pre-commit would refuse
    assert hook["id"] == "bncheck"
    assert hook["entry"] == "bncheck inspect"
    assert hook["language"] == "python" and hook["require_serial"] is True
    files = re.compile(hook["files"])
    for name in ("m.onnx", "a/b/m.pt2", "w.pt", "w.pth", "w.safetensors"):
        assert files.search(name), name
    for name in ("README.md", "calib.npy", "calib.npz", "m.onnx.data", "notes.txt"):
        assert not files.search(name), name


def test_pre_commit_hook_runs_like_pre_commit_runs_it(run_cli, tmp_path, monkeypatch):
    hook = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())[0]
    repo = _repo(tmp_path)
    monkeypatch.chdir(repo)
    staged = ["README.md", "models/a/good.onnx", "models/bad.onnx"]
    files = [f for f in staged if re.search(hook["files"], f)]
    assert files == ["models/a/good.onnx", "models/bad.onnx"]
    command = hook["entry"].split()
    assert command[:2] == ["bncheck", "inspect"]
    ok = run_cli(*command[1:], "models/a/good.onnx")
    assert ok.code == 0, ok
    both = run_cli(*command[1:], *files)
    assert both.code == 2 and "models/bad.onnx" in both.err
    assert "2 models: 1 inspected, 1 unreadable" in both.out


# ---- GitHub Action ------------------------------------------------------------------------


def _action() -> dict:
    return yaml.safe_load((ROOT / "action.yml").read_text())


def test_action_is_a_composite_with_the_inputs_the_readme_names():
    action = _action()
    assert action["runs"]["using"] == "composite"
    assert {"paths", "fail-on", "args", "format"} <= set(action["inputs"])
    steps = action["runs"]["steps"]
    assert steps[0]["uses"].startswith("actions/setup-python@")
    assert any(s.get("uses", "").startswith("github/codeql-action/upload-sarif@") for s in steps)
    for step in steps:
        if "run" in step:
            assert step["shell"] == "bash"
            # Inputs reach scripts through env only: `${{ }}` inside a script is injectable.
            assert "${{" not in step["run"], step["name"]
    options = _inspect_options()
    script = next(s["run"] for s in steps if s.get("id") == "inspect")
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", script))
    assert used and used <= options, used - options
    assert re.findall(r"--format (\w+)", script) == ["sarif"]
    assert action["inputs"]["format"]["default"] == "github"


def _run_step(tmp_path: Path, repo: Path, **inputs: str) -> tuple[int, str, dict[str, str]]:
    """Run the action's bncheck step in bash, with `bncheck` on PATH as `pip install` puts it."""
    step = next(s for s in _action()["runs"]["steps"] if s.get("id") == "inspect")
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "bncheck"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m bncheck "$@"\n')
    shim.chmod(0o755)
    output = tmp_path / "github_output"
    output.write_text("")
    runner_temp = tmp_path / "runner_temp"
    runner_temp.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "GITHUB_OUTPUT": str(output),
        "RUNNER_TEMP": str(runner_temp),
        "OMP_NUM_THREADS": "1",
        "BNCHECK_PATHS": inputs.get("paths", "."),
        "BNCHECK_FAIL_ON": inputs.get("fail_on", "error"),
        "BNCHECK_FORMAT": inputs.get("format", "github"),
        "BNCHECK_ARGS": inputs.get("args", ""),
    }
    proc = subprocess.run(
        ["bash", "-e", "-c", step["run"]], cwd=repo, env=env, capture_output=True, text=True
    )
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    return proc.returncode, proc.stdout, outputs


def test_action_step_annotates_and_records_the_exit_code(tmp_path):
    repo = _repo(tmp_path)
    code, out, outputs = _run_step(tmp_path, repo, paths="models")
    assert code == 0  # the step itself succeeds; a later step exits with bncheck's code
    assert outputs["exit-code"] == "2"
    assert "::error file=models/bad.onnx,title=bncheck::could not be read" in out
    code, out, outputs = _run_step(tmp_path, repo, paths="models/a", args="--select BN1")
    assert outputs["exit-code"] == "0" and "1 model: 1 inspected" in out


def test_action_step_writes_sarif_for_upload(tmp_path):
    repo = _repo(tmp_path)
    code, out, outputs = _run_step(tmp_path, repo, paths="models", format="sarif")
    assert code == 0 and outputs["exit-code"] == "2" and out == ""  # all in the file
    doc = json.loads(Path(outputs["sarif-file"]).read_text())
    assert doc["version"] == "2.1.0"
    (note,) = doc["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert note["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "models/bad.onnx"
