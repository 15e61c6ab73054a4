"""linear-attention: the rewritten graph computes the elu+1 linear attention formula (checked
against NumPy), with and without masks and guards; declines."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from edgecc.passes.manager import PassManager, parse_pipeline
from edgecc.report.compare import run_onnx
from tests.models import onnx_model, tensor

H, S, D = 2, 6, 4


def _attention(mask: str | None, guard: bool = False, axis: int = -1, probs_out: bool = False):
    """softmax(Q K^T / sqrt(d) [+ mask]) V with Q, K, V (1, H, S, D) and a mask input."""
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], "tk", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], "qk"),
        helper.make_node("Div", ["s", "scale"], ["sd"], "div"),
    ]
    scores = "sd"
    inputs = [tensor(n, [1, H, S, D]) for n in ("q", "k", "v")]
    inits = {"scale": np.array(np.sqrt(D), np.float32)}
    if mask == "padding":  # (1, 1, 1, S): 0 or -inf, as an input (computed in real models)
        inputs.append(tensor("m", [1, 1, 1, S]))
    elif mask == "expanded":  # (1, 1, S, S) as SDPA exports give it
        inputs.append(tensor("m", [1, 1, S, S]))
    elif mask == "causal":
        inits["m"] = np.triu(np.full((S, S), -np.inf, np.float32), 1)[None, None]
    if mask:
        nodes.append(helper.make_node("Add", ["sd", "m"], ["sm"], "mask"))
        scores = "sm"
    nodes.append(helper.make_node("Softmax", [scores], ["p"], "softmax", axis=axis))
    probs = "p"
    if guard:
        inits["zero"] = np.array(0.0, np.float32)
        nodes += [
            helper.make_node("IsNaN", ["p"], ["nan"], "isnan"),
            helper.make_node("Where", ["nan", "zero", "p"], ["pg"], "guard"),
        ]
        probs = "pg"
    nodes.append(helper.make_node("MatMul", [probs, "v"], ["y"], "av"))
    outputs = [tensor("y", [1, H, S, D])] + ([tensor("p", [1, H, S, S])] if probs_out else [])
    return onnx_model(nodes, inputs, outputs, inits)


def linear_attention(q, k, v, key_weight=None, eps=1e-6):
    """phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1), phi = elu + 1, keys weighted."""
    phi = lambda x: np.where(x > 0, x + 1, np.exp(x))  # noqa: E731  elu(x) + 1
    kf = phi(k) * (1 if key_weight is None else key_weight[..., :, None])
    num = phi(q) @ (np.swapaxes(kf, -1, -2) @ v)
    den = phi(q) @ kf.sum(-2)[..., None]
    return num / (den + eps)


def _feeds(mask: str | None):
    rng = np.random.default_rng(0)
    f = {n: rng.normal(size=(1, H, S, D)).astype(np.float32) for n in ("q", "k", "v")}
    keep = np.array([1, 1, 1, 1, 0, 0], np.float32)
    add = np.where(keep > 0, 0, -np.inf).astype(np.float32)
    if mask == "padding":
        f["m"] = add[None, None, None]
    elif mask == "expanded":
        f["m"] = np.broadcast_to(add, (1, 1, S, S)).copy()
    return f, (keep[None, None] if mask else None)


@pytest.mark.parametrize(
    ("mask", "guard"), [(None, False), ("padding", False), ("expanded", True), (None, True)]
)
def test_matches_the_formula(mask: str | None, guard: bool) -> None:
    model = _attention(mask, guard)
    manager = PassManager(parse_pipeline("linear-attention"))
    out = manager.run(model)
    assert manager.records[-1].modified
    assert "Softmax" not in {n.op_type for n in out.graph.node}
    feeds, weight = _feeds(mask)
    got = run_onnx(out, feeds)["y"]
    want = linear_attention(feeds["q"], feeds["k"], feeds["v"], weight)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"mask": "causal"}, "differs between queries"),
        ({"mask": None, "axis": 2}, "not the last"),
        ({"mask": None, "probs_out": True}, "not only multiplied by V"),
    ],
)
def test_declines(kwargs: dict, reason: str) -> None:
    model = _attention(**kwargs)
    manager = PassManager(parse_pipeline("linear-attention"))
    out = manager.run(model)
    record = manager.records[-1]
    assert not record.modified
    assert reason in record.info["declined"][0]["reason"]
    assert "Softmax" in {n.op_type for n in out.graph.node}
