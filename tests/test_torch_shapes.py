"""Where a PyTorch state dict's input shape comes from, which state dict a checkpoint gives,
and the dims written files keep dynamic (backend and api level; the CLI in tests/cli)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fixtures import WideNet, randomize_bn, wide_files

from bncheck.api._common import as_handle, check_output_path
from bncheck.backends import open_model
from bncheck.errors import InputError
from bncheck.rules import run_rules

ARCH = "torch_fixtures:wide_net"


@pytest.fixture
def wide(tmp_path):
    """A WideNet state dict (random BN statistics) and 224×224 data for it."""
    return wide_files(tmp_path, samples=4)


def _factory_module(folder, name: str, body: str, monkeypatch) -> str:
    """Write ``name.py`` (a WideNet factory ``build``) in ``folder`` and make it importable
    as --arch does, from the working folder; returns the --arch spec."""
    (folder / f"{name}.py").write_text("from torch_fixtures import WideNet\n" + body)
    monkeypatch.chdir(folder)
    return f"{name}:build"


def test_shape_order_input_shape_then_data_then_guess(wide, tmp_path):
    _, f, data = wide
    guessed = open_model(f, arch=ARCH)
    assert guessed.shape_source == "guess"
    assert guessed.example_shapes == {"x": (2, 3, 32, 32)}
    assert guessed.info().input_guessed is True
    assert any("guessed from 'conv1'" in n for n in guessed.notes)

    from_data = as_handle(f, data=data, arch=ARCH)
    assert from_data.shape_source == "data"
    assert from_data.example_shapes == {"x": (2, 3, 224, 224)}
    assert from_data.info().inputs[0].shape == ("batch", 3, 224, 224)
    assert from_data.info().input_guessed is False
    assert not any("guessed" in n for n in from_data.notes)

    given = as_handle(f, data=data, arch=ARCH, input_shapes={"": (1, 3, 96, 64)})
    assert given.shape_source == "--input-shape"
    assert given.example_shapes == {"x": (1, 3, 96, 64)}


def test_factory_module_declares_the_shape(wide, tmp_path, monkeypatch):
    _, f, data = wide
    arch = _factory_module(
        tmp_path,
        "declared",
        "example_input_shape = (1, 3, 48, 40)\ndef build():\n    return WideNet()\n",
        monkeypatch,
    )
    h = open_model(f, arch=arch)
    assert (h.shape_source, h.example_shapes) == ("example_input_shape", {"x": (1, 3, 48, 40)})
    # The data still comes before the factory's declaration.
    assert as_handle(f, data=data, arch=arch).example_shapes["x"][2:] == (224, 224)


def test_a_guess_is_never_written(wide, tmp_path):
    _, f, _ = wide
    h = open_model(f, arch=ARCH)
    for name in ("out.onnx", "out.pt2"):
        with pytest.raises(InputError, match=r"guessed.*--input-shape"):
            check_output_path(h, tmp_path / name, allowed=(".onnx", ".pt2"))
        with pytest.raises(InputError, match="--input-shape"):
            h.save(tmp_path / name)
        assert not (tmp_path / name).exists()


def test_dynamic_dims_of_a_state_dict_output_are_refused(wide, tmp_path):
    _, f, _ = wide
    h = open_model(f, arch=ARCH, input_shapes={"": (1, 3, 224, 224)}, dynamic_dims={"": (2, 3)})
    with pytest.raises(InputError, match=r"--dynamic-dims applies to \.pt2 and \.onnx"):
        check_output_path(h, tmp_path / "out.pt", allowed=(".pt",))


def _checkpoint_pair(model: WideNet) -> tuple[dict, dict]:
    net = model.state_dict()
    ema = {k: v.clone() for k, v in net.items()}
    ema["bn1.running_mean"] += 1.0  # the two must differ to tell which one was loaded
    return net, ema


def test_checkpoint_with_two_state_dicts(wide, tmp_path):
    model, _, _ = wide
    net, ema = _checkpoint_pair(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    f = tmp_path / "ckpt.pth"
    torch.save({"epoch": 7, "net": net, "ema": ema, "optimizer": opt.state_dict()}, f)
    with pytest.raises(InputError) as exc:
        open_model(f, arch=ARCH)
    assert "2 state dicts ('net', 'ema')" in str(exc.value)
    assert "--checkpoint-key" in str(exc.value)
    h = open_model(f, arch=ARCH, checkpoint_key="ema")
    np.testing.assert_array_equal(h.module.bn1.running_mean.numpy(), ema["bn1.running_mean"])
    assert "state dict taken from checkpoint entry 'ema'" in h.notes
    with pytest.raises(InputError, match=r"--checkpoint-key 'swa'.*'net', 'ema'"):
        open_model(f, arch=ARCH, checkpoint_key="swa")


def test_lightning_checkpoint_with_prefix_and_extra_modules(wide, tmp_path):
    model, _, _ = wide
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["criterion.weight"] = torch.ones(5)  # a loss module's buffer, not part of --arch
    f = tmp_path / "last.ckpt"
    torch.save(
        {"epoch": 3, "global_step": 90, "state_dict": state, "optimizer_states": [], "hparams": {}},
        f,
    )
    h = open_model(f, arch=ARCH)
    np.testing.assert_array_equal(h.module.bn2.running_var.numpy(), model.bn2.running_var.numpy())
    assert "key prefix 'model.' stripped to match --arch torch_fixtures:wide_net" in h.notes


def test_compiled_ddp_prefixes_and_the_one_that_fits(wide, tmp_path):
    model, _, _ = wide
    f = tmp_path / "ddp.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}, f)
    h = open_model(f, arch=ARCH)
    np.testing.assert_array_equal(h.module.conv1.weight.detach(), model.conv1.weight.detach())
    # A GAN-style checkpoint: only one of its state dicts fits --arch, so it is unambiguous.
    g = tmp_path / "gan.pt"
    other = {"fc.weight": torch.zeros(2, 2)}
    torch.save({"generator": model.state_dict(), "discriminator": other}, g)
    assert open_model(g, arch=ARCH).notes == ["state dict taken from checkpoint entry 'generator'"]


def test_bn302_silent_without_bn_and_asks_for_the_shape_on_a_guess(tmp_path):
    from conftest import make_info, make_layer

    no_bn = make_info(graph_error="could not trace the model: boom")
    assert [f.code for f in run_rules(no_bn)] == []
    guessed = make_info(make_layer(), graph_error="could not trace …", input_guessed=True)
    (bn302,) = [f for f in run_rules(guessed) if f.code == "BN302"]
    assert "--input-shape" in bn302.hint and "torch.export" not in bn302.hint


def test_failed_trace_on_a_guess_names_input_shape(tmp_path):
    model = randomize_bn(WideNet(fixed_head=True).eval())
    f = tmp_path / "fixed.pt"
    torch.save(model.state_dict(), f)
    info = open_model(f, arch="torch_fixtures:fixed_head_net").info()
    assert info.graph_error.startswith("could not trace the model on the guessed input x[2, 3")
    assert "pass --input-shape" in info.graph_error


@pytest.mark.parametrize(
    ("values", "parsed"),
    [
        (["2,3"], {"": (2, 3)}),
        (["height,width"], {"": (-2, -1)}),
        (["x=H,W", "y=1"], {"x": (-2, -1), "y": (1,)}),
    ],
)
def test_parse_dynamic_dims(values, parsed):
    from bncheck.cli import parse_dynamic_dims

    assert parse_dynamic_dims(values) == parsed


def test_parse_dynamic_dims_refuses_words_it_does_not_know():
    from bncheck.cli import parse_dynamic_dims

    with pytest.raises(InputError, match="--dynamic-dims 'rows'"):
        parse_dynamic_dims(["rows"])


def test_data_feeds_the_required_arguments_only(wide, tmp_path, monkeypatch):
    # torchcrepe's Crepe.forward(x, embed=False): the .npy feeds x, its shape is the example's.
    _, f, data = wide
    body = (
        "class Net(WideNet):\n"
        "    def forward(self, x, embed=False):\n"
        "        return super().forward(x)\n"
        "def build():\n    return Net()\n"
    )
    h = as_handle(f, data=data, arch=_factory_module(tmp_path, "optional", body, monkeypatch))
    assert (h.shape_source, h.example_shapes) == ("data", {"x": (2, 3, 224, 224)})
