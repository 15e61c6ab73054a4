"""int8 batch-matmul rule: activation x activation ``u8/s8 x u8/s8 -> int32`` kernels (attention).

Matches the kernels the integer lowering emits for a MatMul whose two operands are both
quantized activations (:mod:`edgecc.lower.int8.anchors`: attention's ``Q K^T`` and ``P V``,
batched ``[B, H, S, D]``): one reduction block ``C[.., i, j] += int32(A[.., i, k]) *
int32(B[.., k, j])`` with ``A`` and ``B`` uint8 or int8, *neither a constant* (so no
compile-time weight packing: that case is :mod:`.int8_matmul`'s), ``C`` int32, plus the fused
epilogue (zero-point compensation by the row / column sums, the float scale, the attention mask
add...), folded into the write-back.

Schedule: the float matmul rule's register-blocked loop nest (:mod:`.matmul`: ``parallel(batch,
j-blocks, i-blocks) / k / unroll(mr) / unroll(nr) / vectorize(v)``) in int32, ``v`` the int32
lanes of the target (16 on AVX-512, 8 on AVX2, 4 on NEON; the same count as fp32 lanes), the
8-bit operands widened as they are loaded, accumulators in registers over ``k``, the epilogue
vectorised. Integer sums are exact and associative, so the result equals TVM's unscheduled
kernel bit for bit.

Why not the dot-product intrinsics of :mod:`.int8_intrinsics`: they need B re-laid out as
``[N / nb, K / kp, nb, kp]`` panels, which for a run-time operand is a copy per call, and VNNI
takes u8 x s8 only, while attention's uint8 x uint8 (x86's asymmetric activations) would need a
shifted copy of one operand as well. At attention's sizes (MiniLM: ``K = 32``, ``M = N = S``)
that copy costs about what the instruction saves, so this rule keeps the plain vectorised int32
multiply-add.

Declined (``None``; a later rule or TVM's default then takes the kernel): kernels without exactly
one such int32 reduction of two 8-bit loads, a constant B (weights), and everything the float
matmul rule declines (several reduction axes, an output whose inner axis is not a column of B,
dynamic shapes).
"""

from __future__ import annotations

import logging
from typing import Any

from edgecc.lower.schedules import register_rule
from edgecc.lower.schedules.int8_matmul import int8_operands
from edgecc.lower.schedules.matmul import Matmul, _match_product

log = logging.getLogger(__name__)


def _constant_b(func: Any, block: Any) -> bool:
    """True when the B operand of ``block`` is a constant kernel parameter (a weight)."""
    free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
    if not free:
        return False
    b = _match_product(block)[2]
    return any(b.source.same_as(func.params[int(i)]) for i in free)


@register_rule(7)
class Int8BatchMatmul(Matmul):
    """Vectorised, parallel int32 batch matmul of two 8-bit activations (+ fused epilogue)."""

    name = "int8-batch-matmul"
    pack_weights = False  # B is a run-time tensor: nothing to pack at compile time

    def _apply(self, func: Any) -> Any:
        from tvm import s_tir, tirx

        sch = s_tir.Schedule(func)
        root = sch.get_sblock(func.body.block.name_hint)
        reductions = [
            sch.get(blk)
            for blk in sch.get_child_blocks(root)
            if any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(blk).iter_vars)
        ]
        if len(reductions) != 1 or int8_operands(reductions[0]) is None:
            return None
        if _constant_b(func, reductions[0]):
            return None
        return super()._apply(func)
