"""Weight-only int8: store constant MatMul/Gemm/LSTM/GRU weights as int8 + DequantizeLinear.

Each weight is quantized per output channel, symmetrically (as in :mod:`edgecc.passes.insert_qdq`)::

    s_c = max|W_c| / 127,   W_q = clip(round(W / s_c), -127, 127),   W ~ W_q * s_c

and the op reads ``DequantizeLinear(W_q, s, 0)`` instead of ``W``. Activations stay float, so no
calibration is needed and the arithmetic is float: the gain is a ~4x smaller weight store (what
dominates transformer and RNN model size), the cost a per-channel rounding error of at most
``s_c / 2`` per element. Channel axes: MatMul ``x @ W`` the last axis of W (``W @ x``: the
second-to-last axis of W); Gemm the N axis of B (0 with ``transB=1``, else 1); LSTM/GRU ``W``
(input 1) and ``R`` (input 2), shaped ``(directions, gates * hidden, size)``, axis 1 (one scale per
gate row, shared by the directions). Biases stay float. With ``gather=True`` (the default)
constant Gather tables (embeddings) are stored as int8 too, one scale per row
(:mod:`edgecc.passes.gather_tables`: on all-MiniLM-L6-v2 the word embedding is 40% of the
weights); ``gather=False`` keeps them float.

Declined, with a reason in ``info["declined"]``: non-constant or non-float32 weights, weights with
fewer than ``min_size`` elements, nodes in ``skip`` (names or op types), and weights also read by a
node that is not quantized (a tied embedding, say: the float copy would have to stay, so nothing
would be saved). ``info`` reports the model bytes before and after. The model needs ONNX opset
>= 13 (per-axis DequantizeLinear).

``activations`` says how a compiled library runs the quantized MatMul/Gemm (the graph is the same
either way; the choice is recorded in the model's metadata under :data:`ACTIVATIONS_KEY` for the
lowering, :mod:`edgecc.lower.int8_dynamic`): ``per-row`` (default) quantizes each activation row
to uint8 at run time and multiplies in integers, ``per-tensor`` does the same with one range per
tensor (ONNX Runtime's ``quantize_dynamic`` arithmetic), ``float`` keeps float activations and a
float matmul on dequantized weights (what ONNX Runtime computes for this graph).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from edgecc.errors import UserInputError
from edgecc.passes.gather_tables import find_tables, quantize_tables
from edgecc.passes.graph import GraphIndex, check_names, value_consumers, why_unchanged
from edgecc.passes.insert_qdq import (
    MIN_OPSET,
    WeightQuantizer,
    as_list,
    computed_weight,
    finish,
    matches,
    opset,
    weight_axis,
)
from edgecc.passes.manager import PassContext, PassResult, register

logger = logging.getLogger(__name__)

ACTIVATIONS_KEY = "edgecc.dynamic_quant.activations"
ACTIVATION_MODES = ("per-row", "per-tensor", "float")

WEIGHT_SLOTS = {"MatMul": (0, 1), "Gemm": (1,), "LSTM": (1, 2), "GRU": (1, 2)}


def _axis(node: onnx.NodeProto, slot: int, rank: int) -> int | None:
    """The output-channel axis of the weight in input ``slot`` of ``node``."""
    if node.op_type in ("LSTM", "GRU"):
        return 1
    if node.op_type == "MatMul" and slot == 0:
        return rank - 2 if rank >= 2 else None
    return weight_axis(node, rank)


def find_weights(
    model: onnx.ModelProto, skip: Sequence[str], min_size: int
) -> tuple[list[tuple[onnx.NodeProto, int, str]], list[dict[str, str]]]:
    """The ``(node, input slot, weight)`` to quantize and the declined ones (analysis only)."""
    index = GraphIndex(model)
    found, declined = [], []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_SLOTS:
            continue
        if matches(node, skip):
            declined.append({"node": node.name, "op": node.op_type, "reason": "in skip"})
            continue
        slots = [
            s
            for s in WEIGHT_SLOTS[node.op_type]
            if s < len(node.input) and node.input[s] and index.is_const(node.input[s])
        ]
        if node.op_type == "MatMul":
            slots = slots[-1:]  # x @ W, or W @ x when only the first operand is constant
        if not slots:
            declined.append(
                {
                    "node": node.name,
                    "op": node.op_type,
                    "reason": computed_weight(index, node.input[1]) or "no constant weight",
                }
            )
        for slot in slots:
            name = node.input[slot]
            reason = _decline(name, index, min_size)
            if reason:
                declined.append({"node": node.name, "op": node.op_type, "reason": reason})
            else:
                found.append((node, slot, name))
    targets = {(n.name, name) for n, _, name in found}
    shared = {
        name
        for _, _, name in found
        if any((c.name, name) not in targets for c in value_consumers(index, name))
    }
    for node, _, name in found:
        if name in shared:
            others = sorted(
                {c.name for c in value_consumers(index, name) if (c.name, name) not in targets}
            )
            declined.append(
                {
                    "node": node.name,
                    "op": node.op_type,
                    "reason": f"weight {name!r} is also read by {', '.join(others)}",
                }
            )
    return [f for f in found if f[2] not in shared], declined


def _decline(name: str, index: GraphIndex, min_size: int) -> str | None:
    w = index.const(name)
    if w.dtype != np.float32:
        return f"weight {name!r} is {w.dtype}, not float32"
    if w.size < min_size:
        return f"{w.size} weight elements < min_size={min_size}"
    if name in index.graph_outputs:
        return f"weight {name!r} is a graph output"
    return None


@register("dynamic-quant")
class QuantizeDynamic:
    """Weight-only int8 for MatMul/Gemm/LSTM/GRU (see module docstring).

    Args:
        skip: node names or op types to leave alone.
        min_size: leave weights with fewer elements alone.
        activations: ``per-row``, ``per-tensor`` or ``float``: how compiled libraries treat the
            activations of the quantized MatMul/Gemm (see the module docstring).
        gather: also store constant Gather tables (embeddings) as int8 with one scale per row
            (:mod:`edgecc.passes.gather_tables`); on by default.
    """

    name = "dynamic-quant"

    def __init__(
        self,
        skip: str | Sequence[str] | None = None,
        min_size: int = 0,
        activations: str = "per-row",
        gather: bool = True,
    ):
        self.skip, self.min_size = as_list(skip), int(min_size)
        if activations not in ACTIVATION_MODES:
            raise UserInputError(
                f"dynamic-quant: activations={activations} must be one of "
                f"{', '.join(ACTIVATION_MODES)}"
            )
        self.activations = activations
        self.gather = bool(gather)

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        check_names(model, "dynamic-quant: skip", self.skip)
        found, declined = find_weights(model, self.skip, self.min_size)
        info: dict[str, Any] = {"declined": declined, "bytes_before": model.ByteSize()}
        tables = find_tables(GraphIndex(model), self.skip, self.min_size)[0] if self.gather else []
        if not found and not tables:
            info["bytes_after"] = info["bytes_before"]
            why = why_unchanged(model, "dynamic-quant", declined, "no MatMul/Gemm weight")
            return PassResult(model, False, info, reason=why)
        if opset(model) < MIN_OPSET:
            raise UserInputError(
                f"dynamic-quant needs ONNX opset >= {MIN_OPSET} (per-channel "
                f"DequantizeLinear); the model imports opset {opset(model)}"
            )
        index = GraphIndex(model)
        weights = WeightQuantizer(index)
        for node, slot, name in found:
            axis = _axis(node, slot, index.const(name).ndim)
            node.input[slot] = weights.dequantized(name, axis)[0]
        if self.gather:
            info.update(quantize_tables(model, weights, self.skip, self.min_size))
        finish(model, weights.nodes, weights.replaced)
        props = {p.key: p.value for p in model.metadata_props}
        props[ACTIVATIONS_KEY] = self.activations
        onnx.helper.set_model_props(model, props)
        info.update(
            {
                "quantized": [{"node": n.name, "op": n.op_type, "weight": w} for n, _, w in found],
                "bytes_after": model.ByteSize(),
            }
        )
        info["ratio"] = info["bytes_after"] / info["bytes_before"]
        logger.info(
            "dynamic-quant: %d weights and Gather tables to int8, %d -> %d bytes",
            len(weights.weights),
            info["bytes_before"],
            info["bytes_after"],
        )
        return PassResult(model, True, info)
