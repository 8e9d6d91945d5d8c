"""Training, calibration and export of the sample models (``python -m bncheck.samples`` runs it).

``bncheck.samples`` holds the models, the data generator and the exact-statistics pass that
tests and ``--arch`` import; this module holds what only writing the files needs, and the
exporters the benchmarks share: ``export_onnx_keep_bn`` and ``export_pt2``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bncheck.samples import (
    OPSET,
    BrokenModel,
    SmallResNet,
    _batches,
    bn_patterns,
    broken_model,
    exact_bn_statistics,
    make_gratings,
    small_resnet,
)


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial statistics and affine parameters, so a wrong fold cannot pass by accident."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                sign = torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0)
                m.weight.copy_(sign * (0.5 + torch.rand(c, generator=gen)))
                m.bias.copy_(0.5 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.5 + torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
                m.num_batches_tracked.fill_(100)


def _train_resnet(model: SmallResNet, steps: int = 240) -> None:
    x_train, y_train = make_gratings(4096, seed=1)
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, xs.shape[0], (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _break(model: BrokenModel, calib: np.ndarray) -> None:
    """Calibrate with a few train-mode passes, then plant one flaw per BN layer."""
    with torch.no_grad():
        for batch in _batches(calib, 16):
            model(batch)
        model.bn_uncalibrated.reset_running_stats()  # mean 0, var 1, num_batches_tracked 0
        model.bn_tiny_var.running_var[:3] = 1e-9  # below eps = 1e-5
        model.bn_bad_var.running_var[0] = -0.5
        model.bn_bad_var.running_var[1] = float("nan")
        model.bn_dead.weight[[1, 4, 6]] = 0.0
        model.bn_extreme_scale.weight[2] = 3e4  # |γ|/sqrt(var+eps) > 1e4
        model.bn_fp16_overflow_var.running_var[:2] = torch.tensor([1e5, 2.5e5])  # > 65504


def export_onnx_keep_bn(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    output_names: list[str],
    train_mode_bn: bool = False,
) -> None:
    """Export to a single-file ONNX (opset 18, input ``input``, dynamic batch) keeping BN nodes.

    ``torch.onnx.export(dynamo=True)`` with its default ``optimize=True`` runs onnxscript's
    rewriter, whose ``_fuse_batchnorm`` rules fold every Conv/ConvTranspose/Gemm→BN away. So we
    export with ``optimize=False`` and clean up with identity elimination, constant folding and
    dead-node removal only (no rewrite rules). With ``train_mode_bn`` the BN nodes get
    ``training_mode=1`` plus the two running-statistics outputs the ONNX spec then requires: the
    dynamo exporter writes inference BN nodes (normalizing by the running statistics) even for a
    train-mode model.
    """
    import onnx
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import fold_constants

    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            optimize=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=output_names,
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    ir_model = program.model
    # A second call of a BN reads its running stats through Identity nodes; without them it
    # reads the same initializers as the first call, so the sharing stays visible.
    common_passes.IdentityEliminationPass()(ir_model)
    fold_constants(ir_model)
    common_passes.RemoveUnusedNodesPass()(ir_model)
    common_passes.RemoveUnusedOpsetsPass()(ir_model)
    proto = program.model_proto
    if train_mode_bn:
        for node in proto.graph.node:
            if node.op_type == "BatchNormalization":
                kept = [a for a in node.attribute if a.name != "training_mode"]
                del node.attribute[:]
                node.attribute.extend([*kept, onnx.helper.make_attribute("training_mode", 1)])
                del node.output[1:]
                node.output.extend([node.output[0] + "_new_running_mean"])
                node.output.extend([node.output[0] + "_new_running_var"])
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def export_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))


def _save_state_dict(model: nn.Module, path: Path) -> None:
    torch.save(model.state_dict(), str(path))


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def build_resnet(out: Path) -> dict[str, Any]:
    """Train, calibrate exactly and save the ResNet; returns summary figures."""
    torch.manual_seed(0)
    model = small_resnet()
    _train_resnet(model)
    calib, labels = make_gratings(256, seed=3)
    exact_bn_statistics(model, calib, batch_size=32)
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(calib)).argmax(1).numpy() == labels).mean())
    np.save(out / "resnet_calib.npy", calib)
    np.save(out / "resnet_labels.npy", labels)
    _save_state_dict(model, out / "resnet.pt")
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, out / "resnet.safetensors"
    )
    example = torch.from_numpy(calib[:2])
    export_pt2(model, example, out / "resnet.pt2")
    export_onnx_keep_bn(model, example, out / "resnet.onnx", ["logits"])
    return {"bn": _bn_count(model), "accuracy": accuracy}


def build_patterns(out: Path) -> dict[str, Any]:
    torch.manual_seed(10)
    model = bn_patterns()
    _randomize_bn(model, torch.Generator().manual_seed(11))
    calib = torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(12)).numpy()
    np.save(out / "patterns_calib.npy", calib)
    _save_state_dict(model, out / "patterns.pt")
    example = torch.from_numpy(calib[:2])
    export_pt2(model, example, out / "patterns.pt2")
    export_onnx_keep_bn(model, example, out / "patterns.onnx", ["output"])
    return {"bn": _bn_count(model)}


def build_broken(out: Path) -> dict[str, Any]:
    torch.manual_seed(20)
    model = broken_model()
    calib = (1.0 + torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(21))).numpy()
    _break(model, calib)
    np.save(out / "broken_calib.npy", calib)
    _save_state_dict(model, out / "broken.pt")
    example = torch.from_numpy(calib[:2])
    # Exports run the train-mode forward, which updates running stats: export from copies.
    export_pt2(copy.deepcopy(model), example, out / "broken.pt2")
    export_onnx_keep_bn(
        copy.deepcopy(model), example, out / "broken.onnx", ["output", "half_output"], True
    )
    return {"bn": _bn_count(model)}


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    threads = torch.get_num_threads()
    was = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    # The ONNX exporter logs progress and registry warnings we do not want in the summary.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was)


def build_all(out: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Write every sample into ``out``, deterministically; summary figures of each model."""
    with _deterministic():
        return build_resnet(out), build_patterns(out), build_broken(out)
