"""Cortex-A72 (NEON, no dot product) int8 kernels without horizontal reductions.

The description is the one of every edgecc int8 intrinsic (:mod:`.int8_intrinsics`)::

    C[f] += int32(A[k]) * int32(B[f, k])     f < 4, k < 4

but the 16 weights of one instruction group are packed *pair-interleaved*: byte
``8 h + 2 f + s`` holds ``B[f, 2 h + s]`` (``h, s < 2``), i.e. the packed weight layout of the int8
rules becomes ``[..., K / 4, nf / 4, 2, 4, 2]`` instead of ``[..., K / 4, nf, 4]``. With the
activation pairs broadcast, ``a01 = (A0, A1) x 4`` and ``a23 = (A2, A3) x 4`` (two ``ld1r``, shared
by all the output vectors of a pixel), and the two 8-byte halves ``B.lo``, ``B.hi`` loaded by one
``ldp``, one group is three instructions and no lane crosses an output::

    p      = smull(a01, B.lo) + smull(a23, B.hi)   int16 lane 2f+s: A[s]B[f,s] + A[2+s]B[f,2+s]
    C[f]  += p[2f] + p[2f+1]                             sadalp: pairs -> int32, accumulate

``smull`` + ``smlal`` + ``sadalp``: 16 multiply-adds in 3 instructions (fp32's ``fmla`` does 4
per instruction), and a 16-byte weight load feeds 16 products (4 in fp32). The accumulators are
the outputs themselves: there is no reduction at write-back and none per step (the intrinsic it
replaces, TVM's ``dot_4x4_i8i8s32_neon`` sequence, spends ``saddlp`` x2 + ``addp`` + ``add`` per
group on the horizontal sums).

Exactness. ``|A[k] B[f,k]| <= 128 * 128 = 16384`` fits int16. The int16 sum of two products is
exact unless both are ``(-128) * (-128)``: ``32768`` wraps. It is therefore used only when every
weight of the kernel is in ``[-127, 127]`` (edgecc's ``qdq`` and ONNX Runtime's symmetric
weights are): :func:`weight_range_pass` records each kernel's smallest constant int8 weight in the
PrimFunc attribute ``edgecc.int8_weight_min`` before the rules run, and :func:`refine` picks
``edgecc_smlal_4x4_s8`` only when it is >= -127. Otherwise ``edgecc_sadalp_4x4_s8`` adds the two
products through int32 instead (``smull`` x2, ``sadalp`` x2: exact for all int8 values,
4 instructions per group, still without horizontal sums). ``sadalp``'s pair sums (<= 32768) and
the int32 accumulation are exact while ``K * 16384 < 2^31``.

Limits: int8 activations only (the ARM targets take uint8 activations on the generic rules);
the int8 rules' conditions (``K`` and input channels multiples of 4, ``N`` / ``F`` of 4).
"""

from __future__ import annotations

from typing import Any

from edgecc.lower.schedules.int8_intrinsics import DotIntrinsic

WEIGHT_MIN_ATTR = "edgecc.int8_weight_min"

SMLAL = DotIntrinsic("edgecc_smlal_4x4_s8", 4, 4, "int8", "neon")
SADALP = DotIntrinsic("edgecc_sadalp_4x4_s8", 4, 4, "int8", "neon")
# The intrinsic of int8_intrinsics these replace on NEON targets.
_REPLACED = "edgecc_smull_4x4_s8"


def refine(chosen: DotIntrinsic | None, func: Any) -> DotIntrinsic | None:
    """The NEON intrinsic to use instead of ``chosen`` (the generic ``smull`` one) for ``func``:
    ``smlal`` when all its constant int8 weights are >= -127, else ``sadalp``; other intrinsics
    unchanged."""
    if chosen is None or chosen.name != _REPLACED:
        return chosen
    attrs = func.attrs if func is not None else None
    low = attrs.get(WEIGHT_MIN_ATTR) if attrs is not None else None
    return SMLAL if low is not None and int(low) >= -127 else SADALP


