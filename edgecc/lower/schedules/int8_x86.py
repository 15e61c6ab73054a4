"""x86 ``vpmaddubsw`` int8 intrinsic, used only for kernels whose constant weights make it exact.

The instruction (AVX2 ``v = 8`` int32 lanes, AVX-512BW ``v = 16``; ``kp = 4``, uint8
activations): ``vpmaddubsw`` multiplies u8 x s8 bytes and adds adjacent products into int16
with *signed saturation*, then ``vpmaddwd`` against a vector of int16 ones adds the two int16
pair sums of each lane into int32 (exact) and the result is added to the accumulator; ONNX
Runtime's AVX2 u8s8 kernels do the same. Twice the products per instruction of the exact
``vpmaddwd`` path of :mod:`~edgecc.lower.schedules.int8_intrinsics` (which widens both operands
to int16 first), the same description (``C[i] += sum_k int32(A[k]) * int32(B[i, k])``).

When it is exact: a pair sum is ``a0 * w0 + a1 * w1`` with ``a`` in [0, 255], so its magnitude is
at most ``255 * (|w0| + |w1|)``; if ``|w0| + |w1| <= 128`` for every pair of weights that one
instruction adds (along K: input channels ``2j, 2j + 1`` of the same tap and output channel,
``j`` counted from a multiple of ``kp``), that is ``<= 32640 <= 32767`` and nothing saturates,
whatever the activations: the result equals the exact integer sum bit for bit. The check runs
at compile time on the kernel's constant weights (:func:`pairs_fit`; the schedules pass gives
the rules the values of a kernel's constant arguments, :func:`edgecc.lower.schedules.constants`);
a kernel whose weights do not fit, or whose weights are unknown (not constant, or a tuning
run), keeps ``vpmaddwd``. 7-bit weights (``qdq(reduce_range=true)``, values in [-63, 63]) always
fit. VNNI targets keep ``vpdpbusd`` (exact, four products into int32, faster still).

Limits: uint8 activations only (int8 activations reach it through the shift to uint8 of
:mod:`edgecc.lower.int8.shift`); ``C / groups`` and ``K`` multiples of 4, as for ``vpdpbusd``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PAIR_LIMIT = 128  # 255 * 128 = 32640 <= 32767 (int16 max)


def _pmaddubsw(v: int) -> Any:
    from tvm.script import tirx as T

    if v == 8:
        ubsw, wd = "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"
    else:
        ubsw, wd = "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"
    w = 4 * v

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (v, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (v,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:v], A[0:4], B[0:v, 0:4])
            T.writes(C[0:v])
            a4 = T.reinterpret("int32", A.vload([0], "uint8x4"))
            a_quads = T.reinterpret("int8x" + str(w), T.broadcast(a4, v))
            pairs = T.call_llvm_pure_intrin(
                "int16x" + str(2 * v), ubsw, a_quads, B.vload([0, 0], "int8x" + str(w))
            )
            ones = T.broadcast(T.int16(1), 2 * v)
            C[T.ramp(0, 1, v)] = C.vload([0], "int32x" + str(v)) + T.call_llvm_pure_intrin(
                "int32x" + str(v), wd, pairs, ones
            )

    return impl


# (name, lanes, isa of the exact intrinsic it replaces, implementation); the isa names are not
# target features, so ``int8_intrinsics.pick`` never chooses these by itself.
UBSW = {
    "avx2": ("edgecc_pmaddubsw_8x4_u8", 8, "avx2-ubsw", lambda: _pmaddubsw(8)),
    "avx512": ("edgecc_pmaddubsw_16x4_u8", 16, "avx512-ubsw", lambda: _pmaddubsw(16)),
}


def pairs_fit(weights: np.ndarray | None, k_axis: int) -> bool:
    """True when every pair of weights ``vpmaddubsw`` adds (indices ``2j, 2j + 1`` along
    ``k_axis``) has ``|w0| + |w1| <= 128``; False for unknown weights or an odd K."""
    if weights is None or weights.dtype != np.int8 or weights.shape[k_axis] % 2:
        return False
    a = np.abs(np.moveaxis(weights, k_axis, 0).astype(np.int16))
    return bool((a[0::2] + a[1::2]).max(initial=0) <= PAIR_LIMIT)


def prefer_ubsw(chosen: Any, weights: np.ndarray | None, k_axis: int, k_extent: int) -> Any:
    """``chosen`` (the exact intrinsic the target's features give), or ``vpmaddubsw`` of the
    same width when ``chosen`` is the uint8 ``vpmaddwd`` and the weights make it exact."""
    from edgecc.lower.schedules import int8_intrinsics as intrin

    if chosen is None or not chosen.name.startswith("edgecc_pmaddwd_") or chosen.a_dtype != "uint8":
        return chosen
    if k_extent % 4 or not pairs_fit(weights, k_axis):
        return chosen
    isa = "avx2" if chosen.lanes == 8 else "avx512"
    return next(i for i in intrin.INTRINSICS if i.name == UBSW[isa][0])


def constant_of(func: Any, buffer: Any) -> np.ndarray | None:
    """The compile-time value of the kernel parameter ``buffer`` (a constant argument of the
    kernel's call), else None."""
    from edgecc.lower.schedules import constants

    values = constants()
    if not values:
        return None
    for i, param in enumerate(func.params):  # TVM 0.27: a kernel's params are its buffers
        if param.same_as(buffer):
            return values.get(i)
    return None


def conv_weights(func: Any, block: Any) -> np.ndarray | None:
    """The constant HWIO int8 weights a conv block reads (input channels on axis 2), else None."""
    for region in block.reads:
        value = constant_of(func, region.source)
        if value is not None and value.ndim == 4 and len(region.region) == 4:
            return value
    return None


def matmul_weights(func: Any, block: Any, kinds: list[str]) -> tuple[np.ndarray | None, int]:
    """``(B, axis of K in B)`` for a matmul block reading a constant B (``(None, 0)`` else)."""
    from edgecc.lower.schedules.matmul import _match_product

    matched = _match_product(block)
    if matched is None:
        return None, 0
    b = matched[2]
    kind_of = {iv.var: k for iv, k in zip(block.iter_vars, kinds, strict=True)}
    k_axes = [p for p, idx in enumerate(b.indices) if kind_of.get(idx) == "K"]
    value = constant_of(func, b.source)
    if len(k_axes) != 1 or value is None or value.ndim != len(b.indices):
        return None, 0
    return value, k_axes[0]
