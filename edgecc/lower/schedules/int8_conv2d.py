"""int8 conv2d rule: u8/s8 x s8 -> int32 NHWC convolutions (and int8 depthwise) + requantize.

Matches a fused kernel whose single ``conv2d_nhwc`` / ``group_conv2d_nhwc`` block accumulates
``int32(pad[n, y*s+ry*d, x*s+rx*d, c]) * int32(w[ry, rx, c, f])`` with 8-bit activations
(uint8 or int8) and int8 HWIO weights into int32 (what the integer lowering emits after the
channels-last layout pass), with the padding block before it and the fused requantize epilogue
(int32 bias, float scale, round, clip, cast) after it.

Two schedules:

* dot-product (``C / groups`` a multiple of the intrinsic's ``kp`` and ``F`` of its lanes ``v``,
  not depthwise): the micro-kernel of :mod:`edgecc.lower.schedules.conv2d` (``mr`` pixels x
  ``nf = nv * v`` channels in registers, loops ``n, f_outer, y, x_outer | ry, rx, c_outer |
  x_inner, f_inner``) with the input channels split by ``kp`` and the ``v x kp`` innermost loops
  tensorized with the target's instruction (:mod:`~edgecc.lower.schedules.int8_intrinsics`:
  ``pmaddwd``, ``vpdpbusd``, ``sdot``, ``smull``); constant weights packed at compile time to
  ``[F / nf, KH, KW, C / kp, nf, kp]`` so each instruction loads ``v * kp`` contiguous weights;
* otherwise (first convs with ``C = 3``, depthwise, odd channel counts, targets without an
  intrinsic for the activation dtype): the float conv/depthwise schedule on int32 accumulators,
  vectorised over output channels (LLVM widens int8 to int32 and multiplies): exact, no
  dot-product benefit (depthwise has none to gain: one product per output and tap).

Integer sums are exact, so both equal TVM's unscheduled kernel bit for bit. Declines: float
convs (the float rules take them), NCHW, dynamic shapes.
"""

from __future__ import annotations

import logging
from typing import Any

from edgecc.lower.schedules import CpuRule, int8_x86, register_rule
from edgecc.lower.schedules import int8_intrinsics as intrin
from edgecc.lower.schedules import int8_neon as neon
from edgecc.lower.schedules.conv2d import (
    ConvShape,
    accumulator_budget,
    find_conv_block,
    fuse_epilogue,
    schedule_conv,
    schedule_elementwise,
    vectorize_innermost,
)
from edgecc.lower.schedules.int8_matmul import int8_operands

log = logging.getLogger(__name__)


def int8_conv_shape(sch: Any, block: Any) -> ConvShape | None:
    """Static extents of an int32 NHWC conv block with iterators ``SSSSRRR``, else None."""
    from tvm import tirx

    stmt = sch.get(block)
    kinds = "".join("S" if iv.iter_type == 0 else "R" for iv in stmt.iter_vars)
    if kinds != "SSSSRRR" or len(stmt.writes) != 1 or stmt.writes[0].source.dtype != "int32":
        return None
    extents = [iv.dom.extent for iv in stmt.iter_vars]
    if not all(isinstance(e, tirx.IntImm) for e in extents):
        return None
    return ConvShape(*(int(e) for e in extents))


