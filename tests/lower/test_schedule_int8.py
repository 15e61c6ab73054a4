"""int8 kernel rules (int8 matmul / conv2d, edgecc's tensor intrinsics): exactness and codegen.

The layers are the integer lowering's ops built directly in Relax (:mod:`edgecc.lower.int8_layers`):
8-bit activations, int8 constant weights, int32 accumulation and the fused requantize epilogue.
Exactness is bit for bit (integer sums, the same float32 epilogue) against numpy's int64
reference and against the same module built with the schedule rules off. Sizes cover K odd
(fallback to the vectorised int32 rule), N = 1, M = 1, a C = 3 first conv, depthwise and grouped
convs. Code generation is checked in the assembly: ``vpmaddwd`` (AVX2), ``vpdpbusd`` (AVX512-VNNI
and AVX-VNNI, built only: this machine and qemu 7.2 cannot execute them), ``smull``/``saddlp``
(rpi4) and ``sdot`` (rpi5), the ARM builds run under qemu-aarch64.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edgecc.lower.int8_layers import Layer, build_module, layer_module, reference
from edgecc.lower.schedules import int8_intrinsics as intrin
from edgecc.runtime import run_library
from edgecc.targets import get_target
from edgecc.targets.x86 import host_base

LAYERS = [
    Layer("mm", "matmul", (7, 96), 40),
    Layer("mm_s8", "matmul", (5, 64), 24, a_dtype="int8"),
    Layer("mm_kodd", "matmul", (5, 27), 16, a_dtype="int8"),
    Layer("mm_n1", "matmul", (3, 64), 1),
    Layer("mm_m1", "matmul", (1, 64), 24),
    Layer("mm_raw", "matmul", (4, 64), 16, requant=False, weight_fill="extreme"),
    Layer("conv", "conv", (1, 16, 9, 9), 32, kernel=3),
    Layer("conv_s8", "conv", (1, 24, 7, 7), 40, a_dtype="int8", stride=2, kernel=3),
    Layer("conv_c3", "conv", (1, 3, 15, 15), 16, kernel=3, stride=2),
    Layer("dw", "conv", (1, 32, 9, 9), 32, kernel=3, groups=32, a_dtype="int8"),
    Layer("group", "conv", (1, 16, 6, 6), 16, kernel=3, groups=2),
    Layer("conv_raw", "conv", (1, 8, 5, 5), 16, kernel=1, requant=False, weight_fill="extreme"),
]
# Kernels the dot-product schedules must take (the others may fall back to the generic rules).
DOT = {"mm", "mm_s8", "mm_m1", "mm_raw", "conv", "conv_s8", "group", "conv_raw"}


def _inputs(extreme: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    out = {}
    for layer in LAYERS:
        x = layer.random_input(rng)
        if extreme:  # 255 (u8) / -128 (s8) everywhere: vpmaddubsw would saturate here
            x = np.full_like(x, 255 if layer.a_dtype == "uint8" else -128)
        out[f"{layer.name}_x"] = x
    return out


def _kernel_rules(summary: dict) -> dict[str, str | None]:
    return summary["kernels"]


@pytest.fixture(scope="module")
def x86_builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    tmp = tmp_path_factory.mktemp("int8")
    target = get_target("x86-avx2")
    mod = layer_module(LAYERS)
    return {
        "on": build_module(mod, target, tmp / "on.so", schedules=True),
        "off": build_module(layer_module(LAYERS), target, tmp / "off.so", schedules=False),
    }


def _run(path: Path, target_name: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    names = [layer.name for layer in LAYERS]
    return list(run_library(path, get_target(target_name), inputs, names).values())


def _run_here(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run an x86 library in this process (a runner subprocess costs a TVM import per call)."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    outs = vm["main"](*(tvm.runtime.tensor(inputs[f"{lay.name}_x"]) for lay in LAYERS))
    return [o.numpy() for o in outs]


@pytest.mark.slow
@pytest.mark.parametrize("extreme", [False, True])
def test_x86_int8_kernels_bit_exact(x86_builds: dict, extreme: bool) -> None:
    inputs = _inputs(extreme)
    on = _run_here(x86_builds["on"][0], inputs)
    off = _run_here(x86_builds["off"][0], inputs)
    for layer, got, unscheduled in zip(LAYERS, on, off, strict=True):
        want = reference(layer, inputs[f"{layer.name}_x"])
        assert got.dtype == want.dtype and np.array_equal(got, want), layer.name
        assert np.array_equal(got, unscheduled), layer.name


def test_extreme_values_would_saturate_vpmaddubsw() -> None:
    """The extreme inputs are a real saturation case: a u8 x s8 pair sum is out of int16."""
    layer = next(lay for lay in LAYERS if lay.name == "mm_raw")
    pair = 255 * layer.weight()[0:2, 0].astype(np.int64)
    assert abs(pair.sum()) <= 32767 < 255 * 128 * 2  # alternating signs: this pair cancels...
    same_sign = 255 * np.array([-128, -128], np.int64)  # ...a conv/matmul pair of equal weights
    assert abs(same_sign.sum()) > 32767  # would saturate; pmaddwd's int32 pair sum is exact


@pytest.mark.slow
def test_x86_rules_and_instructions(x86_builds: dict) -> None:
    _, summary, asm = x86_builds["on"]
    rules = _kernel_rules(summary)
    for layer in LAYERS:
        kernel = [k for k, v in rules.items() if f"{layer.name}" in k or v is not None]
        assert kernel, layer.name
    counts = summary["counts"]
    matmuls = sum(1 for lay in DOT if lay.startswith("mm"))
    convs = sum(1 for lay in DOT if not lay.startswith("mm"))
    assert counts.get("int8-matmul", 0) >= matmuls
    assert counts.get("int8-conv2d", 0) >= convs + 2  # + the C = 3 and depthwise convs
    assert re.search(r"\bvpmaddwd\b", asm)
    assert not re.search(r"\bvpmaddubsw\b", asm)  # the saturating form is never emitted


@pytest.mark.parametrize(
    ("target", "pattern"),
    [("x86-avx512-vnni", r"\bvpdpbusd\s+%zmm"), ("x86-avx-vnni", r"\{vex\}\s+vpdpbusd\s+%ymm")],
)
def test_vnni_builds_emit_vpdpbusd(tmp_path: Path, target: str, pattern: str) -> None:
    layers = [Layer("mm48", "matmul", (7, 96), 48), LAYERS[6]]  # N, F multiples of 16
    _, summary, asm = build_module(layer_module(layers), get_target(target), tmp_path / "v.so")
    assert summary["counts"].get("int8-matmul") == 1
    assert summary["counts"].get("int8-conv2d") == 1
    assert len(re.findall(pattern, asm)) >= 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "instructions"), [("rpi4", ("smull", "saddlp")), ("rpi5", ("sdot",))]
)
def test_arm_int8_kernels_exact_under_qemu(
    tmp_path: Path, target: str, instructions: tuple[str, ...]
) -> None:
    path, summary, asm = build_module(layer_module(LAYERS), get_target(target), tmp_path / "a.so")
    for name in instructions:
        assert re.search(rf"\b{name}\b", asm), name
    assert summary["counts"].get("int8-matmul", 0) >= 1  # mm_s8 (ARM intrinsics take s8 only)
    inputs = _inputs(extreme=False)
    got = _run(path, target, inputs)
    for layer, out in zip(LAYERS, got, strict=True):
        assert np.array_equal(out, reference(layer, inputs[f"{layer.name}_x"])), layer.name


def test_target_features_and_pick() -> None:
    from tvm.target import Target as TvmTarget

    def feats(name: str) -> set[str]:
        t = get_target(name)
        return intrin.target_features(TvmTarget(t.tvm_target))

    assert intrin.pick(feats("x86-avx2"), "uint8").name == "edgecc_pmaddwd_8x2_u8"
    assert intrin.pick(feats("x86-avx512"), "int8").name == "edgecc_pmaddwd_16x2_s8"
    assert intrin.pick(feats("x86-avx512-vnni"), "uint8").name == "edgecc_vpdpbusd_16x4_u8"
    assert intrin.pick(feats("x86-avx-vnni"), "uint8").name == "edgecc_vpdpbusd_8x4_u8"
    assert intrin.pick(feats("rpi4"), "int8").name == "edgecc_smull_4x4_s8"
    assert intrin.pick(feats("rpi5"), "int8").name == "edgecc_sdot_4x4_s8"
    assert intrin.pick(feats("rpi4"), "uint8") is None  # generic rules take u8 on ARM


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx avx2 fma", "x86-avx2"),
        ("avx2 avx_vnni", "x86-avx-vnni"),
        ("avx2 avx512f avx512bw avx512dq avx512vl", "x86-avx512"),
        ("avx2 avx512f avx512bw avx512dq avx512vl avx512_vnni", "x86-avx512-vnni"),
    ],
)
def test_x86_picks_vnni_from_cpuinfo(tmp_path: Path, flags: str, expected: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert host_base(cpuinfo).name == expected


@pytest.mark.parametrize(("ow", "f", "lanes"), [(14, 64, 8), (7, 512, 8), (56, 64, 16), (5, 4, 4)])
def test_dot_tile_divides_width(ow: int, f: int, lanes: int) -> None:
    """The dot-product conv tile never leaves a partial pixel tile (tensorize refuses those)."""
    from edgecc.lower.schedules.int8_conv2d import dot_tile

    mr, nf = dot_tile(ow, f, lanes, budget=12, max_vectors=3)
    assert ow % mr == 0 and f % nf == 0 and nf % lanes == 0 and mr * (nf // lanes) <= 12
