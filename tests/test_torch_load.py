"""Safe loading of every PyTorch format: what loads, what is refused, that no pickle code runs."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_fixtures import ConvBNReLU, Evil, conv_bn, randomize_bn

from bncheck.backends import open_model, sniff
from bncheck.backends.torch import TorchHandle
from bncheck.errors import InputError, UnsafeInputError

ARCH = "torch_fixtures:conv_bn"


@pytest.fixture
def model() -> ConvBNReLU:
    return randomize_bn(conv_bn(4).eval(), seed=1)


def test_state_dict_with_arch(tmp_path, model):
    f = tmp_path / "m.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, f)
    h = open_model(f, arch=ARCH)
    assert isinstance(h, TorchHandle) and h.format == "state_dict"
    # Loaded weights are the saved ones, bit for bit.
    assert torch.equal(h.module.bn1.running_var, model.bn1.running_var)
    assert torch.equal(h.module.conv1.weight, model.conv1.weight)
    assert h.module.training is False  # a state dict records no mode: judged as deployed


def test_state_dict_needs_arch(tmp_path, model):
    f = tmp_path / "m.pth"
    torch.save(model.state_dict(), f)
    with pytest.raises(InputError, match=r"a state dict; pass --arch pkg.module:factory"):
        open_model(f)


def test_arch_kwargs_and_mismatches(tmp_path):
    f = tmp_path / "m.pt"
    torch.save(conv_bn(6).state_dict(), f)
    h = open_model(f, arch=ARCH, arch_kwargs={"cout": 6})
    assert h.module.bn1.num_features == 6
    with pytest.raises(InputError, match=r"shape: conv1.weight \(6, 3, 3, 3\) vs \(4, 3, 3, 3\)"):
        open_model(f, arch=ARCH)
    sd = conv_bn(6).state_dict()
    del sd["bn1.running_mean"]
    sd["extra.w"] = torch.zeros(1)
    torch.save(sd, f)
    with pytest.raises(InputError, match=r"missing: bn1.running_mean; unexpected: extra.w"):
        open_model(f, arch=ARCH, arch_kwargs={"cout": 6})


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("no_colon", "expected 'pkg.module:factory'"),
        ("not_a_module_xyz:f", "cannot import 'not_a_module_xyz'"),
        ("torch_fixtures:nope", "has no attribute 'nope'"),
        ("torch_fixtures:randomize_bn", "the factory raised TypeError"),
    ],
)
def test_bad_arch_spec(tmp_path, model, spec, needle):
    f = tmp_path / "m.pt"
    torch.save(model.state_dict(), f)
    with pytest.raises(InputError, match=needle):
        open_model(f, arch=spec)


def test_safetensors(tmp_path, model):
    from safetensors.torch import save_file

    f = tmp_path / "m.safetensors"
    save_file(model.state_dict(), f)
    h = open_model(f, arch=ARCH)
    assert h.format == "safetensors"
    assert torch.equal(h.module.bn1.running_mean, model.bn1.running_mean)
    # Bytes decide, not the suffix.
    g = tmp_path / "renamed.pt"
    g.write_bytes(f.read_bytes())
    assert sniff(g) == "safetensors" and open_model(g, arch=ARCH).format == "safetensors"


def test_safetensors_header_beyond_file(tmp_path):
    f = tmp_path / "bad.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    f.write_bytes(struct.pack("<Q", 10_000) + header + b"\0" * 8)
    with pytest.raises(InputError, match="header length 10000 runs past the end"):
        open_model(f, arch=ARCH)
    # Offsets that point past the data section are caught too.
    far = header.replace(b"8]", b"80]")
    f.write_bytes(struct.pack("<Q", len(far)) + far + b"\0" * 8)
    with pytest.raises(InputError, match=r"tensor 'w' offsets \[0, 80\] do not fit"):
        open_model(f, arch=ARCH)


def _evil_files(tmp_path: Path, marker: Path) -> list[Path]:
    zip_new = tmp_path / "new.pt"
    torch.save({"w": torch.zeros(2), "x": Evil(marker)}, zip_new)
    legacy = tmp_path / "legacy.pt"
    torch.save({"x": Evil(marker)}, legacy, _use_new_zipfile_serialization=False)
    raw = tmp_path / "raw.pkl"
    with open(raw, "wb") as fh:
        pickle.dump({"x": Evil(marker)}, fh, protocol=2)
    return [zip_new, legacy, raw]


def test_malicious_pickles_refused_without_running(tmp_path):
    marker = tmp_path / "MARKER"
    files = _evil_files(tmp_path, marker)
    assert [sniff(f) for f in files] == ["torch_zip", "pickle", "pickle"]
    for f in files:
        with pytest.raises(UnsafeInputError) as exc:
            open_model(f, arch=ARCH)
        msg = str(exc.value)
        assert msg.startswith(
            f"{f}: holds pickled Python objects (e.g. torch_fixtures.make_marker)"
        )
        assert "--trust-pickle" in msg and "\n" not in msg
        assert not marker.exists()


def test_whole_module_needs_trust(tmp_path, model):
    f = tmp_path / "whole.pt"
    torch.save(model, f)
    with pytest.raises(UnsafeInputError, match="ConvBNReLU"):
        open_model(f)
    h = open_model(f, trust_pickle=True)
    assert h.format == "pickle" and isinstance(h.module, ConvBNReLU)
    assert torch.equal(h.module.bn1.running_var, model.bn1.running_var)


def test_trusted_pickle_must_be_a_module(tmp_path):
    f = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], f)
    with pytest.raises(InputError, match="holds a list, not a model or a state dict"):
        open_model(f, trust_pickle=True)


# Writing the TorchScript fixture goes through torch.jit, which torch now warns is deprecated.
@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_torchscript_needs_trust(tmp_path, model):
    f = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(model), f)
    with pytest.raises(UnsafeInputError, match="TorchScript runs code"):
        open_model(f)
    info = open_model(f, trust_pickle=True).info()
    assert info.format == "torchscript"
    assert info.graph_error == "TorchScript model: producers and consumers could not be traced"
    (bn,) = info.bn_layers
    assert (bn.name, bn.kind, bn.channels, bn.num_batches_tracked) == ("bn1", "BatchNorm2d", 4, 7)
    np.testing.assert_array_equal(bn.running_var, model.bn1.running_var.numpy())


def _export(model: torch.nn.Module, f: Path) -> None:
    ep = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
    torch.export.save(ep, f)


def _rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, replace.get(rel, zin.read(info.filename)))


def test_pt2_round_trip(tmp_path, model):
    f = tmp_path / "m.pt2"
    _export(model, f)
    h = open_model(f)
    assert h.format == "pt2" and h.exported is not None
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(h.module(x), model(x), rtol=0, atol=0)  # same ops, same weights


def test_pt2_with_pickle_payload_refused(tmp_path, model):
    marker = tmp_path / "MARKER"
    f = tmp_path / "m.pt2"
    _export(model, f)
    buf = io.BytesIO()
    torch.save((Evil(marker),), buf)
    bad = tmp_path / "bad.pt2"
    _rewrite_zip(f, bad, {"data/sample_inputs/model.pt": buf.getvalue()})
    with pytest.raises(
        UnsafeInputError, match=r"member 'data/sample_inputs/model.pt' holds pickled"
    ):
        open_model(bad)
    assert not marker.exists()


def test_pt2_pickled_weight_and_compiled_member_refused(tmp_path, model):
    f = tmp_path / "m.pt2"
    _export(model, f)
    with zipfile.ZipFile(f) as z:
        root = z.namelist()[0].split("/")[0]
        cfg = json.loads(z.read(f"{root}/data/weights/model_weights_config.json"))
    cfg["config"]["bn1.weight"]["use_pickle"] = True
    bad = tmp_path / "bad.pt2"
    _rewrite_zip(f, bad, {"data/weights/model_weights_config.json": json.dumps(cfg).encode()})
    with pytest.raises(UnsafeInputError, match=r"stores 'bn1.weight' as a pickle"):
        open_model(bad)
    so = tmp_path / "so.pt2"
    _rewrite_zip(f, so, {})
    with zipfile.ZipFile(so, "a") as z:
        z.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(UnsafeInputError, match="is compiled code"):
        open_model(so)


def test_pt2_weight_larger_than_record(tmp_path, model):
    f = tmp_path / "m.pt2"
    _export(model, f)
    with zipfile.ZipFile(f) as z:
        root = z.namelist()[0].split("/")[0]
        cfg = json.loads(z.read(f"{root}/data/weights/model_weights_config.json"))
    cfg["config"]["bn1.weight"]["tensor_meta"]["sizes"] = [{"as_int": 10**9}]
    bad = tmp_path / "big.pt2"
    _rewrite_zip(f, bad, {"data/weights/model_weights_config.json": json.dumps(cfg).encode()})
    with pytest.raises(
        InputError, match=r"'bn1.weight' declares 4000000000 bytes but its record holds 16"
    ):
        open_model(bad)


def _patch_declared_size(path: Path, member_suffix: str, size: int) -> None:
    """Rewrite the central-directory uncompressed size of one member (a lying header)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
    name = info.filename.encode()
    pos = 0
    while True:
        pos = data.index(b"PK\x01\x02", pos)
        n = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46 : pos + 46 + n]) == name:
            break
        pos += 4
    struct.pack_into("<I", data, pos + 24, size)  # uncompressed size field
    path.write_bytes(bytes(data))


def test_zip_bomb_refused_before_loading(tmp_path, model):
    f = tmp_path / "bomb.pt"
    torch.save(model.state_dict(), f)
    _patch_declared_size(f, "data/0", 4_000_000_000)
    with pytest.raises(InputError, match=r"declares 4000000000 bytes but stores"):
        open_model(f, arch=ARCH)
    # A deflated member expanding far beyond the ratio cap.
    g = tmp_path / "deflate.pt"
    torch.save(model.state_dict(), g)
    with zipfile.ZipFile(g) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(g, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data + (b"\0" * (8 << 20) if name.endswith("data/0") else b""))
    with pytest.raises(InputError, match="compression ratio above 100"):
        open_model(g, arch=ARCH)
