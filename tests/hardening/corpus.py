"""Generators of the hostile-input corpus: every case is built in a folder the test gives.

A model case returns a ``Case``: the file to hand to bncheck, what the one-line error must
contain (the file's name always, plus a word naming the problem), and extra CLI options.
Data cases live in corpus_data.py. Nothing is committed:
the tests build the corpus in ``tmp_path``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT
ARCH = "torch_fixtures:conv_bn"  # tests/torch_fixtures.py: Conv(3→4) → BN → ReLU, 8×8 input


@dataclass(frozen=True)
class Case:
    path: Path
    needles: tuple[str, ...]  # substrings the single error line must contain
    args: tuple[str, ...] = ()  # extra CLI options (e.g. --arch)
    framework: str = "onnx"  # decides the fold output suffix and the data for check
    extra_files: tuple[Path, ...] = field(default=())


# ---- small valid models the cases damage ---------------------------------------------------


def conv_bn_onnx(
    batch: int | str = "N", channels: int = 3, opset: int = 17, cin: int = 2
) -> onnx.ModelProto:
    """x[batch,cin,5,5] → Conv(channels×cin×3×3) → BatchNormalization → Relu → y.

    BN statistics and affine parameters are randomized (the defaults hide bugs).
    """
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.normal(size=(channels, cin, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(size=channels).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "beta", "mean", "var"], ["b"], name="bn"
        ),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", F32, [batch, cin, 5, 5])],
        [helper.make_tensor_value_info("y", F32, [batch, channels, 3, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(data)
    return p


def _save_onnx(folder: Path, m: onnx.ModelProto, name: str = "m.onnx") -> Path:
    return _write(folder, name, m.SerializeToString())


def _initializer(m: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


# ---- ONNX cases ----------------------------------------------------------------------------


def empty(folder: Path) -> Case:
    return Case(_write(folder, "empty.onnx", b""), ("empty.onnx", "empty file"))


def random_bytes(suffix: str) -> Callable[[Path], Case]:
    def build(folder: Path) -> Case:
        # A fixed seed whose first byte is no protobuf tag, zip or pickle magic.
        data = np.random.default_rng(3).bytes(4096)
        fw = "onnx" if suffix == ".onnx" else "torch"
        return Case(_write(folder, f"random{suffix}", data), (f"random{suffix}",), framework=fw)

    return build


def truncated(fraction: float) -> Callable[[Path], Case]:
    def build(folder: Path) -> Case:
        data = conv_bn_onnx().SerializeToString()
        cut = max(1, min(len(data) - 1, int(len(data) * fraction)))
        return Case(_write(folder, "cut.onnx", data[:cut]), ("cut.onnx",))

    return build


def tensor_not_model(folder: Path) -> Case:
    t = numpy_helper.from_array(np.arange(64, dtype=np.float32), "t")
    return Case(_write(folder, "tensor.onnx", t.SerializeToString()), ("tensor.onnx",))


def graph_cycle(folder: Path) -> Case:
    # a = x + b; b = Relu(a): each node needs the other's output.
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
    ]
    g = helper.make_graph(
        nodes,
        "cycle",
        [helper.make_tensor_value_info("x", F32, [4])],
        [helper.make_tensor_value_info("a", F32, [4])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return Case(_save_onnx(folder, m, "cycle.onnx"), ("cycle.onnx",))


def dangling_input(folder: Path) -> Case:
    m = conv_bn_onnx()
    m.graph.node[2].input[0] = "nobody_makes_this"
    return Case(_save_onnx(folder, m, "dangling.onnx"), ("dangling.onnx", "nobody_makes_this"))


def bn_wrong_input_count(folder: Path) -> Case:
    m = conv_bn_onnx()
    del m.graph.node[1].input[4]
    return Case(_save_onnx(folder, m, "bn4.onnx"), ("bn4.onnx",))


def bn_scale_wrong_length(folder: Path) -> Case:
    m = conv_bn_onnx()
    _initializer(m, "scale").CopyFrom(
        numpy_helper.from_array(np.ones(5, np.float32), "scale")
    )  # 5 values for 3 channels
    return Case(_save_onnx(folder, m, "scale5.onnx"), ("scale5.onnx",))


def bn_int_stats(folder: Path) -> Case:
    m = conv_bn_onnx()
    for name in ("mean", "var"):
        _initializer(m, name).CopyFrom(numpy_helper.from_array(np.ones(3, np.int64), name))
    return Case(_save_onnx(folder, m, "intstats.onnx"), ("intstats.onnx",))


def bn_unknown_dtype(folder: Path) -> Case:
    """BN scale stored with data_type 65, which no ONNX version defines (found by the fuzzer)."""
    m = conv_bn_onnx()
    _initializer(m, "scale").data_type = 65
    return Case(_save_onnx(folder, m, "dtype65.onnx"), ("dtype65.onnx",))


def opset_999(folder: Path) -> Case:
    m = conv_bn_onnx()
    m.opset_import[0].version = 999
    return Case(_save_onnx(folder, m, "opset.onnx"), ("opset.onnx", "999"))


def _externalize(m: onnx.ModelProto, location: str) -> None:
    w = _initializer(m, "w")
    nbytes = len(w.raw_data) or 4 * int(np.prod(w.dims))
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(nbytes))):
        w.external_data.add(key=k, value=v)


W_BYTES = np.random.default_rng(7).normal(size=(3, 2, 3, 3)).astype(np.float32).tobytes()


def external(kind: str) -> Callable[[Path], Case]:
    """External data of tensor 'w' pointing where it must not (or nowhere)."""

    def build(folder: Path) -> Case:
        inner = folder / "model"
        inner.mkdir(parents=True, exist_ok=True)
        m = conv_bn_onnx()
        needle = "outside the model's folder"
        if kind == "dotdot":
            _write(folder, "secret.bin", W_BYTES)
            _externalize(m, "../secret.bin")
        elif kind == "absolute":
            target = _write(folder, "abs.bin", W_BYTES)
            _externalize(m, str(target))
        elif kind == "symlink":
            _write(folder, "secret.bin", W_BYTES)
            (inner / "w.bin").symlink_to(folder / "secret.bin")
            _externalize(m, "w.bin")
        elif kind == "hardlink":
            _write(inner, "w.bin", W_BYTES)
            os.link(inner / "w.bin", inner / "w2.bin")
            _externalize(m, "w2.bin")
            needle = "hard links"
        else:  # missing
            _externalize(m, "nope.bin")
            needle = "missing external data file"
        return Case(_save_onnx(inner, m, "ext.onnx"), ("ext.onnx", needle))

    return build


def huge_dim(folder: Path) -> Case:
    m = conv_bn_onnx()
    _initializer(m, "w").CopyFrom(TensorProto(name="w", data_type=F32, dims=[2**40], raw_data=b""))
    return Case(_save_onnx(folder, m, "huge.onnx"), ("huge.onnx", "1099511627776"))


def constant_of_shape_tb(folder: Path) -> Case:
    shape = numpy_helper.from_array(np.array([2**20, 2**20], np.int64), "shape")
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["z"], name="big"),
        helper.make_node("Add", ["x", "z"], ["y"], name="add"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F32, [1, 1])],
        [helper.make_tensor_value_info("y", F32, [2**20, 2**20])],
        [shape],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return Case(_save_onnx(folder, m, "cos.onnx"), ("cos.onnx", "ConstantOfShape"))


# ---- PyTorch cases -------------------------------------------------------------------------


def _torch_model():
    from torch_fixtures import conv_bn, randomize_bn

    return randomize_bn(conv_bn(4).eval(), seed=1)


def state_dict_missing_keys(folder: Path) -> Case:
    import torch

    sd = _torch_model().state_dict()
    del sd["bn1.running_mean"]
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "missing.pt")
    needles = ("missing.pt", "bn1.running_mean")
    return Case(folder / "missing.pt", needles, ("--arch", ARCH), "torch")


def state_dict_wrong_shape(folder: Path) -> Case:
    import torch

    sd = _torch_model().state_dict()
    sd["conv1.weight"] = torch.zeros(4, 3, 5, 5)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "shape.pt")
    return Case(folder / "shape.pt", ("shape.pt", "conv1.weight"), ("--arch", ARCH), "torch")


def pickle_payload(form: str, marker: Path) -> Callable[[Path], Case]:
    """A .pt whose unpickling would create ``marker``: zip (modern), legacy, or raw pickle."""

    def build(folder: Path) -> Case:
        import torch
        from torch_fixtures import Evil

        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f"evil_{form}.pt"
        if form == "raw":
            p.write_bytes(pickle.dumps({"x": Evil(marker)}, protocol=2))
        else:
            payload = {"w": torch.zeros(2), "x": Evil(marker)}
            torch.save(payload, p, _use_new_zipfile_serialization=(form == "zip"))
        return Case(p, (p.name, "--trust-pickle"), ("--arch", ARCH), "torch")

    return build


def torchscript(folder: Path) -> Case:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "scripted.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated; the format still exists
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_torch_model()), p)
    return Case(p, ("scripted.pt", "--trust-pickle"), (), "torch")


def _export(folder: Path) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    f = folder / "clean.pt2"
    ep = torch.export.export(_torch_model(), (torch.randn(2, 3, 8, 8),))
    torch.export.save(ep, f)
    return f


def _rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, replace.get(rel, zin.read(info.filename)))
    src.unlink()


def pt2_sample_inputs_payload(marker: Path) -> Callable[[Path], Case]:
    def build(folder: Path) -> Case:
        import torch
        from torch_fixtures import Evil

        clean = _export(folder)
        buf = io.BytesIO()
        torch.save((Evil(marker),), buf)
        bad = folder / "payload.pt2"
        _rewrite_zip(clean, bad, {"data/sample_inputs/model.pt": buf.getvalue()})
        return Case(bad, ("payload.pt2", "pickled"), (), "torch")

    return build


def pt2_weights_pickle(folder: Path) -> Case:
    clean = _export(folder)
    with zipfile.ZipFile(clean) as z:
        root = z.namelist()[0].split("/")[0]
        cfg = json.loads(z.read(f"{root}/data/weights/model_weights_config.json"))
    cfg["config"]["bn1.weight"]["use_pickle"] = True
    bad = folder / "wpickle.pt2"
    _rewrite_zip(clean, bad, {"data/weights/model_weights_config.json": json.dumps(cfg).encode()})
    return Case(bad, ("wpickle.pt2", "pickle"), (), "torch")


def zip_bomb(folder: Path) -> Case:
    """A small state dict whose stored tensor's zip entry declares 4 GB."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "bomb.pt"
    torch.save(_torch_model().state_dict(), p)
    data = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    name = info.filename.encode()
    pos = 0
    while True:  # the central-directory record of that member
        pos = data.index(b"PK\x01\x02", pos)
        n = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46 : pos + 46 + n]) == name:
            break
        pos += 4
    struct.pack_into("<I", data, pos + 24, 4_000_000_000)  # uncompressed size
    p.write_bytes(bytes(data))
    return Case(p, ("bomb.pt", "4000000000"), ("--arch", ARCH), "torch")


