"""Same input and options → byte-identical output files and identical reports (timings aside)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from conftest import SAMPLES

TIMING_KEYS = {"seconds", "elapsed", "elapsed_s", "duration", "duration_s", "time_s", "timings"}


def _strip(obj):
    """The report without wall-clock fields (any key naming a duration)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _zip_members(p: Path) -> dict[str, str]:
    with zipfile.ZipFile(p) as z:
        return {i.filename: hashlib.sha256(z.read(i.filename)).hexdigest() for i in z.infolist()}


def _fold_twice(run_cli, tmp_path, src, suffix, *extra):
    outs, reports = [], []
    for i in range(2):
        out = tmp_path / f"run{i}" / f"folded{suffix}"
        out.parent.mkdir()
        # The same output name in two folders: a name embedded in the file stays the same.
        result = run_cli("fold", src, "-o", out, "--format", "json", *extra)
        assert result.code == 0, result
        outs.append(out)
        report = json.loads(result.out)
        report.pop("output", None)  # the folders differ on purpose
        reports.append(_strip(report))
    return outs, reports


@pytest.mark.parametrize("model", ["resnet.onnx", "patterns.onnx"])
def test_fold_onnx_is_byte_identical(run_cli, tmp_path, samples_dir, model):
    outs, reports = _fold_twice(run_cli, tmp_path, samples_dir / model, ".onnx")
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert reports[0] == reports[1]


PT2_SOURCES = [("resnet.pt2", ()), ("resnet.pt", ("--arch", "bncheck.samples:small_resnet"))]


@pytest.mark.parametrize(("model", "extra"), PT2_SOURCES)
def test_fold_pt2_members_are_identical(run_cli, tmp_path, samples_dir, model, extra):
    """Every member of the two archives holds the same bytes: weights, graph (its provenance
    metadata names graphs by number, not memory address), configs and the sample inputs (a
    state-dict source is traced on a seeded example)."""
    outs, reports = _fold_twice(run_cli, tmp_path, samples_dir / model, ".pt2", *extra)
    assert reports[0] == reports[1]
    a, b = ({k.split("/", 1)[1]: v for k, v in _zip_members(p).items()} for p in outs)
    differing = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    assert differing == [], f"members differ between two runs: {differing}"


def test_fold_pt2_is_byte_identical(run_cli, tmp_path, samples_dir):
    """The archive's root folder does not come from the (random) temporary file name, and the
    zip headers carry no timestamps: the whole file is the same."""
    outs, _ = _fold_twice(run_cli, tmp_path, samples_dir / "resnet.pt2", ".pt2")
    roots = [{k.split("/", 1)[0] for k in _zip_members(p)} for p in outs]
    assert roots[0] == roots[1], roots
    assert outs[0].read_bytes() == outs[1].read_bytes()  # zip headers (timestamps) too


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("resnet.onnx", ()),
        ("broken.onnx", ()),
        ("resnet.pt2", ()),
        ("resnet.safetensors", ("--arch", "bncheck.samples:small_resnet")),
    ],
)
def test_inspect_json_is_identical(run_cli, samples_dir, model, extra):
    runs = [run_cli("inspect", samples_dir / model, "--format", "json", *extra) for _ in range(2)]
    assert runs[0].code == runs[1].code
    a, b = (_strip(json.loads(r.out)) for r in runs)
    assert a == b
    assert a["schema"] == "bncheck.inspect/1"


def test_onnx_fold_does_not_depend_on_the_output_name(run_cli, tmp_path):
    """Two different output names give the same bytes: nothing of the path is embedded."""
    src = SAMPLES / "resnet.onnx"
    for name in ("a.onnx", "bb.onnx"):
        assert run_cli("fold", src, "-o", tmp_path / name, "-q").code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "bb.onnx").read_bytes()


@pytest.mark.parametrize("model", ["resnet.pt2", "resnet.onnx"])
def test_recalibrate_is_byte_identical(run_cli, tmp_path, samples_dir, model):
    """Recalibration writes the same bytes and the same report (timings aside) every run."""
    suffix = Path(model).suffix
    outs, reports = [], []
    for i in range(2):
        out = tmp_path / f"run{i}" / f"recal{suffix}"
        out.parent.mkdir()
        data = samples_dir / "resnet_calib.npy"
        result = run_cli(
            "recalibrate", samples_dir / model, "--data", data, "-o", out, "--format", "json"
        )
        assert result.code == 0, result
        report = json.loads(result.out)
        report.pop("output", None)
        outs.append(out.read_bytes())
        reports.append(_strip(report))
    assert outs[0] == outs[1]
    assert reports[0] == reports[1]


def test_writing_a_pt2_leaves_the_programs_graph_ids_alone(tmp_path):
    """Graph ids are numbered only while the archive is written; the program in memory keeps
    torch's own, which later passes compare with id(graph)."""
    import bncheck

    handle = bncheck.open_model(SAMPLES / "resnet.pt2")
    folded, _ = handle.folded()

    def ids(ep):
        return [s.graph_id for n in ep.graph.nodes for s in n.meta.get("from_node") or ()]

    before = ids(folded.exported)
    assert before, "the folded program carries provenance metadata"
    folded.save(tmp_path / "f.pt2")
    assert ids(folded.exported) == before


@pytest.mark.parametrize("model", ["resnet.pt2", "resnet.onnx"])
def test_check_json_is_identical(run_cli, samples_dir, model):
    data = samples_dir / "resnet_calib.npy"
    runs = [
        run_cli("check", samples_dir / model, "--data", data, "--format", "json") for _ in range(2)
    ]
    assert runs[0].code == runs[1].code == 0, runs[0]
    a, b = (_strip(json.loads(r.out)) for r in runs)
    assert a == b
    assert a["schema"].startswith("bncheck.check/")
