"""Reductions that are not matmul or conv: softmax, layer/RMS norm, means, sums, max, argmax.

Two rules, tried in this order:

``row-reduction`` (TVM's ``dlight.cpu.Reduction``, reused as is): kernels made of reduction and
injective blocks that share their leading spatial axes, such as softmax
(``max -> exp -> sum -> divide``) or layer norm (``mean -> var -> normalise``). The shared axes
(rows) are fused and run ``parallel``; every block is computed per row; injective blocks are
vectorised on their inner axis and reduction loops split by the vector length and unrolled.

``reduction`` (edgecc's fallback for the rest): any kernel with a reduction block that no earlier
rule took (a reduction whose last block is not injective, a reduction over leading axes, a lone
``ReduceSum``). Injective producers and consumers are inlined where TVM allows; each remaining
block gets its leading spatial loops fused and ``parallel`` when its loop nest has at least
:data:`~edgecc.lower.schedules.elementwise.PARALLEL_MIN_ELEMENTS` iterations (contractions:
``PARALLEL_MIN_WORK`` multiply-adds), and an injective block
is vectorised as in the elementwise rule. The reduction loops stay serial (LLVM auto-vectorises
what it can). This is also the fallback for contractions (matmul, conv) that the contraction
rules decline: parallel rows, no register blocking.

``row-reduction`` declines contractions (:func:`is_contraction`) and kernels below
``PARALLEL_MIN_ELEMENTS`` (one thread: the ``reduction`` rule then vectorises what it can);
``reduction`` declines kernels without reduction blocks (the elementwise rule's), symbolic
extents, and kernels too small to parallelise with nothing to vectorise (TVM's default).
"""

from __future__ import annotations

from typing import Any

from edgecc.lower.schedules import CpuRule, register_rule
from edgecc.lower.schedules.elementwise import (
    PARALLEL_MIN_ELEMENTS,
    PARALLEL_MIN_WORK,
    schedule_injective,
)


def is_contraction(sch: Any, block_rv: Any) -> bool:
    """True when a reduction block multiplies two tensors indexed by its reduction iterators
    (matmul, conv, batch matmul): those belong to the contraction rules, and TVM's row rule
    (which unrolls the reduction and vectorises nothing of it) is slower on them than LLVM's
    auto-vectorised serial loop."""
    from tvm import tirx

    block = sch.get(block_rv)
    reduce_vars = {iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
    if not reduce_vars:
        return False
    touching = 0
    for region in block.reads:
        used = {v for rng in region.region for v in tirx.analysis.undefined_vars(rng.min)}
        if used & reduce_vars and len(region.region) > 1:
            touching += 1
    return touching >= 2


def has_contraction(sch: Any, infos: list[Any]) -> bool:
    """Whether any reduction block of the kernel is a contraction (see :func:`is_contraction`)."""
    return any(not info.is_injective() and is_contraction(sch, info.block_rv) for info in infos)


def loop_volume(sch: Any, infos: list[Any]) -> int:
    """The largest loop-nest volume (product of extents) over the kernel's blocks; 0 if any is
    symbolic."""
    from tvm import tirx

    volume = 0
    for info in infos:
        size = 1
        for loop in sch.get_loops(info.block_rv):
            extent = sch.get(loop).extent
            if not isinstance(extent, tirx.IntImm):
                return 0
            size *= int(extent)
        volume = max(volume, size)
    return volume


@register_rule(priority=50)
class ScheduleRowReduction(CpuRule):
    """Softmax / layer-norm style kernels, by TVM's dlight CPU reduction rule."""

    name = "row-reduction"

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        from tvm import s_tir
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.cpu import Reduction

        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if (
            not infos
            or has_contraction(sch, infos)
            or loop_volume(sch, infos) < PARALLEL_MIN_ELEMENTS
        ):
            return None
        return Reduction().apply(func, target, False)


@register_rule(priority=80)
class ScheduleReduction(CpuRule):
    """Any other reduction kernel: parallel spatial loops, serial reduction loops."""

    name = "reduction"

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        from tvm import s_tir, tirx
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.base import try_inline_contiguous_spatial

        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or all(info.is_injective() for info in infos):
            return None
        remaining = try_inline_contiguous_spatial(sch, list(infos))
        done = False
        for info in remaining:
            block = info.block_rv
            if info.is_injective():
                done |= schedule_injective(sch, block, self.params)
                continue
            loops = sch.get_loops(block)
            kinds = info.dom_kind()
            lead = len(kinds) - len(kinds.lstrip("S"))
            extents = [sch.get(loop).extent for loop in loops]
            if not lead or not all(isinstance(e, tirx.IntImm) for e in extents):
                continue
            spatial = 1
            for e in extents[:lead]:
                spatial *= int(e)
            work = 1
            for e in extents:
                work *= int(e)
            minimum = PARALLEL_MIN_WORK if is_contraction(sch, block) else PARALLEL_MIN_ELEMENTS
            if spatial > 1 and work >= minimum:
                fused = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
                sch.parallel(fused)
                done = True
        return sch if done else None
