"""Split Gemm/MatMul/Conv weights into two thinner factors by truncated SVD.

For a constant weight seen as a ``K x N`` matrix ``W`` (K reduced, N outputs) with SVD
``W = U S V^T``, keep the ``r`` largest singular values::

    W ~ W_r = (U_r S_r^1/2) (S_r^1/2 V_r^T)          (K x r) (r x N)

so ``x @ W`` becomes ``(x @ A) @ B``. By Eckart-Young ``W_r`` is the best rank-``r`` approximation
and ``||W - W_r||_F^2 / ||W||_F^2 = 1 - sum_{i<r} s_i^2 / sum_i s_i^2`` (one minus the energy
kept). The SVD comes from the eigendecomposition of the smaller Gram matrix (``W^T W`` or
``W W^T``): ``s_i^2`` are its eigenvalues and ``U = W V / s``. On a 1536 x 384 weight that took
0.2-0.4 s where NumPy's SVD took 1.2-8 s (OpenBLAS threads on a busy 2-core machine), and it is
accurate for the singular values worth keeping (relative error about ``eps (s_max / s_i)^2``).
The rank comes from one option:

- ``rank=r``: that rank (at most ``min(K, N)``);
- ``ratio=f``: the largest ``r`` whose factors hold a fraction ``f`` of the layer's parameters,
  ``r = floor(f K N / (K + N))`` (at least 1);
- ``energy=e`` (default 0.95 when no option is given): the smallest ``r`` whose singular values
  keep a fraction ``e`` of ``sum s_i^2``.

Patterns:

- ``MatMul(x, W)``, W a constant 2-D ``K x N``: ``MatMul(MatMul(x, A), B)`` (x may be N-D);
- ``Gemm(a, B, C)``: W = B (``transB=0``) or B^T (``transB=1``); ``Gemm(Gemm(a, A), B, C)`` with
  ``transA``/``alpha``/``beta``/``C`` as before; with ``transB=1`` the factors are stored
  transposed, keeping the layout;
- ``Conv`` with ``group=1`` and kernel ``k`` (any spatial rank): ``W`` (O, I, k...) read as the
  ``(I prod(k)) x O`` matrix; a ``k`` conv to ``r`` channels (same strides, pads, dilations, no
  bias) then a 1x1 conv to ``O`` channels with the bias.

A split is made only where it saves parameters and MACs, ``r (K + N) < K N`` (for a Conv both
counts shrink by the same factor); otherwise, and in these cases, the layer is declined with a
reason in ``info["declined"]``: non-constant or batched (> 2-D) weights, MatMul with a constant
first operand (``W @ x``), grouped convolutions, all-zero weights, layers with fewer than
``min_size`` weight elements, nodes in ``skip`` (names or op types), and weights also read by a
node that is not split the same way (a tied embedding, say: the float weight would have to stay,
so nothing would be saved). With ``only``, layers not named there are left alone
without a decline entry. Nodes sharing one weight with the same layout share its factors.

Per layer ``info["layers"]`` gives the rank chosen, the energy kept and the relative
reconstruction error ``||W - A B||_F / ||W||_F`` measured on the stored factors.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from edgecc.errors import UserInputError
from edgecc.passes.graph import (
    GraphIndex,
    attr,
    check_names,
    const_value,
    fold_shape_reads,
    infer_types,
    refresh_shapes,
    remove_dead_nodes,
    remove_if_unused,
    value_consumers,
    why_unchanged,
)
from edgecc.passes.insert_qdq import as_list, computed_weight, matches
from edgecc.passes.manager import PassContext, PassResult, register

logger = logging.getLogger(__name__)

DEFAULT_ENERGY = 0.95
# cumulative energies are sums of float64 squares; a target met within this is met
ENERGY_TOLERANCE = 1e-9


@dataclass
class Layer:
    """A node whose weight can be split: ``layout`` says how the matrix sits in the weight."""

    node: onnx.NodeProto
    weight: str
    layout: str  # "matmul" (K x N), "gemm-t" (N x K), "conv" (O, I, k...)

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """The weight as the ``K x N`` matrix (float64)."""
        w = w.astype(np.float64)
        if self.layout == "matmul":
            return w
        if self.layout == "gemm-t":
            return w.T
        return w.reshape(w.shape[0], -1).T


def gram_svd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U, s, V^T`` of a float64 matrix (thin, singular values descending) from the
    eigendecomposition of its smaller Gram matrix (see module docstring)."""
    if m.shape[0] < m.shape[1]:
        u, s, vt = gram_svd(m.T)
        return vt.T, s, u.T
    evals, v = np.linalg.eigh(m.T @ m)
    order = np.argsort(evals)[::-1]
    s = np.sqrt(np.clip(evals[order], 0.0, None))
    v = v[:, order]
    u = (m @ v) / np.where(s > 0, s, 1.0)  # a zero singular value's column is never needed
    return u, s, v.T


