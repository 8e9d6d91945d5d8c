"""Summed conv branches on one input (RepVGG, MobileOne) merge into one Conv, identity BNs
included, and only when the branches line up.

Outputs compared under onnxruntime at ORT_DISABLE_ALL with test_onnx_fold's ``assert_same``
(fp32: |Δ| ≤ 1e-5 + 1e-4·max|ref|; the merge is exact in float64, what is left is float32
rounding of the summed kernels and a reordered sum). BN statistics and γ/β are random, signed.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_onnx_fold import assert_same, bn_inits, bn_node, model_of, w

from bncheck.backends.onnx import reparam


def conv(name, x, y, wname, *, k, group=1, stride=1, pad=None, bias=None):
    pad = k // 2 if pad is None else pad
    ins = [x, wname] + ([bias] if bias else [])
    return helper.make_node(
        "Conv", ins, [y], name=name, group=group, strides=[stride] * 2, pads=[pad] * 4
    )


def repvgg(c=4, *, group=1, stride=1, identity=True, pad1=0, relu=True, dtype=np.float32):
    """x → Relu → {3×3+BN, 1×1+BN, BN} → Add → Add → Relu → y (RepVGG's training block)."""
    cg = c // group
    inits = [w("W3", c, cg, 3, 3, dtype=dtype), w("W1", c, cg, 1, 1, dtype=dtype)]
    inits += [*bn_inits("bn3", c, dtype), *bn_inits("bn1", c, dtype)]
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu_in"),
        conv("conv3", "h", "c3", "W3", k=3, group=group, stride=stride),
        bn_node("bn3", "c3", "b3"),
        conv("conv1", "h", "c1", "W1", k=1, group=group, stride=stride, pad=pad1),
        bn_node("bn1", "c1", "b1"),
        helper.make_node("Add", ["b3", "b1"], ["s"], name="add_branches"),
    ]
    last = "s"
    if identity:
        inits += bn_inits("bnid", c, dtype)
        nodes += [
            bn_node("bnid", "h", "bi"),
            helper.make_node("Add", ["s", "bi"], ["t"], name="add_id"),
        ]
        last = "t"
    nodes.append(helper.make_node("Relu" if relu else "Identity", [last], ["y"], name="relu_out"))
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    return model_of(nodes, inits, (2, c, 7, 7), dtype=elem)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("group", [1, 2, 4])
def test_repvgg_block_becomes_one_conv(group):
    folded, steps = assert_same(repvgg(group=group))
    assert ops(folded.model) == ["Relu", "Conv", "Relu"]
    assert [(s.layer, s.into) for s in steps] == [
        ("bn3", "producer"),
        ("bn1", "producer"),
        ("bnid", "producer"),
    ]
    assert steps[2].target == "conv3 (branches merged at Add 'add_id')"
    conv_node = folded.model.graph.node[1]
    wt = next(t for t in folded.model.graph.initializer if t.name == conv_node.input[1])
    assert list(wt.dims) == [4, 4 // group, 3, 3] and len(conv_node.input) == 3


def test_fp16_repvgg_block():
    # fp16 keeps 11 bits: the merged kernel is rounded once (test_onnx_fold's fp16 bound)
    folded, _ = assert_same(repvgg(dtype=np.float16), rtol=1e-2, atol=1e-3, dtype=np.float16)
    assert ops(folded.model) == ["Relu", "Conv", "Relu"]
    assert {t.data_type for t in folded.model.graph.initializer} == {TensorProto.FLOAT16}


def test_repvgg_merge_matches_a_float64_reference():
    # the merged kernel against the branches computed by hand in float64
    handle = repvgg(identity=True, relu=False)
    folded, _ = handle.folded()
    init = {
        t.name: onnx.numpy_helper.to_array(t).astype(np.float64)
        for t in handle.model.graph.initializer
    }
    got = {t.name: onnx.numpy_helper.to_array(t) for t in folded.model.graph.initializer}
    node = folded.model.graph.node[1]
    w_m, b_m = got[node.input[1]].astype(np.float64), got[node.input[2]].astype(np.float64)

    def st(p):
        s = init[f"{p}_scale"] / np.sqrt(init[f"{p}_var"] + np.float32(1e-3))
        return s, init[f"{p}_beta"] - init[f"{p}_mean"] * s

    (s3, t3), (s1, t1), (si, ti) = st("bn3"), st("bn1"), st("bnid")
    ref = init["W3"] * s3[:, None, None, None]
    ref[:, :, 1:2, 1:2] += init["W1"] * s1[:, None, None, None]
    ref[np.arange(4), np.arange(4), 1, 1] += si
    # float32 storage of the merged kernel: |Δ| ≤ one float32 ulp of the largest entry
    assert np.max(np.abs(w_m - ref)) <= 2 * np.finfo(np.float32).eps * np.max(np.abs(ref))
    assert np.max(np.abs(b_m - (t3 + t1 + ti))) <= 2 * np.finfo(np.float32).eps * np.max(
        np.abs(t3 + t1 + ti)
    )


def test_stride2_block_without_identity_merges():
    folded, steps = assert_same(repvgg(stride=2, identity=False))
    assert ops(folded.model) == ["Relu", "Conv", "Relu"]
    assert [s.into for s in steps] == ["producer", "producer"]


def test_mobileone_block_with_several_kxk_branches():
    """MobileOne: 1×1 scale branch + identity BN + three 3×3 branches, depthwise, summed in
    the order timm writes them (``out = scale + identity; out += conv_k(x)`` per branch)."""
    c = 6
    inits = [*bn_inits("bns", c), *bn_inits("bnid", c), w("Ws", c, 1, 1, 1)]
    nodes = [
        conv("scale", "x", "cs", "Ws", k=1, group=c),
        bn_node("bns", "cs", "bs"),
        bn_node("bnid", "x", "bi"),
        helper.make_node("Add", ["bs", "bi"], ["o0"], name="add0"),
    ]
    for i in range(3):
        inits += [w(f"Wk{i}", c, 1, 3, 3), *bn_inits(f"bnk{i}", c)]
        nodes += [
            conv(f"convk{i}", "x", f"ck{i}", f"Wk{i}", k=3, group=c),
            bn_node(f"bnk{i}", f"ck{i}", f"bk{i}"),
            helper.make_node("Add", [f"o{i}", f"bk{i}"], [f"o{i + 1}"], name=f"add{i + 1}"),
        ]
    nodes.append(helper.make_node("Relu", ["o3"], ["y"], name="act"))
    folded, steps = assert_same(model_of(nodes, inits, (2, c, 6, 6)))
    assert ops(folded.model) == ["Conv", "Relu"]
    assert len(steps) == 5 and all(s.into == "producer" for s in steps)


def test_constants_in_the_sum_go_into_the_bias():
    # timm's MobileOne without a scale branch writes ``0 + conv_kxk(x)``, exported as an Add of a
    # scalar constant; a per-channel (1, C, 1, 1) constant folds the same way
    c = 4
    inits = [w("Wa", c, c, 3, 3), w("Wb", c, c, 3, 3), *bn_inits("bna", c), *bn_inits("bnb", c)]
    inits += [numpy_helper.from_array(np.array(0.5, np.float32), "half"), w("pc", 1, c, 1, 1)]
    nodes = [
        conv("conva", "x", "ca", "Wa", k=3),
        bn_node("bna", "ca", "ba"),
        helper.make_node("Add", ["ba", "half"], ["s0"], name="add0"),
        conv("convb", "x", "cb", "Wb", k=3),
        bn_node("bnb", "cb", "bb"),
        helper.make_node("Add", ["s0", "bb"], ["s1"], name="add1"),
        helper.make_node("Add", ["pc", "s1"], ["y"], name="add2"),
    ]
    folded, _ = assert_same(model_of(nodes, inits, (2, c, 5, 5)))
    assert ops(folded.model) == ["Conv"]


def test_a_constant_that_broadcasts_over_more_than_channels_stays():
    c = 4
    inits = [w("Wa", c, c, 3, 3), w("Wb", c, c, 1, 1), w("big", 1, c, 5, 5)]
    nodes = [
        conv("conva", "x", "ca", "Wa", k=3),
        conv("convb", "x", "cb", "Wb", k=1),
        helper.make_node("Add", ["ca", "cb"], ["s0"], name="add0"),
        helper.make_node("Add", ["s0", "big"], ["y"], name="add1"),
    ]
    folded, _ = assert_same(model_of(nodes, inits, (2, c, 5, 5)))
    assert ops(folded.model) == ["Conv", "Add"]  # the two convs merge below the constant


def test_fastvit_repmixer_signed_weighted_sum():
    """FastViT's RepMixer: ``x + γ·(mixer(x) − norm(x))`` with mixer = DWConv+BN + BN(x) and
    norm = BN(x) + 0, γ of shape (C, 1, 1): one depthwise Conv, as timm's reparameterize gives."""
    c = 4
    inits = [w("Wd", c, 1, 3, 3), *bn_inits("bnd", c), *bn_inits("bnm", c), *bn_inits("bnn", c)]
    inits += [w("gamma", c, 1, 1), numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [
        conv("dw", "x", "cd", "Wd", k=3, group=c),
        bn_node("bnd", "cd", "bd"),
        bn_node("bnm", "x", "bm"),
        helper.make_node("Add", ["bd", "bm"], ["mixer"], name="mix_add"),
        bn_node("bnn", "x", "bn_"),
        helper.make_node("Add", ["bn_", "zero"], ["norm"], name="norm_add"),
        helper.make_node("Sub", ["mixer", "norm"], ["diff"], name="sub"),
        helper.make_node("Mul", ["diff", "gamma"], ["scaled"], name="layer_scale"),
        helper.make_node("Add", ["x", "scaled"], ["y"], name="residual"),
    ]
    folded, steps = assert_same(model_of(nodes, inits, (2, c, 6, 6)))
    assert ops(folded.model) == ["Conv"]
    assert [s.into for s in steps] == ["producer"] * 3
    assert steps[2].target == "dw (branches merged at Add 'residual')"


def test_bare_identity_and_conv_without_bn_merge():
    # FastViT's RepCPE: x + DWConv(x) (bias, no BN) becomes one conv
    inits = [w("W", 4, 1, 3, 3), w("B", 4)]
    nodes = [
        conv("pe", "x", "p", "W", k=3, group=4, bias="B"),
        helper.make_node("Add", ["p", "x"], ["y"], name="add"),
    ]
    folded, steps = assert_same(model_of(nodes, inits, (2, 4, 5, 5)))
    assert ops(folded.model) == ["Conv"] and steps == []


def test_mismatched_stride_is_not_merged_and_says_why():
    # 3×3 at stride 1 without padding and 1×1 at stride 2 with padding 1 both give 4×4 from
    # 6×6, so the sum is valid, but they read different inputs: no merge
    c = 4
    inits = [w("W3", c, c, 3, 3), w("W1", c, c, 1, 1), *bn_inits("bn3", c), *bn_inits("bn1", c)]
    nodes = [
        conv("conv3", "x", "c3", "W3", k=3, pad=0),
        bn_node("bn3", "c3", "b3"),
        conv("conv1", "x", "c1", "W1", k=1, stride=2, pad=1),
        bn_node("bn1", "c1", "b1"),
        helper.make_node("Add", ["b3", "b1"], ["y"], name="add"),
    ]
    handle = model_of(nodes, inits, (2, c, 6, 6))
    folded, steps = assert_same(handle)
    assert ops(folded.model) == ["Conv", "Conv", "Add"]
    assert [s.into for s in steps] == ["producer", "producer"]
    add = handle.model.graph.node[-1]
    why = reparam.match_group(handle.index, add, reparam._planned(handle.index))
    assert why == "the convolutions summed at Add 'add' differ in stride or dilation"


def test_identity_bn_beside_a_strided_conv_is_kept_with_reason():
    # at 1×1 spatial a stride-2 3×3 conv and x have the same shape; the merge still needs
    # stride 1, so the identity BN stays (and says why), or becomes affine with --affine
    c = 4
    inits = [w("W3", c, c, 3, 3), *bn_inits("bn3", c), *bn_inits("bnid", c)]
    nodes = [
        conv("conv3", "x", "c3", "W3", k=3, stride=2),
        bn_node("bn3", "c3", "b3"),
        bn_node("bnid", "x", "bi"),
        helper.make_node("Add", ["b3", "bi"], ["y"], name="add"),
    ]
    handle = model_of(nodes, inits, (2, c, 1, 1))
    _, steps = assert_same(handle, bn_left=1)
    assert steps[1].into is None
    assert "no branch merge: an identity branch at Add 'add' needs stride 1" in steps[1].reason
    folded, steps = assert_same(handle, affine=True)
    assert steps[1].into == "affine" and ops(folded.model) == ["Conv", "Mul", "Add", "Add"]


def test_cli_fold_and_inspect_agree_on_a_repvgg_block(tmp_path, run_cli):
    src, out = tmp_path / "repvgg.onnx", tmp_path / "folded.onnx"
    onnx.save(repvgg(group=2).model, src)
    result = run_cli("inspect", src, "--format", "json")
    assert result.code == 0, result
    layers = json.loads(result.out)["bn_layers"]
    assert [layer["fold"]["into"] for layer in layers] == ["producer"] * 3
    result = run_cli("fold", src, "-o", out, "--format", "json")
    assert result.code == 0, result
    doc = json.loads(result.out)
    assert doc["summary"]["folded"] == 3 and doc["after"]["bn_layers"] == 0
    assert doc["verification"]["passed"]
    assert ops(onnx.load(str(out))) == ["Relu", "Conv", "Relu"]
    assert run_cli("inspect", out).code == 0
