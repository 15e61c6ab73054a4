"""Conv2d rule: register-blocked, vectorised, parallel NHWC convolutions with fused epilogues.

Matches a fused kernel holding one ``conv2d_nhwc`` / ``group_conv2d_nhwc`` block (TOPI's conv
after :mod:`edgecc.lower.schedules.layout` made it channels-last: activations NHWC, weights
HWIO), any kernel size, stride, dilation, padding and groups, except one input channel per
group (depthwise convs are :mod:`edgecc.lower.schedules.depthwise`'s), an optional padding block
before it and any chain of elementwise blocks after it (BN-folded bias, ReLU, clip, sigmoid/SiLU,
residual add: whatever ``FuseOps`` fused).

Schedule (``out[n, y, x, f] += pad[n, y*s+ry*d, x*s+rx*d, c] * w[ry, rx, c, f]``):

* micro-kernel: ``mr`` output pixels of one row x ``nf`` output channels accumulated in a
  ``local`` buffer that LLVM keeps in registers (``nf`` = ``nv * lanes`` with ``lanes`` from
  :class:`CpuParams`); :func:`register_tile` picks ``(mr, nf)`` with ``mr * nv`` <= the
  accumulator budget (12 registers with 16 vector registers (AVX2), 24 with 32 (AVX-512,
  NEON)), maximising FMAs per load and penalising a partial last pixel tile. Per input channel
  it loads ``nv`` weight vectors, broadcasts ``mr`` inputs and issues ``mr * nv`` FMAs. ``mr``
  is unrolled, ``nf`` unrolled by vector and vectorised; channel counts that are not a multiple
  of ``lanes`` take a tile that divides them (LLVM splits an odd-width vector into full vectors
  plus a tail);
* loops ``n, f_outer, y, x_outer | ry, rx, c | x_inner, f_inner``: the weights of one channel
  block (``KH*KW*C*nf`` floats) stay in L2 while every output pixel uses them; ``n, f_outer, y``
  are fused and parallel;
* tuning variants (:mod:`edgecc.lower.schedules.variants`) replace the accumulator budget and
  the vector bound by ``CpuParams.accumulators`` / ``max_vectors``, and with
  ``CpuParams.rows_outer`` order the loops ``n, y, f_outer, x_outer`` (an input row reused by
  every channel block; the weights streamed once per row);
* the epilogue is inlined into one block computed at the tile (``reverse_compute_at``), so the
  accumulators are written once, after bias/activation/residual, vectorised;
* the padding block stays a separate parallel, vectorised copy (the inner loop then has no
  bounds checks).

Declines (returns None): kernels without exactly one conv block, conv blocks that are not NHWC
with 7 iterators (``SSSSRRR``) (NCHW convs left by a failed layout conversion), dynamic shapes,
non-float outputs. Constant weights are packed per channel block (``[F/nf, KH, KW, C, nf]``, see
:func:`pack_weights`) when ``nf`` divides ``F``; otherwise they stay HWIO (the ``nf`` weights of
consecutive input channels are then ``F`` floats apart).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgecc.lower.schedules import CpuParams, CpuRule, register_rule

CONV_BLOCKS = ("conv2d_nhwc", "group_conv2d_nhwc")


@dataclass(frozen=True)
class ConvShape:
    """Static extents of an NHWC conv block: ``out[n, oh, ow, f]``, reduction ``kh, kw, cg``."""

    n: int
    oh: int
    ow: int
    f: int
    kh: int
    kw: int
    cg: int


def accumulator_budget(params: CpuParams) -> int:
    """Vector registers the micro-kernel may use for accumulators (the rest hold operands)."""
    return 12 if params.arch == "x86_64" and params.lanes <= 8 else 24


def channel_tile(extent: int, lanes: int, max_vectors: int) -> int:
    """Channels per micro-kernel: ``nv * lanes`` dividing ``extent``, else a divisor of it.

    ``nv`` is the largest in ``max_vectors..1`` with ``extent % (nv * lanes) == 0``. For extents
    that are not a multiple of ``lanes``: the whole extent when it fits ``max_vectors`` (at
    least 2) vectors, else its largest divisor <= 2 vectors when that is at least half a vector,
    else ``lanes`` (with a partial last tile).
    """
    for nv in range(max_vectors, 0, -1):
        if extent % (nv * lanes) == 0:
            return nv * lanes
    if extent <= max(2, max_vectors) * lanes:
        return extent
    best = max(d for d in range(1, 2 * lanes + 1) if extent % d == 0)
    return best if 2 * best >= lanes else lanes


def pixel_tile(extent: int, most: int) -> int:
    """Output pixels per micro-kernel for a fixed channel tile: a divisor of ``extent`` in
    ``[most/2, most]``, else ``most`` (the last tile is partial), never more than ``extent``."""
    most = max(1, min(most, extent))
    for mr in range(most, (most + 1) // 2 - 1, -1):
        if mr > 0 and extent % mr == 0:
            return mr
    return most


def register_tile(ow: int, f: int, lanes: int, budget: int, max_vectors: int) -> tuple[int, int]:
    """``(mr, nf)``: output pixels x output channels of the micro-kernel.

    Among channel tiles ``nv * lanes`` dividing ``f`` (or :func:`channel_tile`'s choice when
    none does) and pixel tiles ``mr`` with ``mr * nv <= budget``, the one with the most FMAs per
    load (``mr * nv / (mr + nv)``) divided by the share of wasted pixels in a partial last tile
    (``ceil(ow / mr) * mr / ow``; a partial tile also costs 10% for its bounds tests). Ties go to
    the larger tile; the choice depends on the shape and params only (deterministic).
    """
    tiles = [nv * lanes for nv in range(max_vectors, 0, -1) if f % (nv * lanes) == 0]
    tiles = tiles or [channel_tile(f, lanes, max_vectors)]
    best: tuple[float, int, int, int] | None = None
    for nf in tiles:
        nv = -(-nf // lanes)
        for mr in range(1, min(ow, max(1, budget // nv)) + 1):
            waste = -(-ow // mr) * mr / ow
            score = mr * nv / (mr + nv) / waste * (0.9 if ow % mr else 1.0)
            key = (round(score, 6), mr * nv, nf, mr)
            if best is None or key > best:
                best = key
    assert best is not None
    return best[3], best[2]


def find_conv_block(sch: Any) -> Any | None:
    """The single conv block of the kernel, or None."""
    found = [b for b in _blocks(sch) if sch.get(b).name_hint in CONV_BLOCKS]
    return found[0] if len(found) == 1 else None


def conv_shape(sch: Any, block: Any) -> ConvShape | None:
    """The static extents of an NHWC conv block with iterators ``SSSSRRR``, else None."""
    from tvm import tirx

    stmt = sch.get(block)
    kinds = "".join("S" if iv.iter_type == 0 else "R" for iv in stmt.iter_vars)
    if kinds != "SSSSRRR" or len(stmt.writes) != 1 or "float" not in stmt.writes[0].source.dtype:
        return None
    extents = [iv.dom.extent for iv in stmt.iter_vars]
    if not all(isinstance(e, tirx.IntImm) for e in extents):
        return None
    return ConvShape(*(int(e) for e in extents))


def is_depthwise(sch: Any, block: Any, shape: ConvShape) -> bool:
    """A grouped conv with one input channel per group."""
    return sch.get(block).name_hint == "group_conv2d_nhwc" and shape.cg == 1


def schedule_conv(sch: Any, conv: Any, shape: ConvShape, params: CpuParams, depthwise: bool):
    """Tile, vectorise and parallelise ``conv`` and fuse its epilogue (see module docstrings).

    Depthwise convs use the same micro-kernel with the channel tile outside the pixel tile and
    the (small) kernel window unrolled; ``cg`` is 1 there.
    """
    lanes = params.lanes
    budget = params.accumulators or accumulator_budget(params)
    max_vectors = params.max_vectors or min(4 if depthwise else 3, budget // 4)
    mr, nf = register_tile(shape.ow, shape.f, lanes, budget, max_vectors)

    producers = [b for b in sch.get_producers(conv) if sch.get(b).name_hint != "root"]
    if not depthwise and shape.f % nf == 0:
        pack_weights(sch, conv, nf)
    epilogue = fuse_epilogue(sch, conv)

    n, y, x, f, ry, rx, rc = sch.get_loops(conv)
    x_o, x_i = sch.split(x, factors=[None, mr])
    f_o, f_i = sch.split(f, factors=[None, nf])
    if depthwise or params.rows_outer:  # rows_outer: a tuning variant (rows reused)
        sch.reorder(n, y, f_o, x_o, ry, rx, rc, x_i, f_i)
        outer = sch.fuse(n, y, f_o)
    else:
        sch.reorder(n, f_o, y, x_o, ry, rx, rc, x_i, f_i)
        outer = sch.fuse(n, f_o, y)
    sch.parallel(outer)
    sch.unroll(x_i)
    vector_loops(sch, f_i, lanes)
    if depthwise and shape.kh * shape.kw <= 49:
        sch.unroll(ry)
        sch.unroll(rx)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, x_o, preserve_unit_loops=True)
        vectorize_innermost(sch, epilogue, lanes, skip=2)
        sch.set_scope(conv, 0, "local")  # mr x nf accumulators: registers after unrolling
    init = sch.decompose_reduction(conv, ry)
    vectorize_innermost(sch, init, lanes, skip=2)
    for block in producers:
        schedule_elementwise(sch, block, lanes)


def pack_weights(sch: Any, conv: Any, nf: int) -> bool:
    """Re-lay constant HWIO weights as ``[F / nf, KH, KW, C, nf]`` at compile time.

    With HWIO the ``nf`` weights the micro-kernel loads for consecutive input channels are ``F``
    floats apart (a 512-channel 3x3 layer touches 4608 scattered lines per output tile); packed,
    one channel block's weights are one contiguous stream. The copy is a
    ``meta_schedule.layout_rewrite_preproc`` block that
    :func:`edgecc.lower.schedules.post_schedule_passes` splits out of the kernel and folds into
    the constant, so nothing is re-laid out at run time. Only weights that are kernel parameters
    bound to constants (``layout_free_buffers``) are packed; returns whether it packed.
    """
    from tvm import tirx

    func = sch.mod["main"]
    free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
    if not free:
        return False
    buffers = [func.params[int(i)] for i in free]  # tirx: params are the buffers
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
        return [f // nf, ry, rx, c, f % nf]

    copy = sch.cache_read(conv, read, "global")
    sch.transform_layout(conv, ("read", read), tirx.IndexMap.from_func(packed, ndim=4))
    sch.annotate(copy, "meta_schedule.layout_rewrite_preproc", True)
    return True


def fuse_epilogue(sch: Any, anchor: Any) -> Any | None:
    """Inline every elementwise block after ``anchor`` into the last one; return that block.

    Returns None when there is no epilogue, or when some block after ``anchor`` cannot be inlined
    (it is then left at the root, scheduled as a parallel elementwise loop nest).
    """
    blocks = _blocks(sch)
    index = [sch.get(b).name_hint for b in blocks].index(sch.get(anchor).name_hint)
    if _inline_side_inputs(sch, anchor, blocks[:index]):
        blocks = _blocks(sch)
        index = [sch.get(b).name_hint for b in blocks].index(sch.get(anchor).name_hint)
    after = blocks[index + 1 :]
    if not after:
        return None
    for block in after[:-1]:
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001 - a block that does not inline stays at the root
            for rest in _blocks(sch)[index + 1 :]:
                schedule_elementwise(sch, rest, 0)
            return None
    return after[-1]


def vector_loops(sch: Any, loop: Any, lanes: int) -> None:
    """Vectorise ``loop`` by ``lanes`` (unrolling whole vectors) or whole when it is short."""
    extent = _extent(sch, loop)
    if extent is not None and extent > lanes and extent % lanes == 0:
        v_o, v_i = sch.split(loop, factors=[None, lanes])
        sch.unroll(v_o)
        sch.vectorize(v_i)
    elif extent is not None and extent <= 4 * lanes:
        sch.vectorize(loop)
    else:
        _, v_i = sch.split(loop, factors=[None, lanes])
        sch.vectorize(v_i)


def vectorize_innermost(sch: Any, block: Any, lanes: int, skip: int = 0) -> None:
    """Vectorise the innermost loop of ``block`` and unroll the other loops below ``skip``."""
    loops = sch.get_loops(block)
    if len(loops) <= skip:
        return
    for loop in loops[skip:-1]:
        sch.unroll(loop)
    vector_loops(sch, loops[-1], lanes)


def schedule_elementwise(sch: Any, block: Any, lanes: int) -> None:
    """A root-level injective block: leading loops fused and parallel, innermost vectorised."""
    loops = sch.get_loops(block)
    if not loops:
        return
    if lanes and len(loops) > 1:
        vector_loops(sch, loops[-1], lanes)
        loops = sch.get_loops(block)[:-1]
    outer = loops[: max(1, len(loops) - 1)]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _inline_side_inputs(sch: Any, anchor: Any, before: list) -> bool:
    """Inline the elementwise blocks that run before ``anchor`` but feed only its epilogue.

    An int8 residual Add fuses the dequantization of its other input (cast, subtract the zero
    point, multiply by the scale) into the conv's kernel as blocks at the root, ahead of the
    conv; left there they stop the epilogue from being computed at the conv's tile, and the
    whole kernel fell back to a serial schedule (ResNet-18 int8: 4 such kernels took 90 % of the
    time). Inlined, they become part of the epilogue's expression. Returns whether any was.
    """
    feeding: set[str] = set()
    todo = [anchor]
    while todo:
        for producer in sch.get_producers(todo.pop()):
            name = sch.get(producer).name_hint
            if name not in feeding:
                feeding.add(name)
                todo.append(producer)
    changed = False
    for block in before:
        if sch.get(block).name_hint in feeding:
            continue
        try:
            sch.compute_inline(block)
            changed = True
        except Exception:  # noqa: BLE001 - not elementwise: left at the root as before
            continue
    return changed


def _blocks(sch: Any) -> list:
    return sch.get_child_blocks(sch.get_sblock("root"))


def _extent(sch: Any, loop: Any) -> int | None:
    from tvm import tirx

    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


class ConvRuleBase(CpuRule):
    """One NHWC conv block + fused epilogue; subclasses say whether they take depthwise convs."""

    depthwise: bool = False
    knobs = ("accumulators", "max_vectors", "lanes")

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        conv = find_conv_block(sch)
        if conv is None:
            return None
        shape = conv_shape(sch, conv)
        if shape is None or is_depthwise(sch, conv, shape) != self.depthwise:
            return None
        schedule_conv(sch, conv, shape, self.params, depthwise=self.depthwise)
        return sch


@register_rule(10)
class Conv2dRule(ConvRuleBase):
    """NHWC conv2d (groups with > 1 channel per group) + fused epilogue."""

    name = "conv2d"
    knobs = ("accumulators", "max_vectors", "rows_outer", "lanes")
