"""Find the BatchNormalization nodes (and other norms) of an ONNX graph and describe them.

Whether and where each BN folds is decided by :mod:`bncheck.backends.onnx.fold_plan` (its names
are re-exported here for existing callers).
"""

from __future__ import annotations

import ast

import numpy as np
from onnx import NodeProto

from bncheck.backends.onnx.fold_plan import (
    WEIGHTED_OPS,
    BNFacts,
    FoldPlan,
    _is_default_domain,
    _weighted,
    bn_facts,
    fold_plan,
    plan_fold,
)
from bncheck.backends.onnx.graph import GraphIndex, attr, node_label, opset_version, tensor_specs
from bncheck.errors import InputError
from bncheck.layers import BNLayer, ModelInfo, Neighbour, NormLayer

__all__ = [
    "WEIGHTED_OPS",
    "BNFacts",
    "FoldPlan",
    "bn_facts",
    "bn_layer",
    "discover",
    "fold_plan",
    "neighbour",
    "norm_layer",
    "plan_fold",
]


def _has_weights(index: GraphIndex, node: NodeProto) -> bool:
    if not _weighted(node):
        return False
    if node.op_type == "MatMul":
        return any(index.is_constant(i) for i in node.input[:2])
    return len(node.input) > 1 and index.is_constant(node.input[1])


def neighbour(index: GraphIndex, node: NodeProto) -> Neighbour:
    """A node as a :class:`Neighbour` (op normalized for weighted ops, raw op type otherwise)."""
    return Neighbour(node_label(node), node.op_type, _has_weights(index, node))


def _validate_bn(index: GraphIndex, facts: BNFacts) -> None:
    """A BN whose constant tensors are not float or disagree in length is a broken model."""
    label = node_label(facts.node)
    arrays = dict(zip(("scale", "bias", "mean", "var"),
                      (facts.scale, facts.bias, facts.mean, facts.var), strict=True))  # fmt: skip
    for what, arr in arrays.items():
        # bfloat16 (ml_dtypes) has numpy kind "V": judge by name.
        if arr is not None and not arr.dtype.name.startswith(("float", "bfloat")):
            raise InputError(
                f"{index.source}: BatchNormalization '{label}' {what} is {arr.dtype.name}; "
                "the ONNX spec requires a float tensor"
            )
    sizes = {what: arr.size for what, arr in arrays.items() if arr is not None}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in sizes.items())
        raise InputError(
            f"{index.source}: BatchNormalization '{label}' tensors differ in length ({listed})"
        )


def bn_layer(index: GraphIndex, bn: NodeProto) -> BNLayer:
    """A BatchNormalization node as a framework-neutral :class:`BNLayer`."""
    facts = bn_facts(index, bn)
    _validate_bn(index, facts)
    plan = fold_plan(index, bn, facts)
    src = plan.producer or plan.source
    if src is not None:
        producer: Neighbour | None = neighbour(index, src)
    elif facts.x in index.graph_inputs:
        producer = Neighbour(facts.x, "input")
    else:
        producer = Neighbour(facts.x, "Constant") if index.is_constant(facts.x) else None
    consumers = [neighbour(index, n) for n in index.uses(facts.y)]
    if index.is_graph_output(facts.y):
        consumers.append(Neighbour(facts.y, "output"))
    stats = facts.mean if facts.mean is not None else facts.var
    params = facts.scale if facts.scale is not None else facts.bias
    return BNLayer(
        name=node_label(bn),
        kind="BatchNormalization",
        channels=facts.channels,
        eps=facts.eps,
        momentum=facts.momentum,
        affine=True,
        track_running_stats=True,
        training=facts.training,
        num_batches_tracked=None,
        running_mean=facts.mean,
        running_var=facts.var,
        weight=facts.scale,
        bias=facts.bias,
        stats_dtype=None if stats is None else stats.dtype.name,
        param_dtype=None if params is None else params.dtype.name,
        producer=producer,
        consumers=tuple(consumers),
        call_sites=1,
        fold=plan.decision,
        origin=torch_origin(bn),
    )


def torch_origin(node: NodeProto) -> str | None:
    """The PyTorch module path torch's exporter recorded for ``node`` (``layer1.bn1``), if any.

    The dynamo exporter stores ``pkg.torch.onnx.name_scopes``, a Python list literal whose
    second-to-last entry is the module path; parsed with ``ast.literal_eval`` (no code runs).
    """
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            if isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str):
                return scopes[-2] or None
    return None


# op type -> (attribute holding a count shown in the shape, its label)
_NORM_OPS = {
    "LayerNormalization": None,
    "RMSNormalization": None,
    "InstanceNormalization": None,
    "GroupNormalization": ("num_groups", "groups"),
    # onnxruntime contrib ops that exporters and optimizers emit
    "SimplifiedLayerNormalization": None,
    "SkipLayerNormalization": None,
    "SkipSimplifiedLayerNormalization": None,
    "GroupNorm": ("groups", "groups"),
}


def norm_layer(index: GraphIndex, node: NodeProto) -> NormLayer:
    """A non-BN normalization node for the inventory.

    ``shape`` is the scale's dims joined by ``x`` (``768``, ``4x8``), plus the normalized
    ``axis`` for Layer/RMS norms and the group count for group norms.
    """
    scale = node.input[2 if node.op_type.startswith("Skip") else 1] if len(node.input) > 1 else ""
    dims = index.shape(scale) if scale else None
    parts = []
    if dims:
        parts.append("x".join("?" if not isinstance(d, int) else str(d) for d in dims))
    counted = _NORM_OPS.get(node.op_type)
    if counted is not None:
        # GroupNormalization's scale is per group before opset 21, per channel after.
        if dims:
            parts[0] = f"scale {parts[0]}"
        parts.insert(0, f"{attr(node, counted[0], '?')} {counted[1]}")
    if "axis" in {a.name for a in node.attribute} or node.op_type in (
        "LayerNormalization",
        "RMSNormalization",
    ):
        parts.append(f"axis {attr(node, 'axis', -1)}")
    eps = attr(node, "epsilon", 1e-5)
    return NormLayer(
        name=node_label(node),
        kind=node.op_type,
        shape=", ".join(parts) or "?",
        eps=float(str(np.float32(eps))) if eps is not None else None,
        affine=bool(scale),
    )


def discover(index: GraphIndex, path: str) -> ModelInfo:
    """Everything static about the top-level graph of ``index.model`` as a :class:`ModelInfo`."""
    model = index.model
    g = model.graph
    bns = tuple(
        bn_layer(index, n)
        for n in g.node
        if n.op_type == "BatchNormalization" and _is_default_domain(n)
    )
    norms = tuple(norm_layer(index, n) for n in g.node if n.op_type in _NORM_OPS)
    params = sum(_count(t.dims) for t in g.initializer)
    params += sum(_count(s.dims) for s in g.sparse_initializer)
    # Paddle and older exporters store every weight as a Constant node, no initializers.
    params += sum(_count(t.dims) for t in index.constant_nodes.values())
    inits = set(index.initializers)
    return ModelInfo(
        path=path,
        format="onnx",
        framework="onnx",
        bn_layers=bns,
        norm_layers=norms,
        inputs=tensor_specs([i for i in g.input if i.name not in inits]),
        outputs=tensor_specs(list(g.output)),
        training=any(b.training for b in bns),
        graph_error=None,
        opset=opset_version(model),
        parameters=params,
        nodes=len(g.node),
    )


def _count(dims: object) -> int:
    n = 1
    for d in dims:  # type: ignore[attr-defined]
        n *= int(d)
    return n
