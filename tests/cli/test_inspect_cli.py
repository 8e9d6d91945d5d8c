"""``bncheck inspect`` end to end on the committed sample models.

Layer counts are checked against an independent count: ONNX nodes by op_type, torch modules
by isinstance on the factory's model.
"""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from conftest import ROOT, SAMPLES, tiny_onnx_model

FACTORY = {"resnet": "small_resnet", "patterns": "bn_patterns", "broken": "broken_model"}


def onnx_bn_count(path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def torch_bn_count(stem: str) -> int:
    import torch

    from bncheck import samples

    model = getattr(samples, FACTORY[stem])()
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def inspect_json(run_cli, *args):
    result = run_cli("inspect", *args, "--format", "json", "--fail-on", "never")
    assert result.code == 0, result
    doc = json.loads(result.out)
    assert doc["schema"] == "bncheck.inspect/1"
    return doc


@pytest.mark.parametrize("stem", ["resnet", "patterns", "broken"])
def test_onnx_layer_count_and_producers(run_cli, stem):
    path = SAMPLES / f"{stem}.onnx"
    doc = inspect_json(run_cli, path)
    assert len(doc["bn_layers"]) == onnx_bn_count(path)
    # Producer: the node that makes each BN's input, looked up independently.
    model = onnx.load(str(path))
    made_by = {out: n for n in model.graph.node for out in n.output}
    bn_nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    for layer, node in zip(doc["bn_layers"], bn_nodes, strict=True):
        src = made_by.get(node.input[0])
        if src is None:
            assert layer["producer"]["op"] == "input"
        elif src.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            assert (layer["producer"]["name"], layer["producer"]["op"]) == (src.name, src.op_type)


@pytest.mark.parametrize(
    "stem, suffix",
    [
        ("resnet", ".pt2"),
        ("resnet", ".pt"),
        ("resnet", ".safetensors"),
        ("patterns", ".pt2"),
        ("patterns", ".pt"),
        ("broken", ".pt"),
        ("broken", ".pt2"),
    ],
)
def test_torch_layer_count(run_cli, stem, suffix):
    doc = inspect_json(
        run_cli, SAMPLES / f"{stem}{suffix}", "--arch", f"bncheck.samples:{FACTORY[stem]}"
    )
    assert len(doc["bn_layers"]) == torch_bn_count(stem)


@pytest.mark.parametrize("suffix", [".pt2", ".pt", ".onnx"])
def test_resnet_is_healthy(run_cli, suffix):
    result = run_cli(
        "inspect", SAMPLES / f"resnet{suffix}", "--arch", "bncheck.samples:small_resnet"
    )
    assert result.code == 0, result
    assert "9 BN layers (9 foldable)" in result.out
    assert "0 errors, 0 warnings" in result.out


def test_resnet_producers_are_the_convs_before(run_cli):
    doc = inspect_json(run_cli, SAMPLES / "resnet.pt2")
    pairs = {layer["name"]: layer["producer"]["name"] for layer in doc["bn_layers"]}
    assert pairs["stem.1"] == "stem.0"
    assert pairs["layer1.bn1"] == "layer1.conv1"
    assert pairs["layer2.shortcut.1"] == "layer2.shortcut.0"
    assert all(layer["producer"]["op"] == "Conv" for layer in doc["bn_layers"])


def test_patterns_fold_decisions_match_the_table(run_cli):
    from bncheck.samples import PATTERN_FOLDS

    doc = inspect_json(run_cli, SAMPLES / "patterns.pt2")
    got = {
        layer["name"]: (layer["fold"]["into"], layer["fold"]["target"])
        for layer in doc["bn_layers"]
    }
    for name, (into, target) in PATTERN_FOLDS.items():
        assert got[name][0] == into, name
        if into is not None:
            assert got[name][1] == target, name


BROKEN_TORCH = {
    "BN101", "BN102", "BN103", "BN104", "BN105", "BN106", "BN107",
    "BN201", "BN202", "BN204", "BN206", "BN301",
}  # fmt: skip


def test_broken_pt2_triggers_every_rule(run_cli):
    doc = inspect_json(run_cli, SAMPLES / "broken.pt2")
    assert {f["code"] for f in doc["findings"]} == BROKEN_TORCH
    assert doc["summary"]["error"] > 0


def test_broken_onnx_flags_train_mode_and_statistics(run_cli):
    doc = inspect_json(run_cli, SAMPLES / "broken.onnx")
    codes = {f["code"] for f in doc["findings"]}
    assert {
        "BN101",
        "BN102",
        "BN103",
        "BN104",
        "BN105",
        "BN106",
        "BN107",
        "BN201",
        "BN204",
    } <= codes


def test_exit_codes_follow_fail_on(run_cli):
    broken = SAMPLES / "broken.pt2"
    assert run_cli("inspect", broken).code == 1
    assert run_cli("inspect", broken, "--fail-on", "never").code == 0
    assert run_cli("inspect", broken, "--select", "BN3").code == 0  # only info findings
    assert run_cli("inspect", broken, "--select", "BN3", "--fail-on", "info").code == 1
    assert run_cli("inspect", broken, "--ignore", "BN1,BN2").code == 0


def test_select_ignore_from_pyproject(run_cli, tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.bncheck]\nignore = ["BN1", "BN2"]\n')
    monkeypatch.chdir(tmp_path)
    assert run_cli("inspect", SAMPLES / "broken.pt2").code == 0
    assert run_cli("inspect", SAMPLES / "broken.pt2", "--ignore", "BN3").code == 1


def test_github_annotations(run_cli):
    result = run_cli("inspect", SAMPLES / "broken.pt2", "--format", "github")
    lines = result.out.strip().splitlines()
    errors = [x for x in lines if x.startswith("::error file=")]
    assert errors and all("title=bncheck BN" in x for x in errors)
    assert lines[-1].startswith(str(SAMPLES / "broken.pt2"))


def test_markdown_table(run_cli):
    result = run_cli("inspect", SAMPLES / "resnet.onnx", "--format", "markdown")
    assert result.code == 0
    assert result.out.count("| Conv ") == 9


def test_text_lists_every_layer(run_cli):
    result = run_cli("inspect", SAMPLES / "patterns.pt2")
    from bncheck.samples import PATTERN_FOLDS

    for name in PATTERN_FOLDS:
        assert name in result.out
    assert "13 BN layers (10 foldable)" in result.out


def _modules_after_cli(args) -> set[str]:
    code = (
        "import sys\nfrom bncheck.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "print('MODULES', ' '.join(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = next(x for x in out.stdout.splitlines() if x.startswith("MODULES"))
    return set(line.split()[1:])


def test_inspect_onnx_does_not_import_torch(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(tiny_onnx_model().SerializeToString())
    mods = _modules_after_cli(["inspect", str(p)])
    assert "onnx" in mods and "bncheck.backends.onnx" in mods
    assert "torch" not in mods
