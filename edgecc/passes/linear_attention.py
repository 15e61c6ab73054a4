"""linear-attention: softmax attention becomes kernelised linear attention (elu + 1 features).

Pattern (what torch/transformers exports for ``softmax(Q K^T / sqrt(d) + mask) V``)::

    S = MatMul(Q, Kt)           Kt: K transposed, (..., d, Sk)
    S = Div(S, c) | Mul(S, c)   optional, c a scalar constant
    S = Add(S, M)               optional additive mask, M broadcasting to (..., Sq, Sk)
    A = Softmax(S, axis=-1)
    A = Where(IsNaN(A), 0, A)   optional guard (SDPA exports)
    Y = MatMul(A, V)            V: (..., Sk, dv)

Rewrite (Katharopoulos et al. 2020, "Transformers are RNNs"), ``phi(x) = elu(x) + 1 > 0``::

    Kf = phi(Kt) * w            w = ReduceMax(exp(M), axis=-2): 1 for kept keys, 0 for masked
    Y  = (phi(Q) @ (Kf @ V)) / (phi(Q) @ ReduceSum(Kf, axis=-1) + eps)

i.e. ``Y_i = sum_j phi(q_i).phi(k_j) w_j v_j / sum_j phi(q_i).phi(k_j) w_j``: the softmax kernel
``exp(q.k / sqrt(d))`` is replaced by ``phi(q).phi(k)``, and the cost falls from
``O(Sq Sk (d + dv))`` to ``O((Sq + Sk) d dv)``. ``exp(M)`` turns an additive mask (0 or a large
negative / -inf) into the multiplicative key weight that softmax applies; the key weight must
not depend on the query, so the mask is reduced over its query axis: exact for padding masks
(all rows alike, as BERT's), not for causal or other per-query masks (declined when the mask is
a constant with differing rows; a computed mask is assumed to be a padding mask). The scale
``c`` is dropped (the feature map has no temperature). ``eps = 1e-6`` guards fully masked rows.
The output keeps its tensor name, so ``distill`` after this pass can match the layer outputs.

Not an approximation with a bound: the function changes, so distil afterwards
(``linear-attention,distill``). Declined: a Softmax not on the last axis, a scale that is not
a scalar constant, intermediate tensors read elsewhere (e.g. attention probabilities returned as
graph outputs), nodes in ``skip`` (names of the Softmax nodes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from edgecc.passes.graph import (
    GraphIndex,
    attr,
    check_names,
    infer_types,
    refresh_shapes,
    remove_dead_nodes,
    remove_if_unused,
    static_shape,
    why_unchanged,
)
from edgecc.passes.manager import PassContext, PassResult, register

logger = logging.getLogger(__name__)
EPS = 1e-6


@dataclass
class Attention:
    """One matched softmax attention."""

    q: str
    kt: str
    v: str
    mask: str | None
    output: str
    nodes: list[onnx.NodeProto]  # the matched chain, first MatMul to last


def _only_reader(index: GraphIndex, name: str) -> onnx.NodeProto | None:
    readers = index.consumers.get(name, [])
    if len(readers) != 1 or name in index.graph_outputs:
        return None
    return readers[0]


def match(index: GraphIndex, softmax: onnx.NodeProto, types: dict[str, Any]) -> Attention | str:
    """The attention around ``softmax``, or why it does not match."""
    rank = len(static_shape(types, softmax.input[0]) or [])
    axis = attr(softmax, "axis", -1)
    if axis not in (-1, rank - 1):
        return f"softmax over axis {axis}, not the last"
    chain = [softmax]
    src = index.producer.get(softmax.input[0])
    mask = None
    if src is not None and src.op_type == "Add":
        left = index.producer.get(src.input[0])
        scores_first = left is not None and left.op_type in ("MatMul", "Div", "Mul")
        mask = src.input[1] if scores_first else src.input[0]
        chain.insert(0, src)
        src = index.producer.get(src.input[0] if scores_first else src.input[1])
    if src is not None and src.op_type in ("Div", "Mul"):
        c = index.const(src.input[1])
        if c is None or c.size != 1:
            return f"{src.op_type} {src.name} does not scale by a scalar constant"
        chain.insert(0, src)
        src = index.producer.get(src.input[0])
    if src is None or src.op_type != "MatMul":
        return "the softmax input is not computed by MatMul(Q, K^T)"
    chain.insert(0, src)
    q, kt = src.input[0], src.input[1]
    probs = softmax.output[0]
    readers = index.consumers.get(probs, [])
    if {r.op_type for r in readers} == {"IsNaN", "Where"} and len(readers) == 2:
        isnan = next(r for r in readers if r.op_type == "IsNaN")
        where = next(r for r in readers if r.op_type == "Where")
        if where.input[0] != isnan.output[0] or where.input[2] != probs:
            return "unknown guard after the softmax"
        chain += [isnan, where]
        probs = where.output[0]
    last = _only_reader(index, probs)
    if last is None or last.op_type != "MatMul" or last.input[0] != probs:
        return "the attention probabilities are not only multiplied by V"
    for node in chain[:-1]:
        for out in node.output:
            readers = index.consumers.get(out, [])
            if out in index.graph_outputs or any(r not in chain and r is not last for r in readers):
                return f"{out} is read outside the attention"
    value = index.const(mask) if mask is not None else None
    if value is not None and value.ndim >= 2 and not np.all(value == value[..., :1, :]):
        return "the mask differs between queries (causal?): not a padding mask"
    return Attention(q, kt, last.input[1], mask, last.output[0], [*chain, last])


@register("linear-attention")
class LinearAttention:
    """Replace softmax attention by elu+1 kernelised linear attention.

    Args:
        skip: names of Softmax nodes whose attention stays.
    """

    def __init__(self, skip: Iterable[str] = ()):
        self.skip = {skip} if isinstance(skip, str) else set(skip)

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        check_names(model, "linear-attention: skip", self.skip, op_types=False)
        index = GraphIndex(model)
        types = infer_types(model)
        found: list[Attention] = []
        declined: list[dict[str, str]] = []
        for node in model.graph.node:
            if node.op_type != "Softmax" or node.name in self.skip:
                continue
            got = match(index, node, types)
            if isinstance(got, str):
                logger.info("linear-attention: %s left as is: %s", node.name, got)
                declined.append({"node": node.name, "reason": got})
            else:
                found.append(got)
        info: dict[str, Any] = {"rewritten": [a.output for a in found], "declined": declined}
        if not found:
            why = why_unchanged(model, "linear-attention", declined, "no Softmax attention")
            return PassResult(model, False, info, reason=why)
        one = index.add_initializer("linear_attention_one", np.array(1.0, np.float32))
        eps = index.add_initializer("linear_attention_eps", np.array(EPS, np.float32))
        last_axis = index.add_initializer("linear_attention_axis_last", np.array([-1], np.int64))
        query_axis = index.add_initializer("linear_attention_axis_query", np.array([-2], np.int64))
        replace: dict[str, list[onnx.NodeProto]] = {}
        orphans: set[str] = set()
        for att in found:
            mask_rank = len(static_shape(types, att.mask) or []) if att.mask else 0
            new = _rewrite(index, att, one, eps, last_axis, query_axis if mask_rank >= 2 else None)
            replace[att.nodes[-1].name] = new
            orphans.update(i for n in att.nodes for i in n.input)
        chain = {n.name for att in found for n in att.nodes[:-1]}
        nodes: list[onnx.NodeProto] = []
        for node in model.graph.node:
            if node.name in chain:
                continue
            nodes += replace.get(node.name, [node])
        copies = [onnx.NodeProto() for _ in nodes]
        for c, n in zip(copies, nodes, strict=True):
            c.CopyFrom(n)
        del model.graph.node[:]
        model.graph.node.extend(copies)
        remove_if_unused(model, orphans | remove_dead_nodes(model, orphans))
        refresh_shapes(model)
        return PassResult(model, True, info)


def _rewrite(
    index: GraphIndex,
    att: Attention,
    one: str,
    eps: str,
    last_axis: str,
    query_axis: str | None,
) -> list[onnx.NodeProto]:
    """The nodes computing linear attention into ``att.output``."""
    base = att.nodes[-1].name
    t = {k: index.unique(f"{att.output}_{k}") for k in ("qe", "q", "ke", "k", "kv", "num")}
    t.update({k: index.unique(f"{att.output}_{k}") for k in ("ks", "den", "dene")})
    nodes = [
        index.make_node("Elu", [att.q], [t["qe"]], f"{base}_phi_q_elu"),
        index.make_node("Add", [t["qe"], one], [t["q"]], f"{base}_phi_q"),
        index.make_node("Elu", [att.kt], [t["ke"]], f"{base}_phi_k_elu"),
        index.make_node("Add", [t["ke"], one], [t["k"]], f"{base}_phi_k"),
    ]
    keys = t["k"]
    if att.mask is not None:
        weight = index.unique(f"{att.output}_key_weight")
        exp = index.unique(f"{att.output}_mask_exp")
        nodes.append(index.make_node("Exp", [att.mask], [exp], f"{base}_mask_exp"))
        if query_axis is not None:
            nodes.append(
                index.make_node(
                    "ReduceMax", [exp, query_axis], [weight], f"{base}_key_weight", keepdims=1
                )
            )
        else:
            weight = exp
        keys = index.unique(f"{att.output}_k_masked")
        nodes.append(index.make_node("Mul", [t["k"], weight], [keys], f"{base}_mask_keys"))
    nodes += [
        index.make_node("MatMul", [keys, att.v], [t["kv"]], f"{base}_kv"),
        index.make_node("MatMul", [t["q"], t["kv"]], [t["num"]], f"{base}_num"),
        index.make_node("ReduceSum", [keys, last_axis], [t["ks"]], f"{base}_key_sum", keepdims=1),
        index.make_node("MatMul", [t["q"], t["ks"]], [t["den"]], f"{base}_den"),
        index.make_node("Add", [t["den"], eps], [t["dene"]], f"{base}_den_eps"),
        index.make_node("Div", [t["num"], t["dene"]], [att.output], f"{base}_out"),
    ]
    return nodes