@register_rule(6)
class Int8Conv2d(CpuRule):
    """NHWC int8 conv2d / depthwise conv2d + requantize epilogue."""

    name = "int8-conv2d"

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        from tvm import s_tir

        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        conv = find_conv_block(sch)
        if conv is None:
            return None
        shape = int8_conv_shape(sch, conv)
        dtypes = int8_operands(sch.get(conv)) if shape is not None else None
        if shape is None or dtypes is None or dtypes[1] != "int8":
            return None
        depthwise = sch.get(conv).name_hint == "group_conv2d_nhwc" and shape.cg == 1
        chosen = neon.refine(intrin.pick(intrin.target_features(target), dtypes[0]), func)
        weights = int8_x86.conv_weights(func, sch.get(conv))
        chosen = int8_x86.prefer_ubsw(chosen, weights, 2, shape.cg)
        if (
            chosen is not None
            and not depthwise
            and shape.cg % chosen.kp == 0
            and shape.f % chosen.lanes == 0
        ):
            try:
                return self._dot(func, shape, chosen)
            except Exception as err:  # noqa: BLE001 - primitives refused: the generic schedule
                log.debug("int8 conv dot-product schedule declined: %s", err)
        sch = s_tir.Schedule(func)
        schedule_conv(sch, find_conv_block(sch), shape, self.params, depthwise=depthwise)
        return sch

    def _dot(self, func: Any, shape: ConvShape, chosen: intrin.DotIntrinsic) -> Any:
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        conv = find_conv_block(sch)
        v, kp = chosen.lanes, chosen.kp
        budget = accumulator_budget(self.params)
        mr, nf = dot_tile(shape.ow, shape.f, v, budget, min(3, budget // 4))
        producers = [b for b in sch.get_producers(conv) if sch.get(b).name_hint != "root"]
        if not pack_weights(sch, conv, nf, kp, neon.is_neon(chosen)):
            return None
        epilogue = fuse_epilogue(sch, conv)
        n, y, x, f, ry, rx, rc = sch.get_loops(conv)
        x_o, x_i = sch.split(x, factors=[None, mr])
        f_o, f_n, f_v = sch.split(f, factors=[None, nf // v, v])
        c_o, c_i = sch.split(rc, factors=[None, kp])
        sch.reorder(n, f_o, y, x_o, ry, rx, c_o, x_i, f_n, f_v, c_i)
        outer = sch.fuse(n, f_o, y)
        sch.parallel(outer)
        sch.unroll(x_i)
        sch.unroll(f_n)
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, x_o, preserve_unit_loops=True)
            vectorize_innermost(sch, epilogue, v, skip=2)
        sch.set_scope(conv, 0, "local")
        init = sch.decompose_reduction(conv, ry)
        vectorize_innermost(sch, init, v, skip=2)
        name = neon.intrinsic(chosen) if neon.is_neon(chosen) else intrin.intrinsic(chosen.name)
        sch.tensorize(f_v, name)
        for block in producers:
            schedule_elementwise(sch, block, v)
        return sch


def dot_tile(ow: int, f: int, lanes: int, budget: int, max_vectors: int) -> tuple[int, int]:
    """``(mr, nf)`` for the dot-product micro-kernel: ``mr`` dividing ``ow`` (a partial pixel
    tile puts a predicate on the block, which tensorize refuses), ``nf = nv * lanes`` dividing
    ``f``, ``mr * nv <= budget``, the most products per load ``mr * nv / (mr + nv)``; ties to
    the larger tile."""
    best: tuple[float, int, int, int] | None = None
    for nv in range(1, max_vectors + 1):
        if f % (nv * lanes):
            continue
        for mr in range(1, min(ow, budget // nv) + 1):
            if ow % mr == 0:
                key = (round(mr * nv / (mr + nv), 6), mr * nv, nv, mr)
                best = key if best is None or key > best else best
    assert best is not None  # f % lanes == 0 was checked: nv = mr = 1 fits
    return best[3], best[2] * lanes


def pack_weights(sch: Any, conv: Any, nf: int, kp: int, interleave: bool = False) -> bool:
    """Re-lay constant HWIO int8 weights as ``[F / nf, KH, KW, C / kp, nf, kp]`` at compile time
    (a ``layout_rewrite_preproc`` copy folded into the constant); False when not constant.
    ``interleave``: the NEON pair-interleaved groups instead (:func:`.int8_neon.packed_group`)."""
    from tvm import tirx

    func = sch.mod["main"]
    free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
    if not free:
        return False
    buffers = [func.params[int(i)] for i in free]
    block = sch.get(conv)
    read = next(
        (
            i
            for i, region in enumerate(block.reads)
            if len(region.region) == 4 and any(region.source.same_as(b) for b in buffers)
        ),
        None,
    )
    if read is None:
        return False

    def packed(ry: Any, rx: Any, c: Any, f: Any) -> list[Any]:
        if interleave:
            return [f // nf, ry, rx, *neon.packed_group(f, c, nf)]
        return [f // nf, ry, rx, c // kp, f % nf, c % kp]

    copy = sch.cache_read(conv, read, "global")
    sch.transform_layout(conv, ("read", read), tirx.IndexMap.from_func(packed, ndim=4))
    sch.annotate(copy, "meta_schedule.layout_rewrite_preproc", True)
    return True
