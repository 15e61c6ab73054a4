"""depthwise-separable: a k x k convolution becomes a depthwise k x k conv and a 1 x 1 conv.

Maths. A ``group=1`` Conv with weight ``W`` of shape ``(O, C, k...)`` computes
``y_o = sum_c W[o, c] * x_c`` (``*`` the spatial correlation). With a depth multiplier ``m``
(option ``rank``) the replacement computes ``y_o = sum_c sum_j P[o, c m + j] (D[c m + j] * x_c)``:
a depthwise conv ``D`` of shape ``(C m, 1, k...)`` with ``group=C`` and the original strides,
pads and dilations, then a pointwise conv ``P`` of shape ``(O, C m, 1...)`` with the bias. So the
effective kernel is ``W'[o, c] = sum_j P[o, c m + j] D[c m + j]``: for every input channel ``c``
the ``O x prod(k)`` matrix ``M_c = W[:, c]`` is replaced by a rank-``m`` matrix. The Frobenius
error ``||W - W'||^2 = sum_c ||M_c - M'_c||^2`` separates over ``c``, so the least-squares
optimum is the truncated SVD of each ``M_c`` (Eckart-Young): with ``M_c = U S V^T``,
``P[:, c m + j] = sqrt(s_j) u_j`` and ``D[c m + j] = sqrt(s_j) v_j``, and the relative error is
``sqrt(sum_c sum_{j >= m} s_{c,j}^2 / ||W||^2)``, reported per layer. When every ``M_c`` has rank
``<= m`` (an exactly separable conv) the rewrite is exact up to rounding; otherwise it is lossy
(distil afterwards: ``depthwise-separable,distill``).

Cost. Parameters and MACs per output pixel go from ``O C K`` to ``C m (K + O)`` (``K = prod(k)``),
so a layer is rewritten only when ``m (K + O) < O K``.

Declined, with a reason in ``info["declined"]``: grouped or depthwise convs, 1 x 1 kernels
(nothing to separate), non-constant or shared weights, fewer than ``min_channels`` input
channels, no saving, nodes in ``skip`` (names or op types), and layers whose relative error
would exceed ``max_error``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx

from edgecc.errors import UserInputError
from edgecc.passes.graph import (
    GraphIndex,
    attr,
    check_names,
    const_value,
    infer_types,
    refresh_shapes,
    remove_dead_nodes,
    remove_if_unused,
    why_unchanged,
)
from edgecc.passes.manager import PassContext, PassResult, register
from edgecc.passes.split_lowrank import _replace_nodes

logger = logging.getLogger(__name__)


def separate(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Depthwise ``(C m, 1, k...)`` and pointwise ``(O, C m, 1...)`` weights and the relative
    Frobenius error of their product against ``w`` (``(O, C, k...)``), ``m = rank``."""
    o, c = w.shape[:2]
    spatial = w.shape[2:]
    m = np.moveaxis(w.astype(np.float64).reshape(o, c, -1), 1, 0)  # C x O x K
    u, s, vt = np.linalg.svd(m, full_matrices=False)  # C x O x r, C x r, C x r x K
    r = min(rank, s.shape[1])
    root = np.sqrt(s[:, :r])
    d = root[:, :, None] * vt[:, :r]  # C x r x K
    p = u[:, :, :r] * root[:, None, :]  # C x O x r
    approx = np.einsum("cor,crk->cok", p, d)
    norm = np.linalg.norm(m)
    error = float(np.linalg.norm(m - approx) / norm) if norm > 0 else 0.0
    if r < rank:  # fewer singular values than the multiplier: pad with zero channels
        d = np.concatenate([d, np.zeros((c, rank - r, d.shape[2]))], axis=1)
        p = np.concatenate([p, np.zeros((c, o, rank - r))], axis=2)
    depthwise = d.reshape(c * rank, 1, *spatial).astype(w.dtype)
    pointwise = np.moveaxis(p, 0, 1).reshape(o, c * rank, *([1] * len(spatial))).astype(w.dtype)
    return depthwise, pointwise, error


