"""bncheck/api/_walk.py: which files a folder walk takes for models, and how globs match."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from conftest import tiny_onnx_model

from bncheck.api._walk import expand, first_match, glob_match, is_model_file, is_onnx_protobuf


@pytest.mark.parametrize(
    "rel, pattern, hit",
    [
        ("models/a.pt", "*.pt", True),
        ("models/a.pt", "models/*.pt", True),
        ("models/x/a.pt", "models/*.pt", True),  # `*` crosses folders, as in ruff
        ("other/a.pt", "models/*.pt", False),
        ("models/legacy/a.onnx", "legacy", True),  # a name matches any component
        ("models/legacy/a.onnx", "models/legacy", True),  # a folder covers what is inside
        ("models/legacy/a.onnx", "models/legacy/", True),
        ("a.onnx", "**/*.onnx", True),
        ("a/b.onnx", "./a/*.onnx", True),
        ("a/b.onnx", "", False),
        ("models/A.onnx", "models/a.onnx", False),  # case matters, on every system
    ],
)
def test_glob_match(rel, pattern, hit):
    assert glob_match(rel, pattern) is hit


def test_first_match_takes_the_first_entry():
    table = {"models/big*": "pkg:big", "models/*": "pkg:any"}
    assert first_match("models/big_v2.pt", table) == "pkg:big"
    assert first_match("models/small.pt", table) == "pkg:any"
    assert first_match("weights/x.pt", table) is None


def test_onnx_is_told_from_text_and_raw_bytes(tmp_path):
    model = tmp_path / "model"
    onnx.save(tiny_onnx_model(), model)
    assert is_onnx_protobuf(model) and is_model_file(model)
    cases = {
        # 'R' = field 10, length-delimited: a plausible first tag, so the whole walk decides.
        "README": b"Repository of models\n" * 20,
        "notes.txt": b"\x08\x01 then text",
        "weights.data": np.random.default_rng(0).normal(size=256).astype(np.float32).tobytes(),
        "cut": model.read_bytes()[:-3],  # no suffix, cut short: not taken for a model
        "calib.npy": None,
        "calib.npz": None,
    }
    for name, data in cases.items():
        p = tmp_path / name
        if name.endswith(".npy"):
            np.save(p, np.zeros(3))
        elif name.endswith(".npz"):
            np.savez(p, x=np.zeros(3))
        else:
            p.write_bytes(data)
        assert not is_model_file(p), name
    graphless = tiny_onnx_model()
    graphless.ClearField("graph")
    (tmp_path / "nograph").write_bytes(graphless.SerializeToString())
    assert not is_onnx_protobuf(tmp_path / "nograph")


def test_a_model_suffix_is_enough_so_damage_is_reported(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "junk.pt2").write_bytes(b"junk")
    assert is_model_file(tmp_path / "empty.onnx") and is_model_file(tmp_path / "junk.pt2")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no fifos here")
def test_a_fifo_is_never_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.onnx")
    assert not is_model_file(tmp_path / "pipe.onnx")  # opening it would block the walk


def test_expand_orders_dedupes_and_skips_hidden_and_excluded(tmp_path):
    for rel in ("z.onnx", "a/m.onnx", "a/b/m.onnx", ".git/x.onnx", "venv/y.onnx", "old/o.onnx"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(tiny_onnx_model(), p)
    targets, excluded = expand(
        [tmp_path, tmp_path / "z.onnx", tmp_path / "old/o.onnx"], root=tmp_path, exclude=["old"]
    )
    rels = [t.path.relative_to(tmp_path).as_posix() for t in targets]
    assert rels == ["a/b/m.onnx", "a/m.onnx", "z.onnx"]
    assert [t.explicit for t in targets] == [False, False, False]  # z.onnx: seen in the walk
    assert excluded == [tmp_path / "old/o.onnx"]
    only, _ = expand([tmp_path], root=tmp_path, include=["a/b/*"])
    assert [t.path for t in only] == [tmp_path / "a/b/m.onnx"]