def is_neon(chosen: DotIntrinsic | None) -> bool:
    """Whether ``chosen`` is one of this file's intrinsics (pair-interleaved weights)."""
    return chosen is not None and chosen.name in (SMLAL.name, SADALP.name)


def packed_group(f: Any, c: Any, nf: int) -> list[Any]:
    """The trailing packed-weight indices of weight ``(f, c)`` in a block of ``nf`` outputs:
    ``[c / 4, (f % nf) / 4, (c % 4) / 2, f % 4, c % 2]`` (the pair-interleaved groups)."""
    return [c // 4, (f % nf) // 4, (c % 4) // 2, f % 4, c % 2]


def _desc() -> Any:
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (2, 4, 2), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:2, 0:4, 0:2])
            T.writes(C[0:4])
            for i, k in T.grid(4, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vk // 2, vi, vk % 2])

    return desc


def _impl(int16_sum: bool) -> Any:
    from tvm.script import tirx as T

    smull = "llvm.aarch64.neon.smull.v8i16"
    saddlp = "llvm.aarch64.neon.saddlp.v4i32.v8i16"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (2, 4, 2), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:2, 0:4, 0:2])
            T.writes(C[0:4])
            pairs = T.reinterpret("int16x2", A.vload([0], "int8x4"))
            a01 = T.reinterpret("int8x8", T.Shuffle([pairs, pairs], [0, 0, 0, 0]))
            a23 = T.reinterpret("int8x8", T.Shuffle([pairs, pairs], [1, 1, 1, 1]))
            lo = T.call_llvm_pure_intrin("int16x8", smull, a01, B.vload([0, 0, 0], "int8x8"))
            hi = T.call_llvm_pure_intrin("int16x8", smull, a23, B.vload([1, 0, 0], "int8x8"))
            if int16_sum:
                C[T.ramp(0, 1, 4)] = C.vload([0], "int32x4") + T.call_llvm_pure_intrin(
                    "int32x4", saddlp, lo + hi
                )
            else:
                C[T.ramp(0, 1, 4)] = (
                    C.vload([0], "int32x4")
                    + T.call_llvm_pure_intrin("int32x4", saddlp, lo)
                    + T.call_llvm_pure_intrin("int32x4", saddlp, hi)
                )

    return impl


_REGISTERED: set[str] = set()


def intrinsic(chosen: DotIntrinsic) -> str:
    """Register ``chosen`` (:data:`SMLAL` or :data:`SADALP`) with TVM once; return its name."""
    if chosen.name not in _REGISTERED:
        from tvm.s_tir import TensorIntrin

        try:
            TensorIntrin.register(chosen.name, _desc(), _impl(chosen is SMLAL))
        except Exception as err:  # noqa: BLE001 - already registered in this process
            if "already" not in str(err).lower():
                raise
        _REGISTERED.add(chosen.name)
    return chosen.name


def weight_range_pass() -> Any:
    """A module pass: every PrimFunc called (``call_tir``) with constant int8 arguments gets
    :data:`WEIGHT_MIN_ATTR` = the smallest value of those constants over all its call sites (a
    kernel shared by several layers takes the minimum of all)."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="EdgeccInt8WeightRange")
    def _pass(mod: Any, _ctx: Any) -> Any:
        call_tir = tvm.ir.Op.get("relax.call_tir")
        lows: dict[Any, int] = {}

        def visit(expr: Any) -> None:
            if not isinstance(expr, tvm.ir.expr.Call) or not expr.op.same_as(call_tir):
                return
            gvar, args = expr.args[0], expr.args[1]
            if not isinstance(args, relax.Tuple):
                return
            for arg in args.fields:
                if isinstance(arg, tvm.ir.expr.Constant) and str(arg.value.dtype) == "int8":
                    data = arg.value.numpy()
                    low = int(data.min()) if data.size else 0
                    lows[gvar.name_hint] = min(lows.get(gvar.name_hint, low), low)

        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(func, visit)
        for name, low in lows.items():
            func = mod[name]
            if isinstance(func, tvm.tirx.PrimFunc):
                mod[mod.get_global_var(name)] = func.with_attr(WEIGHT_MIN_ATTR, low)
        return mod

    return _pass
