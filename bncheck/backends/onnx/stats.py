"""Statistics glue for ONNX models: BN input moments per batch, and new running statistics.

``moment_runner`` runs a *copy* of the graph in which every BatchNormalization input is also a
graph output, so its per-channel moments come out of onnxruntime with the model's own outputs.
With ``batch_stats`` every BN of the copy gets ``training_mode=1`` (opset ≥ 14): it normalizes
with the statistics of the current batch, as in training, while nothing else changes and the
running statistics it would output are discarded. The moments themselves are
``bncheck.numerics.Moments`` in float64. Never imports torch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bncheck.backends.onnx.graph import node_label, opset_version
from bncheck.errors import InputError
from bncheck.numerics import Moments

MomentRunner = Callable[[Mapping[str, np.ndarray]], tuple[list[np.ndarray], dict[str, Moments]]]


def _bn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [
        n
        for n in model.graph.node
        if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
    ]


def moment_runner(handle: Any, *, batch_stats: bool) -> MomentRunner:
    """One batch in → (model outputs, {BN layer name: Moments of its input})."""
    from bncheck.backends.onnx.run import make_session

    model = copy.deepcopy(handle.model)
    bns = _bn_nodes(model)
    if batch_stats and bns and (opset_version(model) or 0) < 14:
        raise InputError(
            f"{handle.path}: batch statistics need opset 14 or newer (training_mode); "
            "convert the model with onnx.version_converter first"
        )
    n_outputs = len(model.graph.output)
    watched: dict[str, list[str]] = {}  # tensor → BN layer names reading it
    for node in bns:
        watched.setdefault(node.input[0], []).append(node_label(node))
        if batch_stats:
            _set_training(node)
    existing = {o.name for o in model.graph.output}
    taps = [t for t in watched if t not in existing]
    for t in taps:
        model.graph.output.append(helper.make_empty_tensor_value_info(t))
    session = make_session(model, source=str(handle.path))
    out_names = [o.name for o in model.graph.output]
    index = {name: i for i, name in enumerate(out_names)}

    def run(feeds: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], dict[str, Moments]]:
        try:
            values = session.run(out_names, dict(feeds))
        except Exception as exc:
            from bncheck.backends.onnx.run import ort_message

            raise InputError(f"{handle.path}: onnxruntime run failed: {ort_message(exc)}") from None
        moments: dict[str, Moments] = {}
        for tensor, layers in watched.items():
            m = Moments.from_batch(values[index[tensor]], channel_axis=1)
            for layer in layers:  # a BN node reading the same tensor twice still counts once
                moments[layer] = moments[layer] + m if layer in moments else m
        return list(values[:n_outputs]), moments

    return run


def _set_training(node: onnx.NodeProto) -> None:
    """``training_mode=1`` with the running-statistics outputs the spec then requires."""
    kept = [a for a in node.attribute if a.name != "training_mode"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("training_mode", 1)])
    y = node.output[0]
    del node.output[1:]
    node.output.extend([f"{y}__bncheck_running_mean", f"{y}__bncheck_running_var"])


def with_stats(
    handle: Any,
    stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    num_batches: int | None = None,
) -> Any:
    """A new handle whose BN ``mean``/``var`` initializers hold ``stats`` (name → (mean, var)),
    cast to the stored dtype; every other tensor is left as it was. An initializer that another
    node also reads is copied under a new name instead of being changed."""
    from bncheck.backends.onnx import OnnxHandle

    model = copy.deepcopy(handle.model)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    taken = set(inits) | {o for n in g.node for o in n.output}
    found = set()
    for node in _bn_nodes(model):
        name = node_label(node)
        if name not in stats:
            continue
        found.add(name)
        for slot, value in zip((3, 4), stats[name], strict=True):
            old = node.input[slot]
            if old not in inits:
                raise InputError(f"{handle.path}: BN '{name}' statistics are not stored tensors")
            dtype = numpy_helper.to_array(inits[old]).dtype
            arr = np.asarray(value, dtype=np.float64).astype(dtype)
            if readers.get(old, 0) == 1:
                inits[old].CopyFrom(numpy_helper.from_array(arr, old))
            else:
                new = f"{old}_{name}_recalibrated"
                while new in taken:
                    new += "_"
                taken.add(new)
                g.initializer.append(numpy_helper.from_array(arr, new))
                node.input[slot] = new
    missing = set(stats) - found
    if missing:
        raise InputError(f"{handle.path}: no BN layer named {sorted(missing)[0]!r}")
    return OnnxHandle(
        handle.path, model, input_shapes=handle.input_shapes, external_data=handle.external_data
    )
