"""Cortex-A72 int8 kernels (:mod:`edgecc.lower.schedules.int8_neon`): exact under qemu-aarch64.

One small rpi4 module holds the cases: symmetric weights in [-127, 127] (the ``smull`` +
``smlal`` + ``sadalp`` intrinsic, int16 pair sums) for a matmul, a 3x3 conv and a pointwise
conv, and weights containing -128 (the ``sadalp`` intrinsic, exact for every int8 value) for a
matmul and a conv with alternating -128 / 127 weights. Inputs are random and all -128 (the
largest products: with weights >= -127 the int16 pair sum is at most 2 * 128 * 127 = 32512).
Outputs must equal numpy's int64 reference bit for bit; the assembly must contain the new
sequence and no ``addp`` (no horizontal sums). The weight-range pass and the intrinsic choice are
checked on the module without building.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgecc.lower.int8_layers import Layer, build_module, layer_module, reference
from edgecc.lower.schedules import int8_neon as neon
from edgecc.runtime import run_library
from edgecc.targets import get_target

SYM = "symmetric"
LAYERS = [
    Layer("mm", "matmul", (5, 64), 24, a_dtype="int8", weight_fill=SYM),
    Layer("conv", "conv", (1, 16, 6, 6), 24, kernel=3, a_dtype="int8", weight_fill=SYM),
    Layer("pw", "conv", (1, 32, 4, 4), 16, kernel=1, a_dtype="int8", weight_fill=SYM),
    Layer("mm_min", "matmul", (4, 64), 16, a_dtype="int8", requant=False, weight_fill="extreme"),
    Layer("conv_min", "conv", (1, 8, 5, 5), 8, kernel=3, a_dtype="int8", weight_fill="extreme"),
]

# The same layers fed all -128 (the largest products), built into the same module: one qemu run.
EXTREME = [replace(layer, name=f"{layer.name}_m") for layer in LAYERS]


def test_weight_range_pass_and_choice() -> None:
    from tvm import relax

    from edgecc.lower.schedules import int8_intrinsics as intrin

    mod = relax.transform.LegalizeOps()(layer_module(LAYERS))
    mod = neon.weight_range_pass()(mod)
    lows = sorted(
        int(f.attrs[neon.WEIGHT_MIN_ATTR])
        for _, f in mod.functions_items()
        if f.attrs is not None and neon.WEIGHT_MIN_ATTR in f.attrs
    )
    assert lows == sorted(int(layer.weight().min()) for layer in LAYERS)
    smull = next(i for i in intrin.INTRINSICS if i.name == "edgecc_smull_4x4_s8")
    for _, func in mod.functions_items():
        if func.attrs is None or neon.WEIGHT_MIN_ATTR not in func.attrs:
            continue
        low = int(func.attrs[neon.WEIGHT_MIN_ATTR])
        assert neon.refine(smull, func) is (neon.SMLAL if low >= -127 else neon.SADALP)
    assert neon.refine(smull, None) is neon.SADALP  # unknown weights: the exact-for-all form
    sdot = next(i for i in intrin.INTRINSICS if i.name == "edgecc_sdot_4x4_s8")
    assert neon.refine(sdot, None) is sdot


def test_packed_group_is_a_permutation() -> None:
    """Each (f, c) of a 4 x 4 group lands on its own byte, pairs of c adjacent per f."""
    seen = {tuple(neon.packed_group(f, c, 8)) for f in range(8) for c in range(8)}
    assert len(seen) == 64
    assert neon.packed_group(5, 6, 8) == [1, 1, 1, 1, 0]


@pytest.fixture(scope="module")
def rpi4_build(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("neon")
    return build_module(layer_module(LAYERS + EXTREME), get_target("rpi4"), tmp / "n.so")


def test_rpi4_emits_smlal_sadalp(rpi4_build: tuple) -> None:
    _, summary, asm = rpi4_build
    # The EXTREME copies share their kernels with LAYERS (identical PrimFuncs are deduplicated).
    assert summary["counts"].get("int8-matmul") == 2
    assert summary["counts"].get("int8-conv2d") == 3
    for name in ("smull", "smlal", "sadalp"):
        assert re.search(rf"\b{name}\b", asm), name
    assert not re.search(r"\baddp\b", asm)


@pytest.mark.slow  # a qemu-aarch64 TVM runtime start: ~15 s idle, minutes under load
def test_rpi4_int8_neon_exact_under_qemu(rpi4_build: tuple) -> None:
    rng = np.random.default_rng(3)
    inputs = {}
    for layer in LAYERS + EXTREME:
        extreme = layer in EXTREME
        x = layer.random_input(rng)
        inputs[f"{layer.name}_x"] = np.full_like(x, -128) if extreme else x
    names = [layer.name for layer in LAYERS + EXTREME]
    got = run_library(Path(rpi4_build[0]), get_target("rpi4"), inputs, names)
    for layer, out in zip(LAYERS + EXTREME, got.values(), strict=True):
        want = reference(layer, inputs[f"{layer.name}_x"])
        assert out.dtype == want.dtype and np.array_equal(out, want), layer.name
