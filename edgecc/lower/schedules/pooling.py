"""Pooling rule: max/avg pooling and global average pooling, parallel and vectorised over channels.

Matches a kernel with exactly one reduction block that is TOPI's pooling (``pool_max``,
``pool_sum``, ``adaptive_pool_*``) or a mean/sum over the two spatial axes of a 4-D NHWC tensor
(``GlobalAveragePool`` imports as ``mean(axis=[2, 3])``, which the channels-last layout turns into
``axis=[1, 2]``), with any padding block before it (inlined: the bounds test is uniform across a
vector of channels) and any elementwise chain after it (the average's division, a fused ReLU...).
Kernel window, stride, dilation, padding, ``ceil_mode`` and ``count_include_pad`` are all TOPI's:
the rule only reorders loops, so every variant is computed as legalized.

Schedule: the innermost spatial axis (channels in NHWC) is tiled by ``nf`` = up to 4 vectors of
:attr:`CpuParams.lanes` (or a divisor of the channel count when it is not a multiple of
``lanes``) and moved inside the reduction (window) loops, which are unrolled when the window has
at most 49 taps; all other spatial loops and the channel-tile loop are fused and parallel; the
accumulator init and the epilogue are computed at the tile and vectorised.

Declines: several reduction blocks, reductions over the innermost axis (NCHW global pooling,
softmax, layer norm: the reduction rules take them), a last spatial axis of extent 1, dynamic
shapes.
"""

from __future__ import annotations

from typing import Any

from edgecc.lower.schedules import CpuRule, register_rule
from edgecc.lower.schedules.conv2d import (
    _blocks,
    _extent,
    channel_tile,
    fuse_epilogue,
    vector_loops,
    vectorize_innermost,
)

POOL_PREFIXES = ("pool_", "adaptive_pool")


def _is_reduction(stmt: Any) -> bool:
    return any(iv.iter_type != 0 for iv in stmt.iter_vars)


def _spatial_pool(stmt: Any) -> bool:
    """Iterators ``S...S R...R``; the last spatial one indexes the last axis of every read."""
    kinds = "".join("S" if iv.iter_type == 0 else "R" for iv in stmt.iter_vars)
    n_s = len(kinds) - len(kinds.lstrip("S"))
    if n_s == 0 or "S" in kinds[n_s:] or len(stmt.reads) == 0:
        return False
    last = stmt.iter_vars[n_s - 1].var
    for region in stmt.reads:
        if region.source.same_as(stmt.writes[0].source):
            continue
        index = region.region[-1].min
        if not _uses(index, last):
            return False
    if stmt.name_hint.startswith(POOL_PREFIXES):
        return True
    # mean/sum over H, W of an NHWC tensor: reduction vars index axes 1 and 2 of the input.
    reads = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
    if len(reads) != 1 or len(reads[0].region) != 4:
        return False
    reduce_vars = [iv.var for iv in stmt.iter_vars[n_s:]]
    dims = reads[0].region
    return len(reduce_vars) == 2 and all(
        _uses(dims[axis].min, var) for axis, var in zip((1, 2), reduce_vars, strict=True)
    )


def _uses(expr: Any, var: Any) -> bool:
    from tvm.tirx.analysis import undefined_vars

    return any(v.same_as(var) for v in undefined_vars(expr))


@register_rule(15)
class PoolingRule(CpuRule):
    """Max/avg/global-average pooling over NHWC (channels innermost)."""

    name = "pooling"

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        blocks = _blocks(sch)
        reductions = [b for b in blocks if _is_reduction(sch.get(b))]
        if len(reductions) != 1 or not _spatial_pool(sch.get(reductions[0])):
            return None
        pool = reductions[0]
        stmt = sch.get(pool)
        n_s = sum(1 for iv in stmt.iter_vars if iv.iter_type == 0)
        loops = sch.get_loops(pool)
        if len(loops) != len(stmt.iter_vars):
            return None
        extents = [_extent(sch, loop) for loop in loops]
        if any(e is None for e in extents) or extents[n_s - 1] < 2:
            return None
        for block in sch.get_producers(pool):
            sch.compute_inline(block)
        epilogue = fuse_epilogue(sch, pool)

        lanes = self.params.lanes
        nf = channel_tile(extents[n_s - 1], lanes, max_vectors=4)
        loops = sch.get_loops(pool)
        spatial, window = loops[: n_s - 1], loops[n_s:]
        c_o, c_i = sch.split(loops[n_s - 1], factors=[None, nf])
        sch.reorder(*spatial, c_o, *window, c_i)
        outer = sch.fuse(*spatial, c_o)
        sch.parallel(outer)
        taps = 1
        for extent in extents[n_s:]:
            taps *= extent
        if taps <= 49:
            for loop in window:
                sch.unroll(loop)
        vector_loops(sch, c_i, lanes)
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, outer, preserve_unit_loops=True)
            vectorize_innermost(sch, epilogue, lanes, skip=1)
        if window:
            init = sch.decompose_reduction(pool, window[0])
            vectorize_innermost(sch, init, lanes, skip=1)
        return sch
