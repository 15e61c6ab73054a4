"""Dense / matmul / batch-matmul kernels: a register-blocked, vectorised, parallel CPU schedule.

Matched kernels: a fused PrimFunc with exactly one reduction block of the form
``C[s.., i.., j..] += A[.., k] * B[.., k ..]`` (LegalizeOps' ``matmul`` for ONNX MatMul, Gemm
and attention's QK^T / PV batch matmuls, either operand transposed, batch axes broadcast or not),
plus any number of spatial blocks: producers (casts, transposes, masks) are inlined into their
consumers, and the epilogue FuseOps put after the reduction (bias, ReLU, GELU/erf, clip, residual
add, masks...) is folded into the write-back of the accumulators.

Tiling from :class:`~edgecc.lower.schedules.CpuParams`:

* vector width ``v`` = ``lanes`` along the output's contiguous axis ``j`` when ``lanes`` divides
  its extent (else the largest divisor of the extent up to ``lanes``);
* register block ``mr x (nr * v)``: ``mr`` divides the ``i`` extent and ``nr * v`` the ``j``
  extent (no tails, so no predicates in the micro-kernel), ``mr * nr + nr + 1`` vector registers
  at most (16 on AVX2, 32 on AVX-512 and NEON), chosen to maximise FMAs per load
  ``mr * nr / (mr + nr)``;
* loops ``parallel(fused s, j-blocks, i-blocks) / k / unroll(mr) / unroll(nr) / vectorize(v)``:
  the ``i`` blocks innermost so a thread reuses one B panel (``K x nr*v``) across all rows; the
  accumulators live in a ``local`` buffer LLVM keeps in registers over ``k``; init and
  write-back (with the epilogue) vectorised;
* constant B (weights: the kernel's ``layout_free_buffers``) packed once, at compile time, into
  ``[N / (nr*v), K, nr*v]`` panels, so the micro-kernel streams contiguous memory: a
  ``meta_schedule.layout_rewrite_preproc`` copy block that ``SplitLayoutRewritePreproc`` moves
  out of the kernel and ``FoldConstant`` evaluates on the weight (``Matmul.pack_weights``);
* tuning variants (:mod:`edgecc.lower.schedules.variants`) bound ``mr * nr`` by
  ``CpuParams.accumulators``, ``nr`` by ``CpuParams.max_vectors`` and aim for
  ``CpuParams.parallel_tasks`` tasks instead of ``cores``;
* ``N = 1`` (matrix x vector, output's inner axis a row axis): ``mr`` row sums per parallel block,
  not vectorised (the reduction order is kept, so results match the reference bit for bit).

No K blocking: the whole K loop runs inside the register block (the B panel of MiniLM's widest
layer, 1536 x 24 floats, sits in L2). The reduction order over K is the reference's, so results
equal TVM's unscheduled kernel exactly.

Declined (``None``): kernels with zero or several reduction blocks, reductions that are not a
product of two buffer loads, more than one reduction axis, an output whose innermost axis is not
a column axis of B, kernels whose spatial blocks cannot be inlined, dynamic shapes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgecc.lower.schedules import CpuParams, CpuRule, register_rule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tiling:
    """A register block: ``mr`` rows x ``nr`` vectors of ``v`` lanes."""

    mr: int
    nr: int
    v: int


def vector_registers(params: CpuParams) -> int:
    """SIMD registers of the target: 32 on AVX-512 and AArch64, 16 on AVX2."""
    return 32 if params.lanes >= 16 or params.arch == "aarch64" else 16


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_tiling(m: int, n: int, params: CpuParams, batch: int = 1) -> Tiling:
    """The register block for ``batch`` outputs of ``m x n`` (see the module docstring): blocks
    that leave at least ``cores`` parallel tasks first, then the most FMAs per load."""
    lanes = params.lanes
    v = lanes if n % lanes == 0 else max(d for d in _divisors(n) if d <= lanes)
    regs = vector_registers(params)
    most_nr = params.max_vectors or 16
    accumulators = params.accumulators or regs
    tasks_wanted = params.parallel_tasks or params.cores
    best: tuple[float, int, int] | None = None
    for mr in _divisors(m):
        if mr > 16:
            break
        for nr in _divisors(n // v):
            if nr > most_nr or mr * nr + nr + 1 > regs or mr * nr > accumulators:
                continue
            score = mr * nr / (mr + nr)
            tasks = batch * (m // mr) * (n // (nr * v))
            key = (min(tasks, tasks_wanted), score, nr, mr)
            if best is None or key > best:
                best = key
    assert best is not None  # mr = nr = 1 always fits
    return Tiling(mr=best[3], nr=best[2], v=v)


def _int(expr: Any) -> int | None:
    from tvm import tirx

    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def _vars_of(indices: Any) -> list[set]:
    from tvm.tirx.analysis import undefined_vars

    return [set(undefined_vars(idx)) for idx in indices]


def _match_product(block: Any) -> tuple[Any, Any, Any] | None:
    """``(C, A, B)`` loads of a ``C = C + A * B`` block body (casts allowed), else None."""
    from tvm import ir, tirx

    body = block.body
    if not isinstance(body, tirx.BufferStore) or block.init is None:
        return None
    value = body.value
    if not isinstance(value, tirx.Add):
        return None

    def strip(e: Any) -> Any:
        return e.value if isinstance(e, tirx.Cast) else e

    def is_c(e: Any) -> bool:
        return isinstance(e, ir.TensorLoad) and e.source.same_as(body.buffer)

    lhs, rhs = value.a, value.b
    if not is_c(lhs):
        lhs, rhs = rhs, lhs
    if not is_c(lhs):
        return None
    rhs = strip(rhs)
    if not isinstance(rhs, tirx.Mul):
        return None
    a, b = strip(rhs.a), strip(rhs.b)
    if not (isinstance(a, ir.TensorLoad) and isinstance(b, ir.TensorLoad)):
        return None
    return body, a, b


@register_rule(20)
class Matmul(CpuRule):
    """Register-blocked dense / batch matmul with fused prologue and epilogue."""

    name = "matmul"
    knobs = ("accumulators", "max_vectors", "parallel_tasks", "lanes")

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        from tvm import tirx

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self._apply(func)
        except Exception as err:  # noqa: BLE001 - a kernel the primitives refuse: decline it
            log.debug("matmul rule declined: %s", err)
            return None

    def _apply(self, func: Any) -> Any:
        from tvm import s_tir, tirx

        sch = s_tir.Schedule(func)
        root = sch.get_sblock(func.body.block.name_hint)
        blocks = sch.get_child_blocks(root)
        reductions = []
        for blk in blocks:
            kinds = {iv.iter_type for iv in sch.get(blk).iter_vars}
            if tirx.IterVar.CommReduce in kinds:
                reductions.append(blk)
            elif kinds - {tirx.IterVar.DataPar}:
                return None
        if len(reductions) != 1:
            return None
        main = reductions[0]
        analysed = self._analyse(sch.get(main))
        if analysed is None:
            return None
        kinds_of_iter, m, n, batch = analysed

        # Inline every other block: producers into the matmul, epilogue blocks into the last one.
        if not self._inline_spatial(sch, main):
            return None
        main = sch.get_sblock(sch.get(main).name_hint)
        consumers = sch.get_consumers(main)
        if len(consumers) > 1:
            return None

        tiling = choose_tiling(m, n, self.params, batch)
        if n > 1 and self.pack_weights:
            self._pack_constant_b(sch, main, func, kinds_of_iter, tiling)
        return self._schedule(sch, main, kinds_of_iter, tiling, consumers)

    # On: at load ~2.5, 128x1536x384 ran 1.94 ms packed vs 3.18 ms unpacked, 128x384x1536 2.77
    # vs 3.21, 128x384x384 0.29-0.61 vs 0.49-0.59 (an earlier "2-4x slower" was machine load).
    pack_weights = True

    @staticmethod
    def _pack_constant_b(sch: Any, main: Any, func: Any, kinds: list[str], t: Tiling) -> bool:
        """Re-lay a constant B (a ``layout_free_buffers`` parameter) as ``[N / nb, K, nb]``,
        ``nb = nr * v``: each register block then streams one contiguous panel. The copy is a
        ``layout_rewrite_preproc`` block, split out of the kernel and folded into the constant
        after scheduling (:func:`edgecc.lower.schedules.post_schedule_passes`)."""
        nb = t.nr * t.v
        return pack_constant_b(sch, main, kinds, lambda k, j: [j // nb, k, j % nb])

    # --- analysis -----------------------------------------------------------------------------

    @staticmethod
    def _analyse(block: Any) -> tuple[list[str], int, int, int] | None:
        """Kind of each block iter (``S`` batch, ``I`` row, ``J`` column, ``K``, ``T`` unit)
        the row / column extents of the register-blocked axes and the product of the other
        spatial extents, or None."""
        from tvm import tirx

        matched = _match_product(block)
        if matched is None:
            return None
        store, a, b = matched
        c_vars, a_vars, b_vars = _vars_of(store.indices), _vars_of(a.indices), _vars_of(b.indices)
        for group in (c_vars, a_vars, b_vars):
            if any(len(s) > 1 for s in group):
                return None  # only plain (or constant) indices before inlining
        c_all = set().union(*c_vars) if c_vars else set()
        a_all = set().union(*a_vars) if a_vars else set()
        b_all = set().union(*b_vars) if b_vars else set()
        kinds: list[str] = []
        extents: list[int] = []
        for iv in block.iter_vars:
            ext = _int(iv.dom.extent)
            if ext is None or _int(iv.dom.min) != 0:
                return None
            var = iv.var
            if iv.iter_type == tirx.IterVar.CommReduce:
                if var in c_all or (ext > 1 and not (var in a_all and var in b_all)):
                    return None
                kind = "K"
            elif ext == 1:
                kind = "T"
            elif var in c_all and var in a_all and var in b_all:
                kind = "S"
            elif var in c_all and var in a_all:
                kind = "I"
            elif var in c_all and var in b_all:
                kind = "J"
            else:
                return None
            kinds.append(kind)
            extents.append(ext)
        if kinds.count("K") != 1:
            return None
        # The output's innermost non-unit axis must be a J axis (contiguous vector stores).
        var_kind = {iv.var: k for iv, k in zip(block.iter_vars, kinds, strict=True)}
        inner = [v for s in c_vars for v in s if var_kind.get(v, "T") != "T"]
        if not inner:
            return None
        i_pos = [p for p, k in enumerate(kinds) if k == "I"]
        j_pos = [p for p, k in enumerate(kinds) if k == "J"]
        m = extents[i_pos[-1]] if i_pos else 1
        outer = [p for p, k in enumerate(kinds) if k == "S"] + i_pos[:-1] + j_pos[:-1]
        batch = math.prod(extents[p] for p in outer)
        if not j_pos:  # N = 1: a matrix-vector product, the output's inner axis is a row axis
            last = next(p for p, iv in enumerate(block.iter_vars) if iv.var.same_as(inner[-1]))
            return (kinds, m, 1, batch) if i_pos and last == i_pos[-1] else None
        if var_kind.get(inner[-1]) != "J":
            return None
        # Register-blocked axes: the last I iter and the last J iter (others become outer loops).
        j_last = next(p for p, iv in enumerate(block.iter_vars) if iv.var.same_as(inner[-1]))
        if j_pos[-1] != j_last:
            return None
        return kinds, m, extents[j_last], batch

    @staticmethod
    def _inline_spatial(sch: Any, main: Any) -> bool:
        """Inline every spatial block except the one writing the output (True when done)."""
        main_name = sch.get(main).name_hint
        while True:
            progressed = False
            blocks = sch.get_child_blocks(sch.get_sblock(sch.mod["main"].body.block.name_hint))
            for blk in blocks:
                if sch.get(blk).name_hint == main_name:
                    continue
                try:
                    sch.compute_inline(blk)
                    progressed = True
                    break
                except Exception:  # noqa: BLE001 - not inlinable: try the next one
                    continue
            if not progressed:
                break
        blocks = sch.get_child_blocks(sch.get_sblock(sch.mod["main"].body.block.name_hint))
        return len(blocks) <= 2

    # --- schedule -----------------------------------------------------------------------------

    def _schedule(
        self, sch: Any, main: Any, kinds: list[str], t: Tiling, consumers: list[Any]
    ) -> Any:
        loops = sch.get_loops(main)
        if len(loops) != len(kinds):
            return None
        i_pos = [p for p, k in enumerate(kinds) if k == "I"]
        j_pos = [p for p, k in enumerate(kinds) if k == "J"]
        k_pos = kinds.index("K")
        outer_spatial = [loops[p] for p, k in enumerate(kinds) if k in ("S", "T")]
        outer_spatial += [loops[p] for p in i_pos[:-1]] + [loops[p] for p in j_pos[:-1]]
        if i_pos:
            io, ii = sch.split(loops[i_pos[-1]], factors=[None, t.mr])
        else:
            io = ii = None
        k = loops[k_pos]
        if j_pos:
            jo, jn, jv = sch.split(loops[j_pos[-1]], factors=[None, t.nr, t.v])
            tile_outer, tile_inner = [jo, io], [jn, jv]
        else:  # N = 1: mr independent row sums per block, not vectorised
            jn = jv = None
            tile_outer, tile_inner = [io], []
        tile_outer = [loop for loop in tile_outer if loop is not None]
        order = [*outer_spatial, *tile_outer, k] + ([ii] if ii is not None else []) + tile_inner
        sch.reorder(*order)
        outer = sch.fuse(*order[: len(outer_spatial) + len(tile_outer)])

        # Accumulators in a local buffer, written back (with the epilogue) per register block.
        local = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(local, outer, preserve_unit_loops=True)
        if consumers:
            sch.reverse_compute_inline(consumers[0])
        if jn is not None and t.v > 1:
            _, wv = sch.split(sch.get_loops(local)[-1], factors=[None, t.v])
            sch.vectorize(wv)
        sch.parallel(outer)
        if ii is not None:
            sch.unroll(ii)
        if jn is not None:
            sch.unroll(jn)
            sch.vectorize(jv)
        init = sch.decompose_reduction(main, k)
        if jn is not None:
            sch.vectorize(sch.get_loops(init)[-1])
        return sch


def pack_constant_b(
    sch: Any, main: Any, kinds: list[str], panel: Callable[[Any, Any], list[Any]]
) -> bool:
    """Re-lay the constant B operand of ``main`` at compile time by ``panel(k, j)`` (its new
    indices from B's K and J index), as a ``meta_schedule.layout_rewrite_preproc`` copy that
    :func:`edgecc.lower.schedules.post_schedule_passes` folds into the constant. Shared by the
    float and int8 matmul rules. False when B is not a constant kernel parameter
    (``layout_free_buffers``) or is not indexed by exactly one K and one J iterator."""
    from tvm import tirx

    func = sch.mod["main"]
    free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
    if not free:
        return False
    block = sch.get(main)
    matched = _match_product(block)
    if matched is None:
        return False
    b = matched[2]
    if not any(b.source.same_as(func.params[int(i)]) for i in free):
        return False
    kind_of = {iv.var: k for iv, k in zip(block.iter_vars, kinds, strict=True)}
    dims: dict[str, int] = {}
    for pos, idx in enumerate(b.indices):
        if isinstance(idx, tirx.IntImm):
            continue
        kind = kind_of.get(idx)
        if kind not in ("K", "J") or kind in dims:
            return False
        dims[kind] = pos
    if set(dims) != {"K", "J"}:
        return False
    read = next((i for i, r in enumerate(block.reads) if r.source.same_as(b.source)), None)
    if read is None:
        return False
    k_dim, j_dim = dims["K"], dims["J"]

    def packed(*axes: Any) -> list[Any]:
        return panel(axes[k_dim], axes[j_dim])

    copy = sch.cache_read(main, read, "global")
    sch.transform_layout(main, ("read", read), tirx.IndexMap.from_func(packed, ndim=len(b.indices)))
    sch.annotate(copy, "meta_schedule.layout_rewrite_preproc", True)
    return True
