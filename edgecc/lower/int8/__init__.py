"""Integer lowering of QDQ graphs (static int8): Relax rewrites run before legalization.

One rewrite per module, each with its maths and limits in its docstring:

* :mod:`.commute` moves order-preserving ops (max pooling, concat of equal scales, nearest
  resize, lookups in int8 tables) and ``quantize(dequantize(q))`` of equal parameters onto the
  int8 tensors;
* :mod:`.anchors` turns ``conv2d`` / ``conv2d_transpose`` / ``matmul`` on dequantized int8
  operands into integer ops with int32 accumulation and a float requantize epilogue;
* :mod:`.qparams` holds the matching helpers both use (reusable by other integer rewrites).

:func:`integer_lowering_passes` gives them in order; the decisions (per quantized op: integer or
float, and why) go into an :class:`Int8Log` for the manifest.
"""

from __future__ import annotations

from typing import Any

from edgecc.lower.int8.anchors import Decision, Int8Log, integer_anchors_pass

__all__ = ["Decision", "Int8Log", "integer_lowering_passes"]


def integer_lowering_passes(log_to: Int8Log | None = None) -> list[Any]:
    """The Relax passes of the integer lowering, in order (run before legalization and before
    the channels-last layout pass, which would turn per-tensor Q/DQ into plain arithmetic)."""
    from edgecc.lower.int8.commute import commute_pass

    return [commute_pass(log_to), integer_anchors_pass(log_to)]