def choose_rank(
    s: np.ndarray, k: int, n: int, rank: int | None, ratio: float | None, energy: float | None
) -> int:
    """The rank for singular values ``s`` of a ``k x n`` matrix (see module docstring)."""
    full = min(k, n)
    if rank is not None:
        return min(rank, full)
    if ratio is not None:
        return max(1, min(full, math.floor(ratio * k * n / (k + n))))
    cum = np.cumsum(s.astype(np.float64) ** 2)
    cum /= cum[-1]
    return min(full, int(np.searchsorted(cum, energy - ENERGY_TOLERANCE)) + 1)


def find_layers(
    model: onnx.ModelProto, skip: Sequence[str], min_size: int
) -> tuple[dict[str, list[Layer]], list[dict[str, str]]]:
    """The splittable layers grouped by weight, and the declined ones with reasons.

    Analysis only: the graph is not changed.
    """
    index = GraphIndex(model)
    layers, declined = [], []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        found = _layer(node, index, skip, min_size)
        if isinstance(found, str):
            declined.append({"node": node.name, "op": node.op_type, "reason": found})
        else:
            layers.append(found)
    by_weight: dict[str, list[Layer]] = defaultdict(list)
    for layer in layers:
        by_weight[layer.weight].append(layer)
    kept: dict[str, list[Layer]] = {}
    for weight, group in by_weight.items():
        names = {g.node.name for g in group}
        others = [c.name for c in value_consumers(index, weight) if c.name not in names]
        layouts = {g.layout for g in group}
        reason = (
            f"weight {weight!r} is also read by {', '.join(others)}"
            if others
            else f"weight {weight!r} is shared by layers of different layouts"
            if len(layouts) > 1
            else f"weight {weight!r} is a graph output"
            if weight in index.graph_outputs
            else None
        )
        if reason is None:
            kept[weight] = group
        else:
            declined += [
                {"node": g.node.name, "op": g.node.op_type, "reason": reason} for g in group
            ]
    return kept, declined


def _layer(
    node: onnx.NodeProto, index: GraphIndex, skip: Sequence[str], min_size: int
) -> Layer | str:
    """The layer for ``node``, or why it is declined."""
    if matches(node, skip):
        return "in skip"
    a, b = node.input[0], node.input[1]
    if node.op_type == "MatMul" and index.is_const(a) and not index.is_const(b):
        return "constant first operand (W @ x) is not handled"
    if not index.is_const(b):
        return computed_weight(index, b) or f"weight {b!r} is not constant"
    w = index.const(b)
    if node.op_type == "Conv":
        if attr(node, "group", 1) != 1:
            return f"grouped convolution (group={attr(node, 'group')})"
        layout = "conv"
    elif w.ndim != 2:
        return f"weight {b!r} is {w.ndim}-D; only 2-D weights are split"
    else:
        layout = "gemm-t" if node.op_type == "Gemm" and attr(node, "transB", 0) else "matmul"
    if w.dtype.kind != "f":
        return f"weight {b!r} is {w.dtype}, not floating point"
    if w.size < min_size:
        return f"{w.size} weight elements < min_size={min_size}"
    return Layer(node, b, layout)


