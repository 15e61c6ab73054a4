"""x86 ``vpmaddubsw`` (:mod:`edgecc.lower.schedules.int8_x86`): used only where it is exact.

Layers built directly in Relax (:mod:`edgecc.lower.int8_layers`). A kernel whose constant
weights have ``|w0| + |w1| <= 128`` for every pair ``vpmaddubsw`` adds (7-bit weights, and a
boundary case whose pairs sum to exactly 128 with equal signs) must use ``vpmaddubsw`` (in the
assembly) and equal numpy's int64 reference bit for bit, also with every activation at 255 (the
largest pair sums, -32640); full-range weights must fall back to exact ``vpmaddwd``. Tolerance:
none (integer sums).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edgecc.lower.int8_layers import Layer, build_module, layer_module, reference
from edgecc.lower.schedules import int8_x86
from edgecc.targets import get_target


def _run(path: Path, layers: list[Layer], inputs: list[np.ndarray]) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    outs = vm["main"](*(tvm.runtime.tensor(x) for x in inputs))
    return [o.numpy() for o in outs]


def _check_exact(path: Path, layers: list[Layer]) -> None:
    rng = np.random.default_rng(3)
    for extreme in (False, True):
        xs = [lay.random_input(rng) for lay in layers]
        if extreme:
            xs = [np.full_like(x, 255) for x in xs]
        for layer, x, got in zip(layers, xs, _run(path, layers, xs), strict=True):
            want = reference(layer, x)
            assert got.dtype == want.dtype and np.array_equal(got, want), (layer.name, extreme)


def test_pairs_fit_rule() -> None:
    w = np.array([[64, 64], [-64, 64]], np.int8).T  # K = 2 on axis 0, pairs sum to 128
    assert int8_x86.pairs_fit(w, 0)
    assert not int8_x86.pairs_fit(np.array([[65], [64]], np.int8), 0)  # 129: could saturate
    assert not int8_x86.pairs_fit(np.array([[-128], [-128]], np.int8), 0)
    assert not int8_x86.pairs_fit(np.array([[1], [1], [1]], np.int8), 0)  # odd K
    assert not int8_x86.pairs_fit(None, 0)
    # pairs are along K only: large values in neighbouring output channels do not matter
    assert int8_x86.pairs_fit(np.array([[127, -127], [1, 1]], np.int8), 0)
    assert not int8_x86.pairs_fit(np.array([[127, -127], [1, 1]], np.int8), 1)
    seven = np.random.default_rng(0).integers(-63, 64, (3, 3, 64, 32)).astype(np.int8)
    assert int8_x86.pairs_fit(seven, 2)


# Weights whose pairs fit (7-bit; a boundary case -100/-28); shapes differ so each layer is its
# own kernel (kernels called more than once get no constant values: they would fall back).
FIT = [
    Layer("mm7", "matmul", (7, 96), 40, weight_fill="7bit"),
    Layer("conv7", "conv", (1, 16, 9, 9), 32, kernel=3, weight_fill="7bit"),
    Layer("conv7_s2", "conv", (1, 24, 11, 11), 16, kernel=3, stride=2, weight_fill="7bit"),
    Layer("conv_edge", "conv", (1, 8, 5, 5), 16, kernel=1, requant=False, weight_fill="pair128"),
]
FULL = [
    Layer("mm_full", "matmul", (7, 96), 40),
    Layer("conv_full", "conv", (1, 16, 9, 9), 32, kernel=3),
    Layer("conv_raw", "conv", (1, 8, 5, 5), 16, kernel=1, requant=False, weight_fill="extreme"),
]


def test_fitting_weights_use_vpmaddubsw_exactly(tmp_path: Path) -> None:
    for layer in FIT:
        w = layer.weight()
        assert int8_x86.pairs_fit(
            w if layer.kind == "matmul" else w.transpose(2, 3, 1, 0),
            2 - 2 * (layer.kind == "matmul"),
        )
    path, summary, asm = build_module(layer_module(FIT), get_target("x86-avx2"), tmp_path / "f.so")
    assert summary["counts"].get("int8-matmul") == 1
    assert summary["counts"].get("int8-conv2d") == 3
    assert len(re.findall(r"\bvpmaddubsw\b", asm)) >= 4
    _check_exact(path, FIT)


def test_saturating_weights_fall_back_to_vpmaddwd(tmp_path: Path) -> None:
    path, summary, asm = build_module(layer_module(FULL), get_target("x86-avx2"), tmp_path / "s.so")
    assert summary["counts"].get("int8-matmul") == 1
    assert summary["counts"].get("int8-conv2d") == 2
    assert re.search(r"\bvpmaddwd\b", asm)
    assert not re.search(r"\bvpmaddubsw\b", asm)
    _check_exact(path, FULL)


@pytest.mark.parametrize(("target", "pattern"), [("x86-avx512", r"\bvpmaddubsw\s[^\n]*%zmm")])
def test_avx512_builds_emit_512_bit_vpmaddubsw(tmp_path: Path, target: str, pattern: str) -> None:
    layers = [Layer("mm7_48", "matmul", (7, 96), 48, weight_fill="7bit")]
    _, summary, asm = build_module(layer_module(layers), get_target(target), tmp_path / "z.so")
    assert summary["counts"].get("int8-matmul") == 1
    assert re.search(pattern, asm)


# int8 activations: shifted to uint8 (edgecc.lower.int8.shift) where the weights fit or on VNNI.
S8 = [
    Layer("mm_s8_7", "matmul", (7, 96), 40, a_dtype="int8", weight_fill="7bit"),
    Layer("conv_s8_7", "conv", (1, 16, 9, 9), 32, kernel=3, a_dtype="int8", weight_fill="7bit"),
    Layer(
        "conv_s8_raw",
        "conv",
        (1, 24, 11, 11),
        16,
        kernel=3,
        stride=2,
        a_dtype="int8",
        requant=False,
        weight_fill="pair128",
    ),  # fmt: skip
]


def test_int8_activations_shifted_to_uint8_are_exact(tmp_path: Path) -> None:
    """The shifted kernels (uint8 x + 128, compensation in the bias, padding 128) equal numpy's
    unshifted int64 reference bit for bit, padded borders included, for random inputs and for
    inputs all -128 and all 127."""
    path, summary, asm = build_module(layer_module(S8), get_target("x86-avx2"), tmp_path / "8.so")
    assert summary["counts"].get("int8-matmul") == 1
    assert summary["counts"].get("int8-conv2d") == 2
    assert len(re.findall(r"\bvpmaddubsw\b", asm)) >= 3
    rng = np.random.default_rng(5)
    for fill in (None, -128, 127):
        xs = [lay.random_input(rng) for lay in S8]
        if fill is not None:
            xs = [np.full_like(x, fill) for x in xs]
        for layer, x, got in zip(S8, xs, _run(path, S8, xs), strict=True):
            assert np.array_equal(got, reference(layer, x)), (layer.name, fill)


def test_vnni_takes_vpdpbusd_for_int8_activations(tmp_path: Path) -> None:
    """Built only (this machine cannot run VNNI): full-range weights, int8 activations."""
    layers = [
        Layer("mm_s8_48", "matmul", (7, 96), 48, a_dtype="int8"),
        Layer("conv_s8_32", "conv", (1, 16, 9, 9), 32, kernel=3, a_dtype="int8"),
    ]
    target = get_target("x86-avx512-vnni")
    _, summary, asm = build_module(layer_module(layers), target, tmp_path / "v.so")
    assert summary["counts"].get("int8-matmul") == 1
    assert summary["counts"].get("int8-conv2d") == 1
    assert len(re.findall(r"\bvpdpbusd\s[^\n]*%zmm", asm)) >= 2
    assert not re.search(r"\bvpmaddwd\b", asm)


def test_three_channel_convs_padded_to_four_take_the_dot_product_path(tmp_path: Path) -> None:
    """C = 3 stem convs (edgecc.lower.int8.pad_channels: a zero fourth weight channel): exact
    against numpy, and on ``vpmaddubsw`` with 7-bit weights (u8 and shifted s8 activations)."""
    layers = [
        Layer("c3", "conv", (1, 3, 15, 15), 16, kernel=3, stride=2, weight_fill="7bit"),
        Layer("c3_s8", "conv", (1, 3, 17, 17), 32, kernel=7, stride=2, a_dtype="int8",
              weight_fill="7bit"),
        Layer("c3_full", "conv", (1, 3, 13, 13), 16, kernel=3),
    ]  # fmt: skip
    path, summary, asm = build_module(
        layer_module(layers), get_target("x86-avx2"), tmp_path / "c.so"
    )
    assert summary["counts"].get("int8-conv2d") == 3
    assert len(re.findall(r"\bvpmaddubsw\b", asm)) >= 2
    rng = np.random.default_rng(9)
    for fill in (None, 0, 255):
        xs = [lay.random_input(rng) for lay in layers]
        if fill is not None:
            xs = [np.full_like(x, fill - 128 * (x.dtype == np.int8)) for x in xs]
        for layer, x, got in zip(layers, xs, _run(path, layers, xs), strict=True):
            assert np.array_equal(got, reference(layer, x)), (layer.name, fill)
