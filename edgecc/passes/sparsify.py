"""sparsify: unstructured magnitude pruning of Conv/ConvTranspose/Gemm/MatMul weights.

Maths. With ``scope="layer"`` each weight tensor ``W`` loses its ``k = floor(amount * W.size)``
entries of smallest ``|w|`` (ties broken by position, so exactly ``k`` are zero afterwards, counting
ones that already were); with ``scope="global"`` the ``floor(amount * N)`` smallest magnitudes
over all ``N`` weight entries go, so layers with small weights lose more. Biases are untouched.

What it is for: dense kernels do not get faster from unstructured sparsity; it helps
compression only (a zipped package shrinks; the ONNX file and the compiled library do not).
Accuracy drops with ``amount``: fine-tune afterwards, or use ``prune`` for real speed-ups.

Gradual: ``sparsify(amount=a,steps=N),distill`` sparsifies in ``N`` steps on a cubic schedule,
distilling in between (:mod:`edgecc.passes.gradual`); zeros stay zero through ``distill``.

Declined, with the reason logged and listed in ``info["declined"]``: weights that are not
constant, and weights also read by anything other than a Conv/ConvTranspose/Gemm/MatMul weight
input (zeroing would change that reader). A weight shared by several such ops is sparsified
once, for all of them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx

from edgecc.errors import UserInputError
from edgecc.passes.graph import (
    GraphIndex,
    check_names,
    const_value,
    remove_dead_nodes,
    remove_if_unused,
    value_consumers,
    why_unchanged,
)
from edgecc.passes.manager import PassContext, PassResult, register

logger = logging.getLogger(__name__)

NOTE = "dense kernels do not get faster from unstructured sparsity; it helps compression only"
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@register("sparsify")
class Sparsify:
    """Zero the smallest-magnitude weights of every Conv/ConvTranspose/Gemm/MatMul.

    Args:
        amount: fraction of weight entries to zero, in [0, 1].
        scope: ``"layer"`` (that fraction of every weight) or ``"global"`` (of all weights).
        skip: names of nodes whose weights stay dense.
        steps: with a ``distill`` right after, reach ``amount`` in this many sparsify/distill
            steps on a cubic schedule (expanded by the pass manager, see
            :mod:`edgecc.passes.gradual`); 1 is one shot.
    """

    def __init__(
        self,
        amount: float = 0.5,
        scope: str = "layer",
        skip: Iterable[str] = (),
        steps: int = 1,
    ):
        if steps != 1:
            raise UserInputError(
                f"sparsify: steps={steps} is expanded by the pass manager (needs distill after it)"
            )
        if not 0 <= float(amount) <= 1:
            raise UserInputError(f"sparsify: amount must be in [0, 1], got {amount}")
        if scope not in ("layer", "global"):
            raise UserInputError(f"sparsify: scope must be 'layer' or 'global', got {scope!r}")
        self.amount, self.scope = float(amount), scope
        self.skip = {skip} if isinstance(skip, str) else set(skip)

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        check_names(model, "sparsify: skip", self.skip, op_types=False)
        index = GraphIndex(model)
        weights, declined = self._weights(index)
        new = self._sparsify({name: value for name, (value, _) in weights.items()})
        changed = {n for n, v in new.items() if not np.array_equal(v, weights[n][0])}
        total = sum(v.size for v in new.values())
        info: dict[str, Any] = {
            "note": NOTE,
            "amount": self.amount,
            "scope": self.scope,
            "achieved_sparsity": sum(int((v == 0).sum()) for v in new.values()) / total
            if total
            else 0.0,
            "layers": {n: float((v == 0).mean()) for n, v in new.items()},
            "declined": declined,
        }
        logger.info(
            "sparsify: %.1f%% of %d weights zero (%s)", 100 * info["achieved_sparsity"], total, NOTE
        )
        orphaned = set()
        for name in sorted(changed):
            if name in index.initializers and name not in index.graph_inputs:
                index.set_initializer(name, new[name])
                continue
            sparse = index.add_initializer(f"{name}_sparse", new[name])
            for node in weights[name][1]:
                node.input[1] = sparse
            orphaned.add(name)
        remove_if_unused(model, orphaned | remove_dead_nodes(model, orphaned))
        why = why_unchanged(
            model, "sparsify", declined, f"no weight to sparsify at amount {self.amount}"
        )
        return PassResult(model, bool(changed), info, reason="" if changed else why)

    def _weights(self, index: GraphIndex) -> tuple[dict[str, tuple[np.ndarray, list]], list]:
        """Weight name -> (value, nodes reading it as weight), and the declined weights."""
        weights: dict[str, tuple[np.ndarray, list[onnx.NodeProto]]] = {}
        declined: list[dict[str, str]] = []
        for node in index.graph.node:
            if node.op_type not in WEIGHT_OPS or len(node.input) < 2 or node.name in self.skip:
                continue
            name = node.input[1]
            if name in weights:
                weights[name][1].append(node)
                continue
            value = const_value(index, name)
            reason = self._decline(index, name, value)
            if reason:
                logger.info("sparsify: %s (%s) left dense: %s", node.name, name, reason)
                declined.append({"node": node.name, "weight": name, "reason": reason})
            else:
                weights[name] = (value, [node])
        return weights, declined

    def _decline(self, index: GraphIndex, name: str, value: np.ndarray | None) -> str | None:
        """Why the weight ``name`` must stay as it is, or None."""
        if value is None or name in index.graph_outputs:
            return "the weight is not constant"
        if not np.issubdtype(value.dtype, np.floating):
            return f"the weight is {value.dtype}, not floating point"
        others = [
            r.name or r.op_type
            for r in value_consumers(index, name)
            if r.op_type not in WEIGHT_OPS or list(r.input).index(name) != 1 or r.name in self.skip
        ]
        return f"the weight is also read by {', '.join(others)}" if others else None

    def _sparsify(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The weights with the smallest magnitudes zeroed, per layer or globally."""
        if self.scope == "layer":
            return {n: _zero_smallest([w], self.amount)[0] for n, w in weights.items()}
        return dict(zip(weights, _zero_smallest(list(weights.values()), self.amount), strict=True))


def _zero_smallest(arrays: list[np.ndarray], amount: float) -> list[np.ndarray]:
    """Zero the ``floor(amount * N)`` smallest-magnitude entries over all ``arrays``."""
    flat = (
        np.concatenate([np.abs(a.astype(np.float64)).ravel() for a in arrays])
        if arrays
        else np.zeros(0)
    )
    k = math.floor(amount * flat.size + 1e-9)
    mask = np.ones(flat.size, bool)
    mask[np.argsort(flat, kind="stable")[:k]] = False
    out, start = [], 0
    for a in arrays:
        out.append(np.where(mask[start : start + a.size].reshape(a.shape), a, 0).astype(a.dtype))
        start += a.size
    return out