@register("lowrank")
class SplitLowRank:
    """Low-rank split of Gemm/MatMul/Conv weights by truncated SVD (see module docstring).

    Args:
        rank: keep this rank.
        ratio: keep this fraction of each layer's parameters (0 < ratio < 1).
        energy: keep this fraction of the squared singular values (0 < energy <= 1); the default
            (0.95) when none of ``rank``/``ratio``/``energy`` is given.
        min_size: leave weights with fewer elements alone.
        skip: node names or op types to leave alone.
        only: node names: split these layers only (per-layer sensitivity); None splits all.
    """

    name = "lowrank"

    def __init__(
        self,
        rank: int | None = None,
        ratio: float | None = None,
        energy: float | None = None,
        min_size: int = 0,
        skip: str | Sequence[str] | None = None,
        only: str | Sequence[str] | None = None,
    ):
        given = {
            k: v for k, v in (("rank", rank), ("ratio", ratio), ("energy", energy)) if v is not None
        }
        if len(given) > 1:
            raise UserInputError(
                f"lowrank: give one of rank, ratio, energy (got {', '.join(given)})"
            )
        if not given:
            energy = DEFAULT_ENERGY
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise UserInputError(f"lowrank: rank must be an integer >= 1, got {rank!r}")
        if ratio is not None and not 0 < ratio < 1:
            raise UserInputError(f"lowrank: ratio must be in (0, 1), got {ratio}")
        if energy is not None and not 0 < energy <= 1:
            raise UserInputError(f"lowrank: energy must be in (0, 1], got {energy}")
        self.rank, self.ratio, self.energy = rank, ratio, energy
        self.min_size, self.skip = int(min_size), as_list(skip)
        self.only = None if only is None else as_list(only)

    def option(self) -> str:
        if self.rank is not None:
            return f"rank={self.rank}"
        return f"ratio={self.ratio}" if self.ratio is not None else f"energy={self.energy}"

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        check_names(model, "lowrank: skip", self.skip)
        check_names(model, "lowrank: only", self.only or [], op_types=False)
        groups, declined = find_layers(model, self.skip, self.min_size)
        index = GraphIndex(model)
        replacements: dict[str, list[onnx.NodeProto]] = {}
        report: list[dict[str, Any]] = []
        types = infer_types(model)
        for group in groups.values():
            if self.only is not None and not {g.node.name for g in group} & set(self.only):
                continue  # restricted to other layers
            split = self._factor(group[0], index)
            if isinstance(split, str):
                declined += [
                    {"node": g.node.name, "op": g.node.op_type, "reason": split} for g in group
                ]
                continue
            (first, second), row = split
            report.append({**row, "nodes": [g.node.name for g in group]})
            for g in group:
                replacements[g.node.name] = _split_nodes(g, first, second, index, types)
        info: dict[str, Any] = {"option": self.option(), "layers": report, "declined": declined}
        if not replacements:
            why = why_unchanged(model, "lowrank", declined, "no Conv/Gemm/MatMul weight")
            return PassResult(model, False, info, reason=why)
        orphans = {
            i
            for group in groups.values()
            for g in group
            if g.node.name in replacements
            for i in g.node.input
        }
        _replace_nodes(model, replacements)
        fold_shape_reads(model, groups)
        remove_if_unused(model, orphans | remove_dead_nodes(model, orphans))
        info["params_before"] = sum(r["params_before"] for r in report)
        info["params_after"] = sum(r["params_after"] for r in report)
        logger.info(
            "lowrank(%s): split %d weights, %d -> %d parameters",
            self.option(),
            len(report),
            info["params_before"],
            info["params_after"],
        )
        refresh_shapes(model)
        return PassResult(model, True, info)

    def _factor(
        self, layer: Layer, index: GraphIndex
    ) -> tuple[tuple[str, str], dict[str, Any]] | str:
        """Add the two factors of ``layer``'s weight; their names and a report row, or why not."""
        w = index.const(layer.weight)
        m = layer.matrix(w)
        k, n = m.shape
        u, s, vt = gram_svd(m)
        if not s.size or s[0] == 0:
            return f"weight {layer.weight!r} is all zeros"
        r = choose_rank(s, k, n, self.rank, self.ratio, self.energy)
        if r * (k + n) >= k * n:
            return f"rank {r} saves nothing: r(K+N) = {r * (k + n)} >= KN = {k * n} (K={k}, N={n})"
        root = np.sqrt(s[:r])
        a = (u[:, :r] * root).astype(w.dtype)  # K x r
        b = (root[:, None] * vt[:r]).astype(w.dtype)  # r x N
        error = np.linalg.norm(m - a.astype(np.float64) @ b) / np.linalg.norm(m)
        if layer.layout == "gemm-t":
            a, b = a.T, b.T
        elif layer.layout == "conv":
            a = a.T.reshape(r, *w.shape[1:])
            b = b.T.reshape(w.shape[0], r, *([1] * (w.ndim - 2)))
        names = (
            index.add_initializer(f"{layer.weight}_lowrank_a", a),
            index.add_initializer(f"{layer.weight}_lowrank_b", b),
        )
        row = {
            "weight": layer.weight,
            "shape": [k, n],
            "rank": r,
            "full_rank": min(k, n),
            "params_before": k * n,
            "params_after": r * (k + n),
            "energy_kept": float(np.sum(s[:r] ** 2) / np.sum(s**2)),
            "rel_error": float(error),
        }
        return names, row


