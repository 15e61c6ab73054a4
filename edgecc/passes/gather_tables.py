"""int8 lookup tables: constant ``Gather`` tables (embeddings) stored as int8, one scale per row.

Part of ``qdq`` and ``dynamic-quant`` (their ``gather=`` option, on by default): a
``Gather(T, idx, axis=0)`` whose table ``T`` is a constant float32 ``[V, D...]`` (BERT's word,
position and token-type embeddings) reads ``DequantizeLinear(T_q, s, 0, axis=0)`` instead::

    s_v = max_d |T[v, d]| / 127 (1: all-zero row),  T_q[v] = clip(round(T[v] / s_v), -127, 127)

symmetric int8, zero point 0, one scale per row ``v`` (per-axis 0: standard ONNX from opset 13),
so each gathered row carries its own range (a rare token's large row does not coarsen the others)
and the error of an element is at most ``s_v / 2``. The Gather output is float, as before: the
graph's semantics are unchanged up to that rounding, and ONNX Runtime runs it as it is (DQ of the
whole table, then Gather). A compiled library (:mod:`edgecc.lower.int8.commute`) stores ``T_q``
(a quarter of the bytes) and dequantizes only the gathered rows:
``take(dequantize(T_q, s), idx) = take(T_q, idx) * take(s, idx)``, exactly.

Declined (a reason in the pass's ``info["declined_tables"]``): Gathers on an axis other than 0,
tables that are not constant, not float32 or of rank < 2 (a 1-D table is a vector of values, not
rows), tables with fewer than ``min_size`` elements or fewer than :data:`MIN_ROWS` rows (BERT's
2-row token-type table: every token reads the same row, so its rounding error is one bias shared
by all tokens instead of independent errors that average out, for ~3 KB saved; on
all-MiniLM-L6-v2 ``dynamic-quant``'s min sentence-embedding cosine vs fp32 is 0.99958 with float
tables, 0.99954 with the word table int8, 0.99940 with the token-type table int8 too), graph
outputs, nodes in ``skip``, and tables also read by a node that is not such a Gather (a tied
output projection: the float copy would stay, so nothing would be saved). Several Gathers of one
table share one int8 copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from edgecc.passes.graph import GraphIndex, attr, value_consumers

ROW_AXIS = 0
# Tables with fewer rows stay float (see the module docstring).
MIN_ROWS = 16


def _is_table_gather(node: onnx.NodeProto) -> bool:
    return node.op_type == "Gather" and int(attr(node, "axis", 0)) == ROW_AXIS


def find_tables(
    index: GraphIndex, skip: Sequence[str] = (), min_size: int = 0
) -> tuple[list[tuple[onnx.NodeProto, str]], list[dict[str, str]]]:
    """The ``(Gather, table)`` pairs to quantize and the declined ones (analysis only)."""
    found: list[tuple[onnx.NodeProto, str]] = []
    declined: list[dict[str, str]] = []
    skip = set(skip)
    for node in index.graph.node:
        if node.op_type != "Gather" or not index.is_const(node.input[0]):
            continue
        name = node.input[0]
        table = index.const(name)
        reason = None
        if node.name in skip or "Gather" in skip:
            reason = "in skip"
        elif not _is_table_gather(node):
            reason = f"Gather on axis {attr(node, 'axis', 0)}, not the row axis 0"
        elif table.dtype != np.float32:
            reason = f"table {name!r} is {table.dtype}, not float32"
        elif table.ndim < 2:
            reason = f"table {name!r} has rank {table.ndim} (rows need rank >= 2)"
        elif table.shape[0] < MIN_ROWS:
            reason = f"table {name!r} has {table.shape[0]} rows < {MIN_ROWS}: kept float"
        elif table.size < min_size:
            reason = f"{table.size} table elements < min_size={min_size}"
        elif name in index.graph_outputs:
            reason = f"table {name!r} is a graph output"
        else:
            others = [c.name for c in value_consumers(index, name) if not _is_table_gather(c)]
            if others:
                reason = f"table {name!r} is also read by {', '.join(sorted(others))}"
        if reason:
            declined.append({"node": node.name, "op": "Gather", "reason": reason})
        else:
            found.append((node, name))
    return found, declined


def quantize_tables(
    model: onnx.ModelProto, weights: Any, skip: Sequence[str] = (), min_size: int = 0
) -> dict[str, Any]:
    """Point every qualifying Gather at a per-row int8 DequantizeLinear of its table, in place.

    Args:
        model: the graph (edited in place: node inputs only; the new DequantizeLinear nodes and
            int8 initializers collect in ``weights``, which the caller finishes).
        weights: the pass's :class:`edgecc.passes.insert_qdq.WeightQuantizer` (one int8 copy
            per ``(table, axis)``, shared with the pass's other weights).
        skip: node names (or ``Gather``) to leave alone.
        min_size: leave tables with fewer elements alone.

    Returns:
        ``{"tables_quantized": [{"node", "table", "shape"}], "declined_tables": [...]}``.
    """
    found, declined = find_tables(weights.index, skip, min_size)
    quantized = []
    for node, name in found:
        shape = list(weights.index.const(name).shape)
        node.input[0] = weights.dequantized(name, ROW_AXIS)[0]
        quantized.append({"node": node.name, "table": name, "shape": shape})
    return {"tables_quantized": quantized, "declined_tables": declined}
