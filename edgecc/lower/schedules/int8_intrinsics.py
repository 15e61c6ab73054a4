"""edgecc's int8 tensor intrinsics: ``v`` int32 lanes += sum over ``kp`` of a[k] * b[lane, k].

Every intrinsic has the same description (a TIR loop nest the int8 rules tensorize):

    C[i] += int32(A[k]) * int32(B[i, k])     i < v, k < kp

with ``A`` (``kp`` activations, int8 or uint8) broadcast to every lane, ``B`` (``v x kp`` int8
weights, lane-major: the packed weight layout ``[..., v, kp]`` of the int8 rules) and ``C`` the
``v`` int32 accumulators. The implementations, one per instruction set, and why each is exact:

* ``pmaddwd`` (x86 AVX2 ``v=8``, AVX-512BW ``v=16``; ``kp = 2``): both operands sign- (int8) or
  zero- (uint8) extended to int16, then ``vpmaddwd`` multiplies int16 pairs into int32 and adds
  each pair. Exact: ``|a * b| <= 255 * 128``, a pair sum < 2^16, far below int32; no int16
  intermediate. ``vpmaddubsw`` (u8 x s8 -> *saturating* int16 pair sums, 255 * 127 * 2 > 32767)
  is never picked here; the rules switch to it (:mod:`~edgecc.lower.schedules.int8_x86`, ``kp
  = 4``) only for kernels whose constant weights make every pair sum fit int16.
* ``vpdpbusd`` (AVX512-VNNI ``v=16``, AVX-VNNI ``v=8``; ``kp = 4``; uint8 activations only):
  u8 x s8 products summed in groups of four straight into int32 (no saturation in the
  non-``s`` form). The LLVM 22 signature takes ``<64 x i8>`` / ``<32 x i8>`` operands (TVM
  0.27's own VNNI intrinsic passes ``<16 x i32>`` and fails to build). int8 activations on
  VNNI targets use ``pmaddwd`` (no shift-by-128 compensation is needed that way).
* ``sdot`` (AArch64 ``+dotprod``, ``v=4``, ``kp=4``, int8 x int8): four-way dot products into
  int32, exact.
* ``smull`` (AArch64 NEON without dot product, Cortex-A72; ``v=4``, ``kp=4``, int8 x int8):
  ``smull``/``smull2`` (int8 x int8 -> int16, exact: ``|p| <= 16384``), ``saddlp`` (pairs ->
  int32) and ``addp`` (pairs of pairs): the sequence of TVM's ``dot_4x4_i8i8s32_neon``.

Names are registered once per process (:func:`intrinsic`); :data:`INTRINSICS` is the table
the rules pick from (by target features and activation dtype, see :func:`pick`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DotIntrinsic:
    """One tensor intrinsic: ``lanes`` int32 outputs, ``kp`` products each, its activation dtype."""

    name: str
    lanes: int
    kp: int
    a_dtype: str
    isa: str


def _desc(v: int, kp: int, a_dtype: str) -> Any:
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (kp,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (v, kp), "int8", offset_factor=1)
        C = T.match_buffer(c, (v,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:v], A[0:kp], B[0:v, 0:kp])
            T.writes(C[0:v])
            for i, k in T.grid(v, kp):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])

    return desc


def _pmaddwd(v: int, a_dtype: str) -> Any:
    from tvm.script import tirx as T

    name = "llvm.x86.avx2.pmadd.wd" if v == 8 else "llvm.x86.avx512.pmaddw.d.512"
    w = 2 * v

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (v, 2), "int8", offset_factor=1)
        C = T.match_buffer(c, (v,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:v], A[0:2], B[0:v, 0:2])
            T.writes(C[0:v])
            a16 = T.Cast("int16x2", A.vload([0], f"{a_dtype}x2"))
            a_pairs = T.reinterpret("int16x" + str(w), T.broadcast(T.reinterpret("int32", a16), v))
            b16 = T.Cast("int16x" + str(w), B.vload([0, 0], "int8x" + str(w)))
            C[T.ramp(0, 1, v)] = C.vload([0], "int32x" + str(v)) + T.call_llvm_pure_intrin(
                "int32x" + str(v), name, a_pairs, b16
            )

    return impl


def _vpdpbusd(v: int) -> Any:
    from tvm.script import tirx as T

    name = "llvm.x86.avx512.vpdpbusd.512" if v == 16 else "llvm.x86.avx512.vpdpbusd.256"
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
            C[T.ramp(0, 1, v)] = T.call_llvm_pure_intrin(
                "int32x" + str(v),
                name,
                C.vload([0], "int32x" + str(v)),
                a_quads,
                B.vload([0, 0], "int8x" + str(w)),
            )

    return impl


def _sdot() -> Any:
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a_quads = T.reinterpret(
                "int8x16", T.broadcast(T.reinterpret("int32", A.vload([0], "int8x4")), 4)
            )
            C[T.ramp(0, 1, 4)] = T.call_llvm_pure_intrin(
                "int32x4",
                "llvm.aarch64.neon.sdot.v4i32.v16i8",
                C.vload([0], "int32x4"),
                a_quads,
                B.vload([0, 0], "int8x16"),
            )

    return impl


def _smull() -> Any:
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a8 = T.reinterpret(
                "int8x8", T.broadcast(T.reinterpret("int32", A.vload([0], "int8x4")), 2)
            )
            b = B.vload([0, 0], "int8x16")
            lo = T.call_llvm_pure_intrin(
                "int16x8", "llvm.aarch64.neon.smull.v8i16", a8, T.vectorlow("int8x8", b)
            )
            hi = T.call_llvm_pure_intrin(
                "int16x8", "llvm.aarch64.neon.smull.v8i16", a8, T.vectorhigh("int8x8", b)
            )
            C[T.ramp(0, 1, 4)] = C.vload([0], "int32x4") + T.call_llvm_pure_intrin(
                "int32x4",
                "llvm.aarch64.neon.addp.v4i32",
                T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", lo),
                T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.saddlp.v4i32.v8i16", hi),
            )

    return impl


_IMPLS: dict[str, tuple[DotIntrinsic, Callable[[], Any]]] = {}


def _add(intrin: DotIntrinsic, impl: Callable[[], Any]) -> None:
    _IMPLS[intrin.name] = (intrin, impl)


for _a in ("uint8", "int8"):
    _s = "u8" if _a == "uint8" else "s8"
    _add(DotIntrinsic(f"edgecc_pmaddwd_8x2_{_s}", 8, 2, _a, "avx2"), lambda a=_a: _pmaddwd(8, a))
    _add(
        DotIntrinsic(f"edgecc_pmaddwd_16x2_{_s}", 16, 2, _a, "avx512"),
        lambda a=_a: _pmaddwd(16, a),
    )
_add(DotIntrinsic("edgecc_vpdpbusd_16x4_u8", 16, 4, "uint8", "avx512vnni"), lambda: _vpdpbusd(16))
_add(DotIntrinsic("edgecc_vpdpbusd_8x4_u8", 8, 4, "uint8", "avxvnni"), lambda: _vpdpbusd(8))
_add(DotIntrinsic("edgecc_sdot_4x4_s8", 4, 4, "int8", "dotprod"), _sdot)
_add(DotIntrinsic("edgecc_smull_4x4_s8", 4, 4, "int8", "neon"), _smull)
# x86 vpmaddubsw (exact only for some weights: chosen by the rules, never by ``pick``).
from edgecc.lower.schedules.int8_x86 import UBSW as _UBSW  # noqa: E402

for _name, _lanes, _isa, _impl in _UBSW.values():
    _add(DotIntrinsic(_name, _lanes, 4, "uint8", _isa), _impl)

INTRINSICS: tuple[DotIntrinsic, ...] = tuple(i for i, _ in _IMPLS.values())

_REGISTERED: set[str] = set()


def intrinsic(name: str) -> str:
    """Register the tensor intrinsic ``name`` with TVM (once per process); return its name."""
    if name not in _REGISTERED:
        from tvm.s_tir import TensorIntrin

        info, impl = _IMPLS[name]
        try:
            TensorIntrin.register(name, _desc(info.lanes, info.kp, info.a_dtype), impl())
        except Exception as err:  # noqa: BLE001 - already registered by an earlier import
            if "already" not in str(err).lower():
                raise
        _REGISTERED.add(name)
    return name


def target_features(target: Any) -> set[str]:
    """The int8-relevant features of a TVM LLVM target: ``avx2``, ``avx512``, ``avx512vnni``,
    ``avxvnni``, ``neon``, ``dotprod`` (from its mcpu / mattr; never from the compiling host)."""
    arch = str(target.attrs.get("mtriple", ""))
    mcpu = str(target.attrs.get("mcpu", ""))
    mattr = {str(a).lstrip("+") for a in target.attrs.get("mattr", []) if str(a).startswith("+")}
    feats: set[str] = set()
    if arch.startswith("aarch64"):
        feats.add("neon")
        if "dotprod" in mattr or mcpu in _DOTPROD_CPUS:
            feats.add("dotprod")
        return feats
    levels = {"x86-64-v3": {"avx2"}, "x86-64-v4": {"avx2", "avx512"}}
    feats |= levels.get(mcpu, set())
    if mcpu in _VNNI_CPUS:
        feats |= {"avx2", "avx512", "avx512vnni"}
    if "avx512vnni" in mattr:
        feats |= {"avx512vnni"}
    if "avxvnni" in mattr:
        feats |= {"avx2", "avxvnni"}
    if "avx2" in mattr:
        feats.add("avx2")
    if {"avx512f", "avx512bw"} <= mattr:
        feats.add("avx512")
    return feats


# CPUs whose -mcpu implies the feature (LLVM's definitions).
_DOTPROD_CPUS = {"cortex-a76", "cortex-a78", "cortex-a78ae", "cortex-a55", "neoverse-n1", "carmel"}
_VNNI_CPUS = {"cascadelake", "icelake-server", "sapphirerapids", "znver4", "znver5", "tigerlake"}


def pick(features: set[str], a_dtype: str) -> DotIntrinsic | None:
    """The fastest intrinsic the features allow for ``a_dtype`` x int8, or None."""
    order = {
        "avx512vnni": 0,
        "avx512": 1,
        "avxvnni": 2,
        "avx2": 3,
        "dotprod": 4,
        "neon": 5,
    }
    best = [i for i in INTRINSICS if i.isa in features and i.a_dtype == a_dtype]
    return min(best, key=lambda i: order[i.isa]) if best else None
