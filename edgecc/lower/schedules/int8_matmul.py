"""int8 matmul rule: u8/s8 x s8 -> int32 dense kernels on dot-product instructions.

Matches the kernels the integer lowering emits for MatMul / Gemm: one reduction block
``C[.., i, j] += int32(A[.., i, k]) * int32(B[k, j])`` with ``A`` uint8 or int8, ``B`` an int8
*constant* (the kernel's ``layout_free_buffers``: weights), ``C`` int32, plus the fused
requantize epilogue (int32 bias, float scale, round, clip, cast to int8/uint8), which is folded
into the write-back exactly as in :mod:`edgecc.lower.schedules.matmul` (whose analysis and
tiling this rule reuses).

Schedule: the float rule's ``mr x (nr * v)`` register block with ``v`` the int32 lanes of the
chosen :mod:`~edgecc.lower.schedules.int8_intrinsics` instruction (``pmaddwd`` 8/16, ``vpdpbusd``
16/8, ``sdot`` / ``smull`` 4) and K split by the instruction's ``kp`` (2 or 4): the weights are
packed once, at compile time, into ``[N / (nr*v), K / kp, nr*v, kp]`` so each instruction loads
``v * kp`` contiguous int8 weights; the ``v x kp`` inner loop is tensorized. Loops:
``parallel(j-blocks, i-blocks) / k / kp-groups / unroll(mr) / unroll(nr) / intrinsic``.

Integer sums are exact and associative, so the result equals TVM's unscheduled kernel bit for
bit whatever the order.

Declined (the float matmul rule then takes the kernel, vectorised over N with int32 multiplies,
also exact): non-integer kernels, activations that no intrinsic of the target takes, K not a
multiple of ``kp``, N not a multiple of ``v``, non-constant B (attention's int8 batch matmuls).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from edgecc.lower.schedules import CpuRule, int8_x86, register_rule
from edgecc.lower.schedules import int8_intrinsics as intrin
from edgecc.lower.schedules import int8_neon as neon
from edgecc.lower.schedules.matmul import (
    Matmul,
    Tiling,
    _match_product,
    choose_tiling,
    pack_constant_b,
)

log = logging.getLogger(__name__)


def int8_operands(block: Any) -> tuple[str, str] | None:
    """``(a_dtype, b_dtype)`` of an int32 ``C += int32(A) * int32(B)`` block with 8-bit inputs."""
    matched = _match_product(block)
    if matched is None:
        return None
    store, a, b = matched
    if store.buffer.dtype != "int32":
        return None
    dtypes = (str(a.source.dtype), str(b.source.dtype))
    if not all(d in ("int8", "uint8") for d in dtypes):
        return None
    return dtypes


@register_rule(5)
class Int8Matmul(CpuRule):
    """Dense u8/s8 x s8 -> int32 matmul + requantize epilogue on dot-product instructions."""

    name = "int8-matmul"

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        from tvm import tirx

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self._apply(func, target)
        except Exception as err:  # noqa: BLE001 - a kernel the primitives refuse: decline it
            log.debug("int8 matmul rule declined: %s", err)
            return None

    def _apply(self, func: Any, target: Any) -> Any:
        from tvm import s_tir, tirx

        sch = s_tir.Schedule(func)
        root = sch.get_sblock(func.body.block.name_hint)
        reductions = [
            blk
            for blk in sch.get_child_blocks(root)
            if any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(blk).iter_vars)
        ]
        if len(reductions) != 1:
            return None
        main = reductions[0]
        dtypes = int8_operands(sch.get(main))
        if dtypes is None or dtypes[1] != "int8":
            return None
        chosen = neon.refine(intrin.pick(intrin.target_features(target), dtypes[0]), func)
        if chosen is None:
            return None
        analysed = Matmul._analyse(sch.get(main))
        if analysed is None:
            return None
        kinds, m, n, batch = analysed
        k_extent = int(sch.get(main).iter_vars[kinds.index("K")].dom.extent)
        weights, k_axis = int8_x86.matmul_weights(func, sch.get(main), kinds)
        chosen = int8_x86.prefer_ubsw(chosen, weights, k_axis, k_extent)
        if n % chosen.lanes or k_extent % chosen.kp or "J" not in kinds:
            return None
        if not Matmul._inline_spatial(sch, main):
            return None
        main = sch.get_sblock(sch.get(main).name_hint)
        consumers = sch.get_consumers(main)
        if len(consumers) > 1:
            return None
        params = replace(self.params, lanes=chosen.lanes)
        tiling = choose_tiling(m, n, params, batch)
        if not pack_weights(
            sch, main, kinds, tiling.nr * tiling.v, chosen.kp, neon.is_neon(chosen)
        ):
            return None
        return self._schedule(sch, main, kinds, tiling, consumers, chosen)

    @staticmethod
    def _schedule(
        sch: Any,
        main: Any,
        kinds: list[str],
        t: Tiling,
        consumers: list[Any],
        chosen: intrin.DotIntrinsic,
    ) -> Any:
        loops = sch.get_loops(main)
        i_pos = [p for p, k in enumerate(kinds) if k == "I"]
        j_pos = [p for p, k in enumerate(kinds) if k == "J"]
        outer_spatial = [loops[p] for p, k in enumerate(kinds) if k in ("S", "T")]
        outer_spatial += [loops[p] for p in i_pos[:-1]] + [loops[p] for p in j_pos[:-1]]
        io, ii = sch.split(loops[i_pos[-1]], factors=[None, t.mr]) if i_pos else (None, None)
        ko, ki = sch.split(loops[kinds.index("K")], factors=[None, chosen.kp])
        jo, jn, jv = sch.split(loops[j_pos[-1]], factors=[None, t.nr, t.v])
        tile_outer = [loop for loop in (jo, io) if loop is not None]
        inner = [ii] if ii is not None else []
        order = [*outer_spatial, *tile_outer, ko, *inner, jn, jv, ki]
        sch.reorder(*order)
        outer = sch.fuse(*order[: len(outer_spatial) + len(tile_outer)])

        local = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(local, outer, preserve_unit_loops=True)
        if consumers:
            sch.reverse_compute_inline(consumers[0])
        _, wv = sch.split(sch.get_loops(local)[-1], factors=[None, t.v])
        sch.vectorize(wv)
        sch.parallel(outer)
        if ii is not None:
            sch.unroll(ii)
        sch.unroll(jn)
        init = sch.decompose_reduction(main, ko)
        sch.vectorize(sch.get_loops(init)[-1])
        name = neon.intrinsic(chosen) if neon.is_neon(chosen) else intrin.intrinsic(chosen.name)
        sch.tensorize(jv, name)
        return sch


def pack_weights(
    sch: Any, main: Any, kinds: list[str], nb: int, kp: int, interleave: bool = False
) -> bool:
    """Re-lay the constant B (``[K, N]`` or ``[N, K]``) as ``[N / nb, K / kp, nb, kp]`` at
    compile time (a ``layout_rewrite_preproc`` copy, folded into the constant after
    scheduling); False when B is not a constant kernel parameter or not indexed by ``K, J``.
    ``interleave``: the NEON pair-interleaved groups instead (:func:`.int8_neon.packed_group`)."""
    if interleave:
        return pack_constant_b(
            sch, main, kinds, lambda k, j: [j // nb, *neon.packed_group(j, k, nb)]
        )
    return pack_constant_b(sch, main, kinds, lambda k, j: [j // nb, k // kp, j % nb, k % kp])
