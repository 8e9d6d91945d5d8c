"""Safe ONNX loading: malformed files, external-data paths, declared sizes."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bncheck.backends import open_model
from bncheck.backends.onnx import open_onnx
from bncheck.errors import InputError

F32 = TensorProto.FLOAT
W = np.arange(16, dtype=np.float32) * 0.5 - 3.0


def vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F32, shape)


def external_tensor(name: str, location: str, *, offset: int = 0, length: int | None = None):
    t = TensorProto(name=name, data_type=F32, dims=[16])
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", offset), ("length", length)):
        if v is not None:
            t.external_data.add(key=k, value=str(v))
    return t


def add_model(w: TensorProto, *, as_constant: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    inits = [w]
    if as_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=w, name="const_w"))
        inits = []
    g = helper.make_graph(nodes, "g", [vi("x", [16])], [vi("y", [16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def write(folder: Path, m: onnx.ModelProto, name: str = "m.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(m.SerializeToString())
    return p


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    return d


def test_valid_external_data_loads_values(folder):
    (folder / "sub").mkdir()
    (folder / "sub" / "w.bin").write_bytes(b"\0" * 8 + W.tobytes())
    p = write(folder, add_model(external_tensor("w", "sub/w.bin", offset=8, length=64)))
    h = open_model(p)
    assert h.external_data is True
    np.testing.assert_array_equal(h.index.const("w"), W)
    (y,) = h.run({"x": np.ones(16, np.float32)})
    np.testing.assert_array_equal(y, W + 1)  # exact: small halves plus one


def test_symlink_inside_folder_is_allowed(folder):
    (folder / "real.bin").write_bytes(W.tobytes())
    (folder / "link.bin").symlink_to("real.bin")
    h = open_onnx(write(folder, add_model(external_tensor("w", "link.bin"))))
    np.testing.assert_array_equal(h.index.const("w"), W)


def outside(loc: str) -> str:
    return rf"external data '{loc}' of tensor 'w' points outside the model's folder"


@pytest.mark.parametrize("as_constant", [False, True])
def test_dotdot_location_refused(folder, as_constant):
    (folder.parent / "w.bin").write_bytes(W.tobytes())
    p = write(folder, add_model(external_tensor("w", "../w.bin"), as_constant=as_constant))
    with pytest.raises(InputError, match=outside(r"\.\./w\.bin")):
        open_onnx(p)


def test_absolute_location_refused(folder):
    target = folder / "w.bin"
    target.write_bytes(W.tobytes())
    p = write(folder, add_model(external_tensor("w", str(target))))
    with pytest.raises(InputError, match="points outside the model's folder"):
        open_onnx(p)


def test_symlink_out_of_folder_refused(folder):
    (folder.parent / "secret.bin").write_bytes(W.tobytes())
    (folder / "w.bin").symlink_to(folder.parent / "secret.bin")
    p = write(folder, add_model(external_tensor("w", "w.bin")))
    with pytest.raises(InputError, match=outside(r"w\.bin")):
        open_onnx(p)


def test_hard_link_refused(folder):
    (folder / "w.bin").write_bytes(W.tobytes())
    os.link(folder / "w.bin", folder / "w2.bin")
    p = write(folder, add_model(external_tensor("w", "w2.bin")))
    with pytest.raises(InputError, match=r"'w2\.bin' has 2 hard links"):
        open_onnx(p)


def test_missing_data_file(folder):
    p = write(folder, add_model(external_tensor("w", "nope.bin")))
    with pytest.raises(InputError, match=r"missing external data file 'nope\.bin'"):
        open_onnx(p)


def test_external_range_past_end_and_wrong_length(folder):
    (folder / "w.bin").write_bytes(W.tobytes())
    p = write(folder, add_model(external_tensor("w", "w.bin", offset=32, length=64)))
    with pytest.raises(InputError, match=r"lies past the end of 'w\.bin' \(64 bytes\)"):
        open_onnx(p)
    p = write(folder, add_model(external_tensor("w", "w.bin", offset=0, length=32)))
    with pytest.raises(InputError, match="declares 64 bytes but its external data holds 32"):
        open_onnx(p)


def test_truncated_file(tmp_path):
    m = add_model(numpy_helper.from_array(W, "w"))
    data = m.SerializeToString()
    p = tmp_path / "t.onnx"
    p.write_bytes(data[: len(data) - 7])
    with pytest.raises(InputError, match=r"t\.onnx: not a valid ONNX model"):
        open_model(p)


def test_graphless_and_nodeless(tmp_path):
    m = onnx.ModelProto(ir_version=8)
    m.opset_import.add(domain="", version=17)
    p = tmp_path / "a.onnx"
    p.write_bytes(m.SerializeToString())
    with pytest.raises(InputError, match=r"a\.onnx: ONNX model has no graph"):
        open_model(p)
    m.graph.name = "empty"
    m.graph.input.append(vi("x", [1]))
    p.write_bytes(m.SerializeToString())
    with pytest.raises(InputError, match="ONNX graph has no nodes"):
        open_model(p)


def test_huge_declared_dims_refused_quickly(tmp_path):
    t = TensorProto(name="w", data_type=F32, dims=[2**40], raw_data=b"")
    p = write(tmp_path, add_model(t))
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"tensor 'w' declares 1099511627776 elements"):
            open_onnx(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20  # refused before allocating anything (numpy's buffers are traced)


def test_raw_data_shorter_than_declared(tmp_path):
    t = TensorProto(name="w", data_type=F32, dims=[16], raw_data=b"\0" * 8)
    with pytest.raises(InputError, match="tensor 'w' declares 64 bytes but stores 8"):
        open_onnx(write(tmp_path, add_model(t)))


def test_constant_of_shape_too_large(tmp_path):
    shape = numpy_helper.from_array(np.array([2**20, 2**20], np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["y"], name="big")]
    g = helper.make_graph(nodes, "g", [], [vi("y", [2**20, 2**20])], [shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InputError, match="ConstantOfShape 'big' asks for 1048576x1048576"):
        open_onnx(write(tmp_path, m))


def test_opset_too_new_and_checker_errors(tmp_path):
    m = add_model(numpy_helper.from_array(W, "w"))
    m.opset_import[0].version = 40
    with pytest.raises(InputError, match="uses opset 40, newer than"):
        open_onnx(write(tmp_path, m))
    m = add_model(numpy_helper.from_array(W, "w"))
    m.graph.node[0].input[1] = "undefined_tensor"
    with pytest.raises(InputError, match=r"m\.onnx: invalid ONNX model \(.*undefined_tensor"):
        open_onnx(write(tmp_path, m))


def test_typed_data_disagreeing_with_dims(tmp_path):
    t = TensorProto(name="w", data_type=F32, dims=[16], float_data=[1.0, 2.0, 3.0])
    with pytest.raises(InputError, match=r"m\.onnx: invalid ONNX model \(.*float_data size"):
        open_onnx(write(tmp_path, add_model(t))).index.const("w")


def test_checker_sees_large_initializers_as_stubs_and_still_catches_errors(tmp_path):
    # The checker gets a view with large raw-data initializers reduced to one element (so it
    # does not serialize every weight); the loaded model keeps them whole, and what the
    # checker is for (graph structure, duplicate names) still fails the load.
    from bncheck.backends.onnx.load import checker_view, load_model, serialized_size

    big = np.linspace(-1, 1, 4096, dtype=np.float32)
    m = add_model(numpy_helper.from_array(big[:16], "w"))
    m.graph.initializer.append(numpy_helper.from_array(big, "unused_big"))
    model, _ = load_model(write(tmp_path, m))
    view = checker_view(model)
    by_name = {t.name: t for t in view.graph.initializer}
    assert list(by_name) == ["w", "unused_big"]
    assert list(by_name["unused_big"].dims) == [1] and len(by_name["unused_big"].raw_data) == 4
    assert by_name["w"] == model.graph.initializer[0]  # small tensors pass through whole
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[1]), big)
    assert view.graph.node == model.graph.node and view.opset_import == model.opset_import
    # the save path's size (no full encode) is the real size, by the file-size count's arithmetic
    assert serialized_size(model) == model.ByteSize()

    m.graph.node[0].input[1] = "undefined_tensor"
    with pytest.raises(InputError, match=r"invalid ONNX model \(.*undefined_tensor"):
        open_onnx(write(tmp_path, m))
    m.graph.node[0].input[1] = "w"
    m.graph.initializer.append(numpy_helper.from_array(big, "unused_big"))  # a duplicate name
    with pytest.raises(InputError, match=r"invalid ONNX model \(.*unused_big"):
        open_onnx(write(tmp_path, m))


def two_conv_bn(w1: np.ndarray, w2: np.ndarray, *, w1_extra: int = 0) -> onnx.ModelProto:
    """x → Conv(w1) → Conv(w2) → BN → y, both weights 4.6 KB (large enough that the checker
    sees them as stubs); ``w1_extra`` bytes moved from w2's raw data to w1's."""
    t1, t2 = numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")
    if w1_extra:
        t1.raw_data = t1.raw_data + b"\0" * w1_extra
        t2.raw_data = t2.raw_data[:-w1_extra]
    bn = [numpy_helper.from_array(np.full(16, v, np.float32), n) for n, v in
          (("g", 1.5), ("b", 0.1), ("m", 0.2), ("v", 0.9))]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], pads=[1] * 4, name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    g = helper.make_graph(
        nodes, "g", [vi("x", [1, 8, 6, 6])], [vi("y", [1, 16, 6, 6])], [t1, t2, *bn]
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def conv_weights():
    rng = np.random.default_rng(5)
    w1 = rng.normal(0, 0.3, (16, 8, 3, 3)).astype(np.float32)
    return w1, rng.normal(0, 0.3, (16, 16, 3, 3)).astype(np.float32)[:, :16]


def test_large_tensors_are_counted_from_sizes_not_read(tmp_path, monkeypatch):
    """Reading raw_data copies it (upb has no length accessor): the large initializers of a
    file protobuf wrote are found to hold their declared bytes from the file's size alone."""
    from bncheck.backends.onnx import load as load_mod

    seen = {}
    real = load_mod._check_tensor
    monkeypatch.setattr(
        load_mod,
        "_check_tensor",
        lambda t, *a, counted=False: seen.setdefault(t.name, counted) or real(t, *a),
    )
    p = write(tmp_path, two_conv_bn(*conv_weights()))
    open_onnx(p)
    assert seen == {"w1": True, "w2": True, "g": False, "b": False, "m": False, "v": False}
    model = onnx.load(str(p))
    assert load_mod.sizes_as_declared(model, p.stat().st_size)
    assert not load_mod.sizes_as_declared(model, p.stat().st_size + 1)


def test_a_large_tensor_shorter_than_declared_is_named(tmp_path):
    t = numpy_helper.from_array(np.zeros(2048, np.float32), "w")
    t.raw_data = t.raw_data[:-8]
    with pytest.raises(InputError, match="tensor 'w' declares 8192 bytes but stores 8184"):
        open_onnx(write(tmp_path, add_model(t)))


def test_sizes_that_cancel_out_are_refused_where_the_tensor_is_read(tmp_path, run_cli):
    """One tensor 4 bytes longer than declared and another 4 bytes shorter: the file is as
    long as declared, so loading passes it (it cannot allocate more than the file holds);
    the fold reads the weights and refuses the file in one line, writing nothing."""
    from conftest import assert_clean_error

    p = write(tmp_path, two_conv_bn(*conv_weights(), w1_extra=4))
    open_onnx(p)
    with pytest.raises(InputError, match="tensor 'w2' holds malformed data"):
        open_onnx(p).index.const("w2")
    out = tmp_path / "out.onnx"
    assert_clean_error(run_cli("fold", p, "-o", out), "tensor 'w2' holds malformed data")
    assert not out.exists()