def patch_central_directory(data: bytes, kind: str) -> bytes:
    """Damage the first central-directory record of a zip the way the fuzzer found crashing
    ``zipfile.ZipFile``: ``utf8`` sets the UTF-8 name flag on a name that is not UTF-8
    (UnicodeDecodeError), ``version`` asks for zip version 10.5 (NotImplementedError)."""
    out = bytearray(data)
    pos = out.index(b"PK\x01\x02")
    if kind == "utf8":
        struct.pack_into("<H", out, pos + 8, struct.unpack_from("<H", out, pos + 8)[0] | 0x800)
        out[pos + 46] = 0xFF  # first byte of the file name
    else:
        struct.pack_into("<H", out, pos + 6, 105)  # version needed to extract
    return bytes(out)


def zip_header(kind: str) -> Callable[[Path], Case]:
    def build(folder: Path) -> Case:
        import torch

        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f"zip_{kind}.pt"
        torch.save(_torch_model().state_dict(), p)
        p.write_bytes(patch_central_directory(p.read_bytes(), kind))
        return Case(p, (p.name,), ("--arch", ARCH), "torch")

    return build


def multi_disk_zip(folder: Path) -> Case:
    """A file ending in a zip64 locator that claims two disks, then an end record: the fuzzer
    found ``zipfile.is_zipfile`` raising BadZipFile on it instead of returning a bool."""
    locator = b"PK\x06\x07" + struct.pack("<LQL", 0, 0, 2)
    end = b"PK\x05\x06" + b"\0" * 18
    p = _write(folder, "disks.pt", b"\0" * 64 + locator + end)
    return Case(p, ("disks.pt", "zip"), ("--arch", ARCH), "torch")