@register("depthwise-separable")
class DepthwiseSeparable:
    """Replace k x k convolutions by depthwise k x k + pointwise 1 x 1 (least-squares init).

    Args:
        rank: depth multiplier ``m``: depthwise output channels per input channel.
        min_channels: rewrite only convs with at least this many input channels.
        max_error: decline layers whose relative weight error would exceed this (None: any).
        skip: node names or op types left as they are.
    """

    def __init__(
        self,
        rank: int = 1,
        min_channels: int = 8,
        max_error: float | None = None,
        skip: Iterable[str] = (),
    ):
        if rank < 1:
            raise UserInputError(f"depthwise-separable: rank must be >= 1, got {rank}")
        if min_channels < 1:
            raise UserInputError(
                f"depthwise-separable: min_channels must be >= 1, got {min_channels}"
            )
        if max_error is not None and not max_error > 0:
            raise UserInputError(f"depthwise-separable: max_error must be > 0, got {max_error}")
        self.rank, self.min_channels, self.max_error = rank, min_channels, max_error
        self.skip = {skip} if isinstance(skip, str) else set(skip)

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        check_names(model, "depthwise-separable: skip", self.skip)
        index = GraphIndex(model)
        types = infer_types(model)
        replacements: dict[str, list[onnx.NodeProto]] = {}
        layers: list[dict[str, Any]] = []
        declined: list[dict[str, str]] = []
        orphans: set[str] = set()
        for node in model.graph.node:
            if node.op_type != "Conv":
                continue
            found = self._rewrite(node, index, types)
            if isinstance(found, str):
                logger.info("depthwise-separable: %s left as is: %s", node.name, found)
                declined.append({"node": node.name, "reason": found})
                continue
            replacements[node.name], row = found
            layers.append(row)
            orphans.update(i for i in node.input[1:] if i)
        info: dict[str, Any] = {"layers": layers, "declined": declined}
        if not replacements:
            why = why_unchanged(model, "depthwise-separable", declined, "no Conv in the graph")
            return PassResult(model, False, info, reason=why)
        _replace_nodes(model, replacements)
        remove_if_unused(model, orphans | remove_dead_nodes(model, orphans))
        refresh_shapes(model)
        info["params_before"] = sum(r["params_before"] for r in layers)
        info["params_after"] = sum(r["params_after"] for r in layers)
        return PassResult(model, True, info)

    def _rewrite(
        self, node: onnx.NodeProto, index: GraphIndex, types: dict[str, onnx.TypeProto]
    ) -> tuple[list[onnx.NodeProto], dict[str, Any]] | str:
        """The depthwise and pointwise nodes replacing ``node`` and a report row, or why not."""
        if node.name in self.skip or node.op_type in self.skip:
            return "listed in skip"
        if attr(node, "group", 1) != 1:
            return f"grouped conv (group={attr(node, 'group', 1)})"
        w = index.const(node.input[1])
        if w is None:
            return "the weight is not constant"
        if index.uses(node.input[1]) > 1:
            return "the weight is shared with another node"
        o, c = w.shape[:2]
        k = int(np.prod(w.shape[2:]))
        if k == 1:
            return "1x1 kernel: nothing to separate"
        if c < self.min_channels:
            return f"{c} input channels < min_channels={self.min_channels}"
        if self.rank * (k + o) >= o * k:
            return f"no saving: m(K+O) = {self.rank * (k + o)} >= OK = {o * k}"
        depthwise, pointwise, error = separate(w, self.rank)
        if self.max_error is not None and error > self.max_error:
            return f"relative error {error:.3g} > max_error={self.max_error}"
        rest = [i for i in node.input[2:3] if i]
        if rest and not index.is_const(rest[0]):
            value = const_value(index, rest[0], types)
            if value is None:
                return "the bias is not constant"
            rest = [index.add_initializer(f"{node.name}_bias", value)]
        conv = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        conv.update(group=c, kernel_shape=list(w.shape[2:]))
        mid = index.unique(f"{node.output[0]}_depthwise")
        d_name = index.add_initializer(f"{node.input[1]}_depthwise", depthwise)
        p_name = index.add_initializer(f"{node.input[1]}_pointwise", pointwise)
        nodes = [
            index.make_node("Conv", [node.input[0], d_name], [mid], f"{node.name}_dw", **conv),
            index.make_node(
                "Conv",
                [mid, p_name, *rest],
                [node.output[0]],
                f"{node.name}_pw",
                kernel_shape=[1] * (w.ndim - 2),
            ),
        ]
        row = {
            "node": node.name,
            "shape": list(w.shape),
            "rank": self.rank,
            "params_before": int(w.size),
            "params_after": int(depthwise.size + pointwise.size),
            "rel_error": error,
        }
        return nodes, row
