"""Every hostile input through every command that accepts it.

Each case must end the same way whatever the command: exit 2, ONE line on stderr naming the
file and the problem, no traceback, nothing written (no output, no temporary file beside it),
the input untouched and no pickle code run. The corpus is built in tmp_path (corpus.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error
from corpus import Case, model_cases
from corpus_data import data_cases, data_model, good_data

COMMANDS = ("inspect", "fold", "check", "recalibrate", "bench", "optimize")
MODEL_CASES = sorted(model_cases(Path("unused")))
DATA_CASES = sorted(data_cases(Path("unused")))

# Where bncheck misbehaved: (case, command) → reason, as strict xfails so a fix shows up.
# Empty now: each bug the corpus found was fixed in the loader it came from.
KNOWN_BUGS: dict[tuple[str, str], str] = {}
DATA_BUGS: dict[tuple[str, str], str] = {}


def _data_params():
    for name in DATA_CASES:
        for command in ("check", "recalibrate", "fold"):
            reason = DATA_BUGS.get((name, command))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(name, command, marks=marks, id=f"{name}-{command}")


def _model_params():
    for name in MODEL_CASES:
        for command in COMMANDS:
            reason = KNOWN_BUGS.get((name, command))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(name, command, marks=marks, id=f"{name}-{command}")


def registered(command: str) -> bool:
    import typer

    from bncheck.cli import app

    return command in typer.main.get_command(app).commands  # type: ignore[attr-defined]


def need(command: str) -> None:
    if not registered(command):
        pytest.skip(f"`bncheck {command}` is not registered yet")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links not followed) → sha256 of its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = f"link:{p.readlink()}"
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(folder))] = "dir"
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Builds each model case once per module (a .pt2 export takes a second), on demand."""
    root = tmp_path_factory.mktemp("corpus")
    marker = root / "PWNED"
    builders = model_cases(marker)
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = builders[name](root / name)
        return built[name]

    get.marker = marker  # type: ignore[attr-defined]
    get.root = root  # type: ignore[attr-defined]
    return get


@pytest.fixture(scope="module")
def good_inputs(tmp_path_factory) -> dict[str, Path]:
    """Valid data for each framework, so check/recalibrate fail on the model, not the data."""
    d = tmp_path_factory.mktemp("gooddata")
    np.save(d / "onnx.npy", good_data(8, cin=2))
    np.save(d / "torch.npy", np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype("f4"))
    return {"onnx": d / "onnx.npy", "torch": d / "torch.npy"}


def command_line(command: str, case: Case, data: Path) -> list:
    folder = case.path.parent
    if command == "inspect":
        return ["inspect", case.path, *case.args]
    if command == "fold":
        out = folder / ("folded.onnx" if case.framework == "onnx" else "folded.pt2")
        return ["fold", case.path, "-o", out, *case.args]
    if command == "check":
        return ["check", case.path, "--data", data, *case.args]
    if command == "recalibrate":
        out = folder / f"recal{case.path.suffix or '.onnx'}"
        return ["recalibrate", case.path, "--data", data, "-o", out, *case.args]
    if command == "optimize":
        out = folder / ("optimized.onnx" if case.framework == "onnx" else "optimized.pt2")
        return ["optimize", case.path, "--data", data, "-o", out, "--no-bench", *case.args]
    return ["bench", case.path, *case.args]


@pytest.mark.parametrize(("name", "command"), list(_model_params()))
def test_hostile_model(run_cli, corpus, good_inputs, name, command):
    need(command)
    case = corpus(name)
    folder = case.path.parent.parent if name.startswith("external_") else case.path.parent
    before = snapshot(folder)
    result = run_cli(*command_line(command, case, good_inputs[case.framework]))
    assert_clean_error(result, *case.needles)
    assert snapshot(folder) == before, "a file was written, removed or changed"
    assert not corpus.marker.exists(), "pickle code ran"


@pytest.mark.parametrize("command", COMMANDS)
def test_trust_pickle_in_pyproject_ignored(run_cli, corpus, good_inputs, monkeypatch, command):
    """A pull request controls pyproject.toml: trust-pickle there is ignored, with a warning."""
    need(command)
    case = corpus("pickle_zip")
    folder = case.path.parent
    before = snapshot(folder)
    (folder / "pyproject.toml").write_text("[tool.bncheck]\ntrust-pickle = true\n")
    monkeypatch.chdir(folder)
    monkeypatch.delenv("BNCHECK_TRUST_PICKLE", raising=False)
    try:
        result = run_cli(*command_line(command, case, good_inputs["torch"]))
    finally:
        (folder / "pyproject.toml").unlink()
    assert result.code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 2, result.err  # the warning, then the error
    assert lines[0].startswith("bncheck: warning: ") and "ignoring 'trust-pickle'" in lines[0]
    assert lines[1].startswith("bncheck: error: ") and "--trust-pickle" in lines[1]
    assert "Traceback" not in result.err
    assert snapshot(folder) == before
    assert not corpus.marker.exists()


# ---- bad data ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_for_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("datamodel")
    p = d / "m.onnx"
    p.write_bytes(data_model().SerializeToString())
    return p


DATA_COMMANDS = ("check", "recalibrate", "fold")


def data_command_line(command: str, model: Path, data: Path, out_folder: Path) -> list:
    if command == "check":
        return ["check", model, "--data", data]
    if command == "recalibrate":
        return ["recalibrate", model, "--data", data, "-o", out_folder / "recal.onnx"]
    return ["fold", model, "--data", data, "-o", out_folder / "folded.onnx"]


@pytest.mark.parametrize(("name", "command"), list(_data_params()))
def test_bad_data(run_cli, model_for_data, tmp_path, name, command):
    need(command)
    marker = tmp_path / "PWNED"
    data, needles = data_cases(marker)[name](tmp_path / "data")
    before, model_before = snapshot(tmp_path), model_for_data.read_bytes()
    result = run_cli(*data_command_line(command, model_for_data, data, tmp_path))
    assert_clean_error(result, *needles)
    assert snapshot(tmp_path) == before
    assert model_for_data.read_bytes() == model_before
    assert not marker.exists()


def test_recalibrate_one_sample_says_why(run_cli, model_for_data, tmp_path):
    """The variance of one sample is undefined: refuse, and say so, rather than write NaN."""
    need("recalibrate")
    data = tmp_path / "one.npy"
    np.save(data, good_data(1))
    before = snapshot(tmp_path)
    result = run_cli("recalibrate", model_for_data, "--data", data, "-o", tmp_path / "r.onnx")
    assert_clean_error(result, "one.npy")
    line = result.err.lower()
    assert "1 sample" in line or "one sample" in line, result.err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ("check", "fold"))
def test_one_sample_is_enough_without_batch_statistics(run_cli, model_for_data, tmp_path, command):
    """check and fold only run inference on the data: one sample is a valid, if small, input."""
    need(command)
    data = tmp_path / "one.npy"
    np.save(data, good_data(1))
    args = data_command_line(command, model_for_data, data, tmp_path)
    result = run_cli(*args, "--format", "json")
    assert result.code in (0, 1), result
    assert "Traceback" not in result.err