def safetensors_header_past_end(folder: Path) -> Case:
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    data = struct.pack("<Q", 10_000) + header + b"\0" * 8
    p = _write(folder, "bad.safetensors", data)
    return Case(p, ("bad.safetensors", "10000"), ("--arch", ARCH), "torch")


def model_cases(marker: Path) -> dict[str, Callable[[Path], Case]]:
    """Every hostile model file, by case name. ``marker`` must never appear (pickle ran)."""
    cases: dict[str, Callable[[Path], Case]] = {
        "empty": empty,
        "tensor_not_model": tensor_not_model,
        "graph_cycle": graph_cycle,
        "dangling_input": dangling_input,
        "bn_wrong_input_count": bn_wrong_input_count,
        "bn_scale_wrong_length": bn_scale_wrong_length,
        "bn_int_stats": bn_int_stats,
        "bn_unknown_dtype": bn_unknown_dtype,
        "opset_999": opset_999,
        "huge_dim": huge_dim,
        "constant_of_shape_tb": constant_of_shape_tb,
        "state_dict_missing_keys": state_dict_missing_keys,
        "state_dict_wrong_shape": state_dict_wrong_shape,
        "torchscript": torchscript,
        "pt2_sample_inputs_payload": pt2_sample_inputs_payload(marker),
        "pt2_weights_pickle": pt2_weights_pickle,
        "zip_bomb": zip_bomb,
        "multi_disk_zip": multi_disk_zip,
        "safetensors_header_past_end": safetensors_header_past_end,
    }
    for suffix in (".onnx", ".pt", ".pt2", ".safetensors", ".pth", ".bin"):
        cases[f"random{suffix}"] = random_bytes(suffix)
    for fraction in (0.05, 0.5, 0.95, 0.999):
        cases[f"truncated_{fraction}"] = truncated(fraction)
    for kind in ("dotdot", "absolute", "symlink", "hardlink", "missing"):
        cases[f"external_{kind}"] = external(kind)
    for form in ("zip", "legacy", "raw"):
        cases[f"pickle_{form}"] = pickle_payload(form, marker)
    for kind in ("utf8", "version"):
        cases[f"zip_header_{kind}"] = zip_header(kind)
    return cases
