"""bncheck against the other BN-folding tools on a zoo of published architectures.

Each architecture (torchvision and timm; ``pip install -e '.[zoo]'``) is built with random
weights, its BN statistics set by a few train-mode passes on random input, and γ/β randomised
so that folding is not trivial. It is then written three ways:

* ``.pt2`` (``torch.export``, dynamic batch);
* ``.onnx`` as the exporter writes it with BN kept (``torch.onnx.export(dynamo=True,
  optimize=False)``): a bias-free conv gets a zero bias built from ``Shape/Expand/CastLike``;
* ``-cf.onnx``: the same after constant folding only (onnxscript's ``fold_constants``, no
  rewrite rules), so the ONNX peers get a fair input.

Folded by bncheck (its public API, default verification on) and by every peer: ``torch.fx``'s
``fuse`` (eager), onnxslim, onnxsim, onnxoptimizer (``fuse_bn_into_conv``) and onnxruntime's
BASIC level (the BN left in the optimised model it saves). Every result is verified here,
independently of the tool: ONNX at ``ORT_DISABLE_ALL`` against the unfolded file, torch
against the eager model, with ``max|Δ| ≤ 1e-5 + 1e-4·max|ref|`` on a batch of 2.

The models run in a child process (``--worker``), each leaving a JSON record in ``--out``; a
crash costs one row (a new child takes the rest) and an interrupted run resumes (``--resume``).
Run it niced, one thread:

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/zoo.py --out /tmp/zoo
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ATOL, RTOL = 1e-5, 1e-4
ONNX_TOOLS = ("bncheck", "onnxslim", "onnxsim", "onnxoptimizer", "ort-basic")
TORCH_TOOLS = ("bncheck", "torch.fx")

# name → (library, constructor name, input shape, constructor kwargs); cheapest first, so a
# partial run still covers the most architectures
ZOO: dict[str, tuple[str, str, tuple[int, ...], dict[str, Any]]] = {
    "mobilenet_v2": ("tv", "mobilenet_v2", (1, 3, 64, 64), {}),
    "shufflenet_v2_x0_5": ("tv", "shufflenet_v2_x0_5", (1, 3, 64, 64), {}),
    "mnasnet0_5": ("tv", "mnasnet0_5", (1, 3, 64, 64), {}),
    "lcnet_050": ("timm", "lcnet_050", (1, 3, 64, 64), {}),
    "mobilenet_v3_large": ("tv", "mobilenet_v3_large", (1, 3, 64, 64), {}),
    "ghostnet_100": ("timm", "ghostnet_100", (1, 3, 64, 64), {}),
    "mixnet_s": ("timm", "mixnet_s", (1, 3, 64, 64), {}),
    "efficientnet_b0": ("tv", "efficientnet_b0", (1, 3, 64, 64), {}),
    "tf_efficientnet_b0": ("timm", "tf_efficientnet_b0", (1, 3, 64, 64), {}),
    "rexnet_100": ("timm", "rexnet_100", (1, 3, 64, 64), {}),
    "mobileone_s0": ("timm", "mobileone_s0", (1, 3, 64, 64), {}),
    "repvgg_a0": ("timm", "repvgg_a0", (1, 3, 64, 64), {}),
    "resnet18": ("tv", "resnet18", (1, 3, 64, 64), {}),
    "regnet_y_400mf": ("tv", "regnet_y_400mf", (1, 3, 64, 64), {}),
    "mobilevit_xxs": ("timm", "mobilevit_xxs", (1, 3, 64, 64), {}),
    "fastvit_t8": ("timm", "fastvit_t8", (1, 3, 64, 64), {}),
    "levit_128s": ("timm", "levit_128s", (1, 3, 64, 64), {"img_size": 64}),
    "ese_vovnet19b_dw": ("timm", "ese_vovnet19b_dw", (1, 3, 64, 64), {}),
    "lraspp_mobilenet_v3": (
        "tv-seg",
        "lraspp_mobilenet_v3_large",
        (1, 3, 64, 64),
        {"weights_backbone": None},
    ),
    "deeplabv3_mobilenet_v3": (
        "tv-seg",
        "deeplabv3_mobilenet_v3_large",
        (1, 3, 64, 64),
        {"weights_backbone": None, "aux_loss": False},
    ),
    "dla34": ("timm", "dla34", (1, 3, 64, 64), {}),
    "resnet50": ("tv", "resnet50", (1, 3, 64, 64), {}),
    "resnetv2_50": ("timm", "resnetv2_50", (1, 3, 64, 64), {}),
    "resnext50_32x4d": ("tv", "resnext50_32x4d", (1, 3, 64, 64), {}),
    "res2net50_26w_4s": ("timm", "res2net50_26w_4s", (1, 3, 64, 64), {}),
    "hrnet_w18_small": ("timm", "hrnet_w18_small", (1, 3, 64, 64), {}),
    "efficientformer_l1": ("timm", "efficientformer_l1", (1, 3, 224, 224), {}),
    "googlenet": ("tv", "googlenet", (1, 3, 64, 64), {"aux_logits": False, "init_weights": True}),
    "inception_v3": ("timm", "inception_v3", (1, 3, 96, 96), {}),
    "densenet121": ("tv", "densenet121", (1, 3, 64, 64), {}),
    "dpn68": ("timm", "dpn68", (1, 3, 64, 64), {}),
    "cspdarknet53": ("timm", "cspdarknet53", (1, 3, 64, 64), {}),
    "r3d_18": ("tv-video", "r3d_18", (1, 3, 4, 32, 32), {}),
    "vgg11_bn": ("tv", "vgg11_bn", (1, 3, 64, 64), {}),
}


# ---------------------------------------------------------------------------------- building


def _register_torchvision_schemas() -> None:
    """The torchvision wheel served here is a CUDA build whose compiled ops do not load with the
    CPU torch; its import then fails registering fake kernels for ops that do not exist.
    Classification and segmentation models use none of them: declaring the schemas is enough."""
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - the compiled ops did load
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _register_torchvision_schemas.lib = lib  # keep the registration alive


def build(name: str) -> tuple[Any, Any]:
    """The model in eval mode with calibrated statistics and random γ/β, and an input."""
    import torch

    lib, ctor, shape, kwargs = ZOO[name]
    torch.manual_seed(0)
    _register_torchvision_schemas()  # timm imports torchvision too, when it is installed
    if lib.startswith("tv"):
        import torchvision

        space = {
            "tv": torchvision.models,
            "tv-video": torchvision.models.video,
            "tv-seg": torchvision.models.segmentation,
        }[lib]
        model = getattr(space, ctor)(weights=None, **kwargs)
    else:
        import timm

        model = timm.create_model(ctor, pretrained=False, **kwargs)
    gen = torch.Generator().manual_seed(1)
    calib_shape = (4, *shape[1:])
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(calib_shape, generator=gen))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
    model.eval()
    return model, torch.randn(shape, generator=gen)


def plain_output(model: Any) -> Any:
    """Segmentation models return {"out": …}: export and compare that tensor."""
    import torch

    class Out(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            y = self.inner(x)
            return y["out"] if isinstance(y, dict) else y

    return Out(model).eval()


# ----------------------------------------------------------------------------------- writing


def export_pt2(model: Any, x: Any, path: Path) -> Any:
    """Write ``model`` to ``path`` as a ``.pt2`` with a dynamic batch; returns the program."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    torch.export.save(ep, str(path))
    return ep


