"""Elementwise / injective kernels: inline, parallelise the outer loops, vectorise the inner one.

Matches every fused kernel whose blocks are all injective (spatial iterators only): activations,
adds, casts, layout transforms, pads, reshapes that FuseOps could not fold, and elementwise chains
that no anchor (matmul, conv, reduction) absorbed.

Schedule: producers are inlined into the last block (``compute_inline``, else
``reverse_compute_inline``; blocks that cannot be inlined are scheduled one by one), then for each
remaining block:

* the innermost loop is split by the target's fp32 lanes (``CpuParams.lanes``; wider dtypes get
  fewer lanes, narrower more, at the same register width) and the inner part vectorised; an
  innermost extent shorter than a vector is first fused with its outer neighbours so the vector
  still covers ``lanes`` contiguous output elements;
* the loops outside it are fused into one and marked ``parallel`` when the kernel has at least
  :data:`PARALLEL_MIN_ELEMENTS` elements (below that the thread-pool wake-up costs more than it
  saves; the vector loop is kept either way).

Declines: kernels with a reduction block, symbolic (dynamic) extents it cannot split, and
kernels without loops. Tails (extents that are not a multiple of the vector) are handled by
TVM's predicated split: correct for any size, vectorised except the tail.
"""

from __future__ import annotations

from typing import Any

from edgecc.lower.schedules import CpuParams, CpuRule, register_rule

# Below this many output elements a kernel stays on one thread: waking TVM's thread pool costs
# ~10-30 us here, more than a small elementwise kernel takes (tiny transformer, 16 tokens: all
# kernels parallel made it 3.7x slower).
PARALLEL_MIN_ELEMENTS = 1 << 15
# A contraction (matmul, conv) left to the fallback is parallelised from this many multiply-adds.
PARALLEL_MIN_WORK = 1 << 18


def vector_lanes(params: CpuParams, dtype_bits: int) -> int:
    """Lanes of one SIMD register for elements of ``dtype_bits`` bits (at least 1)."""
    return max(1, params.lanes * 32 // max(8, dtype_bits))


def schedule_injective(sch: Any, block: Any, params: CpuParams) -> bool:
    """Parallelise and vectorise one injective block in place; False if its loops are symbolic."""
    from tvm import tirx

    loops = sch.get_loops(block)
    if not loops:
        return False
    extents = [sch.get(loop).extent for loop in loops]
    if not all(isinstance(e, tirx.IntImm) for e in extents):
        return False
    extents = [int(e) for e in extents]
    write = sch.get(block).writes
    bits = write[0].source.dtype.bits if write else 32
    lanes = vector_lanes(params, bits)
    total = 1
    for e in extents:
        total *= e
    # Fuse trailing loops until the innermost run covers a whole vector.
    inner_start = len(loops) - 1
    run = extents[-1]
    while run < lanes and inner_start > 0:
        inner_start -= 1
        run *= extents[inner_start]
    inner = sch.fuse(*loops[inner_start:]) if inner_start < len(loops) - 1 else loops[-1]
    outer = loops[:inner_start]
    if run >= lanes and lanes > 1:
        inner_outer, vec = sch.split(inner, factors=[None, lanes])
        sch.vectorize(vec)
        outer = [*outer, inner_outer]
    if outer and total >= PARALLEL_MIN_ELEMENTS:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)
    return True


@register_rule(priority=90)
class ScheduleElementwise(CpuRule):
    """The injective fallback: every all-spatial kernel gets parallel and vector loops."""

    name = "elementwise"

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        from tvm import s_tir
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.base import try_inline

        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(info.is_injective() for info in infos):
            return None
        remaining = try_inline(sch, list(infos))
        scheduled = [schedule_injective(sch, info.block_rv, self.params) for info in remaining]
        return sch if any(scheduled) else None