def _split_nodes(
    layer: Layer, first: str, second: str, index: GraphIndex, types: dict[str, onnx.TypeProto]
) -> list[onnx.NodeProto]:
    """The two nodes replacing ``layer.node``, reading the factors ``first`` and ``second``.

    A bias computed from constants (torch writes ``Expand(Shape(W))`` zeros for bias-free
    convolutions) becomes an initializer, so the chain reading the old weight can go.
    """
    node = layer.node
    x, y = node.input[0], node.output[0]
    mid = index.unique(f"{y}_lowrank")
    rest = [i for i in node.input[2:3] if i]  # Gemm C / Conv bias
    if rest and not index.is_const(rest[0]):
        value = const_value(index, rest[0], types)
        if value is not None:
            rest = [index.add_initializer(f"{node.name}_bias", value)]
    names = (f"{node.name}_lowrank_1", f"{node.name}_lowrank_2")
    if node.op_type == "MatMul":
        return [
            index.make_node("MatMul", [x, first], [mid], names[0]),
            index.make_node("MatMul", [mid, second], [y], names[1]),
        ]
    if node.op_type == "Gemm":
        trans_b = attr(node, "transB", 0)
        return [
            index.make_node(
                "Gemm", [x, first], [mid], names[0], transA=attr(node, "transA", 0), transB=trans_b
            ),
            index.make_node(
                "Gemm",
                [mid, second, *rest],
                [y],
                names[1],
                transB=trans_b,
                alpha=attr(node, "alpha", 1.0),
                beta=attr(node, "beta", 1.0),
            ),
        ]
    conv = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    spatial = index.const(layer.weight).ndim - 2
    return [
        index.make_node("Conv", [x, first], [mid], names[0], **conv),
        index.make_node("Conv", [mid, second, *rest], [y], names[1], kernel_shape=[1] * spatial),
    ]


def _replace_nodes(model: onnx.ModelProto, replacements: dict[str, list[onnx.NodeProto]]) -> None:
    """Put each node named in ``replacements`` back as its list of nodes, in place, in order."""
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if node.name in replacements:
            nodes += replacements[node.name]
        else:
            nodes.append(onnx.NodeProto())
            nodes[-1].CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
