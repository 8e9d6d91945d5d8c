"""Bad input: exit 2, one line on stderr, no traceback, nothing written, input untouched."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import onnx
import pytest
from conftest import SAMPLES, assert_clean_error, tiny_onnx_model


class Payload:
    """Unpickling this creates the marker file: proof that pickle code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_missing_file(run_cli, tmp_path):
    assert_clean_error(run_cli("inspect", tmp_path / "nope.onnx"), "no such file")


def test_empty_file(run_cli, tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    assert_clean_error(run_cli("inspect", p), "empty")


@pytest.mark.parametrize("suffix", [".onnx", ".pt", ".pt2", ".safetensors", ".pth"])
def test_random_bytes(run_cli, tmp_path, suffix):
    p = tmp_path / f"random{suffix}"
    p.write_bytes(np.random.default_rng(1).bytes(4096))
    assert_clean_error(run_cli("inspect", p), str(p))


def test_text_file_named_pt(run_cli, tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("these are not weights\n")
    assert_clean_error(run_cli("inspect", p), "notes.pt")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_onnx(run_cli, tmp_path, fraction):
    data = tiny_onnx_model().SerializeToString()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: int(len(data) * fraction)])
    assert_clean_error(run_cli("inspect", p), "cut.onnx")


def test_graphless_onnx(run_cli, tmp_path):
    p = tmp_path / "nograph.onnx"
    p.write_bytes(onnx.helper.make_model(onnx.GraphProto()).SerializeToString())
    assert_clean_error(run_cli("inspect", p), "nograph.onnx")


@pytest.mark.parametrize("form", ["zip", "legacy", "raw"])
def test_pickle_is_refused_and_never_runs(run_cli, tmp_path, form):
    import torch

    marker = tmp_path / "PWNED"
    p = tmp_path / "model.pt"
    if form == "raw":
        p.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"model": Payload(marker)}, p, _use_new_zipfile_serialization=(form == "zip"))
    assert not marker.exists()
    before = hashlib.sha256(p.read_bytes()).hexdigest()
    result = run_cli("inspect", p)
    assert_clean_error(result, "--trust-pickle")
    assert not marker.exists(), "pickle code ran"
    assert hashlib.sha256(p.read_bytes()).hexdigest() == before


def test_external_data_outside_folder(run_cli, tmp_path):
    model = tiny_onnx_model()
    outside = tmp_path / "secret.bin"
    outside.write_bytes(np.zeros(54, np.float32).tobytes())
    folder = tmp_path / "m"
    folder.mkdir()
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", str(54 * 4))):
        entry = w.external_data.add()
        entry.key, entry.value = k, v
    p = folder / "model.onnx"
    p.write_bytes(model.SerializeToString())
    assert_clean_error(run_cli("inspect", p), "outside")


def test_nonexistent_arch(run_cli, tmp_path):
    import torch

    p = tmp_path / "sd.pt"
    torch.save({"conv.weight": torch.zeros(2, 2, 1, 1)}, p)
    assert_clean_error(run_cli("inspect", p, "--arch", "no_such_pkg.models:net"), "no_such_pkg")


def test_state_dict_without_arch(run_cli, tmp_path):
    import torch

    p = tmp_path / "sd.pt"
    torch.save({"conv.weight": torch.zeros(2, 2, 1, 1)}, p)
    assert_clean_error(run_cli("inspect", p), "--arch")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--format", "yaml"], "--format"),
        (["--fail-on", "sometimes"], "--fail-on"),
        (["--select", "BN999"], "BN999"),
        (["--input-shape", "1,a,3"], "--input-shape"),
        (["--arch-kwargs", "{not json"], "--arch-kwargs"),
        (["--no-such-option"], "--no-such-option"),
    ],
)
def test_bad_options(run_cli, tmp_path, args, needle):
    p = tmp_path / "m.onnx"
    p.write_bytes(tiny_onnx_model().SerializeToString())
    assert_clean_error(run_cli("inspect", p, *args), needle)


def test_trust_pickle_in_pyproject_is_ignored(run_cli, tmp_path, monkeypatch):
    import torch

    (tmp_path / "pyproject.toml").write_text("[tool.bncheck]\ntrust-pickle = true\n")
    marker = tmp_path / "PWNED"
    p = tmp_path / "model.pt"
    torch.save({"model": Payload(marker)}, p)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BNCHECK_TRUST_PICKLE", raising=False)
    result = run_cli("inspect", p)
    assert result.code == 2
    assert "ignoring 'trust-pickle'" in result.err
    assert not marker.exists()
    assert not os.listdir(tmp_path) or set(os.listdir(tmp_path)) == {"pyproject.toml", "model.pt"}


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (b"[tool.bncheck]\nignore = [\n", 2),  # our table, broken: the user must hear of it
        (b"[tool.bncheck]\nformat = '\xff'\n", 2),  # not UTF-8
        (b"[project]\nname = \n", 0),  # a broken TOML with no table of ours: not our business
    ],
)
def test_pyproject_is_judged_only_for_its_bncheck_table(run_cli, tmp_path, monkeypatch, text, code):
    (tmp_path / "pyproject.toml").write_bytes(text)
    p = tmp_path / "m.onnx"
    p.write_bytes(tiny_onnx_model().SerializeToString())
    monkeypatch.chdir(tmp_path)
    result = run_cli("inspect", p, "--fail-on", "never")
    if code == 2:
        assert_clean_error(result, "cannot read [tool.bncheck]")
    else:
        assert result.code == 0, result.err


def test_ctrl_c_inside_an_extension_import_is_an_interrupt(monkeypatch, capsys):
    # Commands import torch/onnxruntime when they start; Ctrl-C during a compiled module's
    # init surfaces as ImportError("initialization failed") raised from the KeyboardInterrupt
    # that bncheck's SIGINT handler raised (and recorded).
    import signal

    from bncheck import api, interrupt
    from bncheck.cli import main

    def interrupted_import(*args, **kwargs):
        try:
            interrupt._handler(signal.SIGINT, None)  # what Ctrl-C runs: record, then raise
        except KeyboardInterrupt as exc:
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(api, "inspect", interrupted_import)
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(SAMPLES / "resnet.onnx")])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "bncheck: interrupted\n"