def export_onnx(model: Any, x: Any, raw: Path, folded: Path) -> None:
    """``raw``: BN kept, as ``torch.onnx.export(dynamo=True, optimize=False)`` writes it;
    ``folded``: the same after constant folding (no rewrite rules, so BN stays). ``model`` may
    be the ExportedProgram already traced for the ``.pt2`` (the exporter then skips its own
    trace, which is most of its time)."""
    import onnx
    import onnx_ir.passes.common as common_passes
    import torch
    from onnxscript.optimizer import fold_constants

    traced = isinstance(model, torch.export.ExportedProgram)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        model,
        () if traced else (x,),
        dynamo=True,
        optimize=False,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=None if traced else ({0: batch},),
        verbose=False,
    )
    onnx.save(program.model_proto, str(raw))
    ir_model = program.model
    common_passes.IdentityEliminationPass()(ir_model)
    fold_constants(ir_model)
    common_passes.RemoveUnusedNodesPass()(ir_model)
    common_passes.RemoveUnusedOpsetsPass()(ir_model)
    onnx.save(program.model_proto, str(folded))


# ---------------------------------------------------------------------------------- counting


def onnx_bn_count(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graphs = [model.graph]
    n = 0
    while graphs:
        g = graphs.pop()
        for node in g.node:
            n += node.op_type == "BatchNormalization"
            for a in node.attribute:
                graphs += [a.g] if a.HasField("g") else list(a.graphs)
    for f in model.functions:
        n += sum(node.op_type == "BatchNormalization" for node in f.node)
    return n


_BN_TARGETS = ("batch_norm", "_native_batch_norm_legit")


def pt2_bn_count(path: Path) -> int:
    import torch

    ep = torch.export.load(str(path))
    return sum(
        1
        for node in ep.graph.nodes
        if node.op == "call_function" and any(t in str(node.target) for t in _BN_TARGETS)
    )


def module_bn_count(model: Any) -> int:
    import torch

    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fx_bn_count(gm: Any) -> int:
    """BN left in a ``torch.fx`` GraphModule, counted in its graph: a BN module that fx traced
    through (timm's ``BatchNormAct2d``) is a functional ``batch_norm`` call there, and the
    GraphModule keeps only its tensors, not the module."""
    import torch

    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            n += isinstance(gm.get_submodule(node.target), torch.nn.modules.batchnorm._BatchNorm)
        elif node.op == "call_function":
            n += "batch_norm" in getattr(node.target, "__name__", str(node.target))
    return n


def two_samples(x: Any) -> Any:
    """``x`` and a second, seeded sample: the batch every result is verified on."""
    import torch

    return torch.cat([x, torch.randn(x.shape, generator=torch.Generator().manual_seed(7))])


def fx_result(model: Any, ref: Any, x2: Any) -> dict[str, Any]:
    """torch.fx's ``fuse`` of ``model``: seconds, BN left in its graph, verified against ``ref``."""
    from torch.fx.experimental.optimization import fuse

    r: dict[str, Any] = {}
    try:
        fused, r["seconds"] = _timed(lambda: fuse(model))
        r["bn_left"] = fx_bn_count(fused)
        r["verified"], r["max_abs"] = _close(ref, torch_out(fused, x2))
    except Exception as exc:
        r["error"] = _error(exc)
    return r


def refresh_fx(name: str, path: Path) -> None:
    """Recount and re-verify torch.fx's result for a record written before ``fx_bn_count``."""
    rec = json.loads(path.read_text())
    if "results" not in rec:
        return
    model, x = build(name)
    model = plain_output(model)
    x2 = two_samples(x)
    rec["results"]["pt2/torch.fx"] = fx_result(model, torch_out(model, x2), x2)
    path.write_text(json.dumps(rec, indent=1))


# --------------------------------------------------------------------------------- verifying


def _close(ref: Any, got: Any) -> tuple[bool, float]:
    import numpy as np

    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        return False, float("inf")
    err = float(np.max(np.abs(ref - got))) if ref.size else 0.0
    return err <= ATOL + RTOL * float(np.max(np.abs(ref))), err


def ort_outputs(path: Path, x: Any) -> list[Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def verify_onnx(refs: list[Any], candidate: Path, x: Any) -> tuple[bool, float]:
    """``candidate`` at ORT_DISABLE_ALL against ``refs``, the unfolded file's outputs."""
    gots = ort_outputs(candidate, x)
    results = [_close(r, g) for r, g in zip(refs, gots, strict=False)]
    ok = len(refs) == len(gots) and all(r[0] for r in results)
    return ok, max((r[1] for r in results), default=0.0)


def torch_out(fn: Any, x: Any) -> Any:
    import torch

    with torch.no_grad():
        y = fn(x)
    return (y[0] if isinstance(y, (tuple, list)) else y).numpy()


# ---------------------------------------------------------------------------------- folding


def _timed(fn: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _error(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300]


def run_bncheck(src: Path, dst: Path) -> dict[str, Any]:
    import bncheck
    from bncheck.errors import BncheckError

    rec: dict[str, Any] = {}
    try:
        res, rec["seconds"] = _timed(lambda: bncheck.fold(src, dst))
    except BncheckError as exc:
        rec["error"] = f"bncheck: error: {exc}"
        return rec
    except Exception as exc:
        rec["error"] = f"bncheck: internal error: {_error(exc)}"
        rec["traceback"] = traceback.format_exc()[-2000:]
        return rec
    v = res.verification
    rec["own_verification"] = None if v is None else bool(v.passed)
    rec["own_samples"] = None if v is None else v.samples
    rec["own_max_abs_error"] = None if v is None else v.max_abs_error
    rec["folded"] = res.folded_count
    if not res.passed:
        rec["error"] = f"verification failed ({v.inputs}: max|Δ| {v.max_abs_error:.3g})"
        # bncheck wrote nothing (exit 1): fold again unverified, so the check here can tell a
        # wrong fold from a bound too tight for the model's output range
        with contextlib.suppress(Exception):
            bncheck.fold(src, dst, verify=False)
    return rec


def onnx_peer(tool: str, src: Path, dst: Path) -> float:
    """Fold ``src`` with a peer tool into ``dst``; returns seconds."""
    import onnx

    t = time.perf_counter()
    if tool == "onnxslim":
        import onnxslim

        with contextlib.redirect_stdout(io.StringIO()):
            out = onnxslim.slim(str(src))
        onnx.save(out, str(dst))
    elif tool == "onnxsim":
        import onnxsim

        out, ok = onnxsim.simplify(onnx.load(str(src)))
        if not ok:
            raise RuntimeError("onnxsim's own check failed")
        onnx.save(out, str(dst))
    elif tool == "onnxoptimizer":
        import onnxoptimizer

        onnx.save(onnxoptimizer.optimize(onnx.load(str(src)), ["fuse_bn_into_conv"]), str(dst))
    elif tool == "ort-basic":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    else:
        raise ValueError(tool)
    return time.perf_counter() - t


def worker(name: str, out: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {"model": name, "input": list(ZOO[name][2])}
    model, x = build(name)
    model = plain_output(model)
    rec["bn_modules"] = module_bn_count(model)
    # exported and compared at batch 2: a batch of 1 would pin the dynamic batch dim
    x2 = two_samples(x)
    ref = torch_out(model, x2)
    rec["output_std"] = float(ref.std())  # a constant output would verify anything
    rec["output_max"] = float(abs(ref).max())

    files = {"pt2": work / "model.pt2", "onnx": work / "model.onnx", "cf": work / "model-cf.onnx"}
    sink = io.StringIO()
    ep = None
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            ep, rec["export_pt2_s"] = _timed(lambda: export_pt2(model, x2, files["pt2"]))
    except Exception as exc:
        rec["export_pt2_error"] = _error(exc)
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            _, rec["export_onnx_s"] = _timed(
                lambda: export_onnx(ep or model, x2, files["onnx"], files["cf"])
            )
    except Exception as exc:
        rec["export_onnx_error"] = _error(exc)

    # torch: bncheck on the .pt2, torch.fx's fuse on the eager model
    results: dict[str, dict[str, Any]] = {}
    if files["pt2"].exists():
        rec["bn_pt2"] = pt2_bn_count(files["pt2"])
        dst = work / "bncheck.pt2"
        r = run_bncheck(files["pt2"], dst)
        if dst.exists():
            r["bn_left"] = pt2_bn_count(dst)
            r["verified"], r["max_abs"] = _close(
                ref, torch_out(torch.export.load(str(dst)).module(), x2)
            )
        results["pt2/bncheck"] = r
    results["pt2/torch.fx"] = fx_result(model, ref, x2)

    x2np = x2.numpy().astype(np.float32)
    for variant in ("onnx", "cf"):
        src = files[variant]
        if not src.exists():
            continue
        rec[f"bn_{variant}"] = onnx_bn_count(src)
        refs: list[Any] = []
        try:
            refs = ort_outputs(src, x2np)
            rec[f"{variant}_runs"] = True
            rec[f"{variant}_vs_torch"] = _close(ref, refs[0])[0]
        except Exception as exc:
            rec[f"{variant}_runs"] = False
            rec[f"{variant}_run_error"] = _error(exc)
        for tool in ONNX_TOOLS:
            dst = work / f"{variant}-{tool}.onnx"
            if tool == "bncheck":
                r = run_bncheck(src, dst)
            else:
                r = {}
                try:
                    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                        r["seconds"] = onnx_peer(tool, src, dst)
                except Exception as exc:
                    r["error"] = _error(exc)
            if dst.exists():
                r["bn_left"] = onnx_bn_count(dst)
                try:
                    r["verified"], r["max_abs"] = verify_onnx(refs, dst, x2np)
                except Exception as exc:
                    r["verified"], r["verify_error"] = False, _error(exc)
            results[f"{variant}/{tool}"] = r
    rec["results"] = results
    for f in work.iterdir():  # keep the records, not the files
        f.unlink()
    work.rmdir()
    return rec


# ---------------------------------------------------------------------------------- the table


def _cell(r: dict[str, Any] | None) -> str:
    if not r:
        return "–"
    if "bn_left" not in r:
        return "fail"
    mark = "" if r.get("verified") else "✗"
    if r.get("own_verification") is False:  # refused by bncheck's own check (exit 1)
        mark += " (exit 1)"
    return f"{r['bn_left']}{mark}"


def table(records: list[dict[str, Any]]) -> str:
    cols = [
        ("pt2", "bncheck"),
        ("pt2", "torch.fx"),
        *[("onnx", t) for t in ONNX_TOOLS],
        *[("cf", t) for t in ONNX_TOOLS],
    ]
    head1 = "| model | BN | .pt2: bncheck | fx | .onnx: bncheck | slim | sim | opt | ORT "
    head1 += "| cf.onnx: bncheck | slim | sim | opt | ORT | bncheck s (pt2/onnx/cf) |"
    lines = [head1, "|---" + "|---:" * (len(cols) + 2) + "|"]
    totals = dict.fromkeys(cols, 0)
    failed: dict[tuple[str, str], int] = dict.fromkeys(cols, 0)
    bn_total = 0
    for rec in records:
        res = rec.get("results", {})
        bn = rec.get("bn_onnx", rec.get("bn_pt2", rec.get("bn_modules", 0)))
        bn_total += bn
        cells = []
        for v, t in cols:
            r = res.get(f"{v}/{t}")
            cells.append(_cell(r))
            if r and "bn_left" in r and r.get("verified") and "error" not in r:
                totals[(v, t)] += r["bn_left"]
            else:
                failed[(v, t)] += 1
                totals[(v, t)] += bn  # a fold that failed or did not verify removed nothing
        secs = "/".join(
            f"{res.get(f'{v}/bncheck', {}).get('seconds', float('nan')):.1f}"
            for v in ("pt2", "onnx", "cf")
        )
        lines.append(f"| {rec['model']} | {bn} | " + " | ".join(cells) + f" | {secs} |")
    lines.append(
        f"| **total ({len(records)} models)** | {bn_total} | "
        + " | ".join(str(totals[c]) for c in cols)
        + " | |"
    )
    lines.append(
        "| not verified or failed | | " + " | ".join(str(failed[c]) for c in cols) + " | |"
    )
    return "\n".join(lines)


def peer_seconds(records: list[dict[str, Any]]) -> str:
    rows = ["| tool | .pt2 / eager s | .onnx s | cf.onnx s |", "|---|---:|---:|---:|"]
    for tool in ("bncheck", "torch.fx", *ONNX_TOOLS[1:]):
        sums = []
        for v in ("pt2", "onnx", "cf"):
            xs = [r.get("results", {}).get(f"{v}/{tool}", {}).get("seconds") for r in records]
            xs = [s for s in xs if s is not None]
            sums.append(f"{sum(xs):.1f}" if xs else "–")
        rows.append(f"| {tool} | " + " | ".join(sums) + " |")
    return "\n".join(rows)


def failures(records: list[dict[str, Any]]) -> list[str]:
    out = []
    for rec in records:
        for k in ("export_pt2_error", "export_onnx_error", "onnx_run_error", "cf_run_error"):
            if k in rec:
                out.append(f"{rec['model']}: {k.removesuffix('_error')}: {rec[k]}")
        for key, r in rec.get("results", {}).items():
            if "error" in r:
                extra = ""
                if "bn_left" in r:
                    ok = "verifies" if r.get("verified") else "does NOT verify"
                    extra = (
                        f" — the same fold unverified {ok} here (max|Δ| {r.get('max_abs', 0):.3g}"
                        f", max|ref| {rec.get('output_max', float('nan')):.3g})"
                    )
                out.append(f"{rec['model']} {key}: {r['error']}{extra}")
            elif "bn_left" in r and not r.get("verified"):
                why = r.get("verify_error") or f"max|Δ| {r.get('max_abs', 'n/a')}"
                out.append(f"{rec['model']} {key}: not verified ({why[:200]})")
    return out


def header() -> str:
    import onnx
    import onnxruntime
    import torch

    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    versions += [f"onnx {onnx.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    for mod in ("torchvision", "timm", "onnxslim", "onnxsim", "onnxoptimizer"):
        try:
            if mod == "torchvision":
                _register_torchvision_schemas()
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            versions.append(f"{mod} missing")
    return "; ".join(versions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bncheck-zoo"))
    ap.add_argument("--only", nargs="*", help="these models only")
    ap.add_argument("--resume", action="store_true", help="keep records already in --out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--table", action="store_true", help="print the table from --out only")
    ap.add_argument("--refresh-fx", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.refresh_fx:
        import torch

        torch.set_num_threads(1)
        warnings.simplefilter("ignore")
        for name in args.only or list(ZOO):
            if (args.out / f"{name}.json").exists():
                refresh_fx(name, args.out / f"{name}.json")
        return
    if args.worker:
        # one process for many models (torch, timm and the exporters load once); the parent
        # starts a new one past a model that crashed it
        for name in args.worker.split(","):
            t = time.perf_counter()
            (args.out / f"{name}.running").write_text("")
            try:
                rec = worker(name, args.out)
            except Exception as exc:  # building or tracing the model failed: one row lost
                rec = {"model": name, "worker_error": _error(exc)}
            rec["worker_s"] = time.perf_counter() - t
            (args.out / f"{name}.json").write_text(json.dumps(rec, indent=1))
            (args.out / f"{name}.running").unlink()
            print(f"{name}: {rec['worker_s']:.0f} s", file=sys.stderr, flush=True)
        return
    names = args.only or list(ZOO)
    if not args.table:
        todo = [n for n in names if not (args.resume and (args.out / f"{n}.json").exists())]
        while todo:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", ",".join(todo), "--out", str(args.out)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
            )
            for line in proc.stderr.splitlines():
                if line.split(":")[0] in todo:
                    print(line, file=sys.stderr, flush=True)
            done = [n for n in todo if (args.out / f"{n}.json").exists()]
            todo = [n for n in todo if n not in done]
            if proc.returncode != 0 and todo:
                crashed = todo.pop(0)
                tail = proc.stderr.strip().splitlines()[-1:]
                (args.out / f"{crashed}.json").write_text(
                    json.dumps({"model": crashed, "worker_error": " ".join(tail)[:500]})
                )
                (args.out / f"{crashed}.running").unlink(missing_ok=True)
    records = []
    for name in names:
        path = args.out / f"{name}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
    print(header())
    print(
        "cells: BN left after the tool (✗: the result did not verify here; '(exit 1)': "
        "bncheck's own verification refused it, and the count is of an unverified fold; "
        "'fail': the tool failed); totals count a failed, refused or unverified fold as "
        "removing nothing\n"
    )
    print(table([r for r in records if "results" in r]))
    print()
    print(peer_seconds([r for r in records if "results" in r]))
    problems = [
        f"{r['model']}: worker: {r['worker_error']}" for r in records if "worker_error" in r
    ]
    problems += failures([r for r in records if "results" in r])
    if problems:
        print("\nfailures and unverified results:")
        print("\n".join(f"- {p}" for p in problems))


if __name__ == "__main__":
    main()
