"""The CPU matmul schedule rule: every kernel it schedules matches ONNX Runtime.

Each case is a small ONNX graph compiled through :func:`edgecc.lower.lower` for ``x86``; the
manifest's schedule coverage must name the matmul rule for the matmul kernel, and the library's
outputs must match ONNX Runtime (graph optimisations off). Tolerance: the scheduled kernels sum
over K in the same order as the reference loop nest, so float32 results agree to ~1e-6 relative;
the tests allow rtol 1e-5, atol 1e-5 (GELU: atol 1e-5 too).
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import onnx
import pytest
from lower_models import make_model, shapes_of
from onnx import TensorProto, helper, numpy_helper

from edgecc.lower import lower
from edgecc.lower.schedules import CpuParams
from edgecc.lower.schedules.matmul import choose_tiling, vector_registers
from edgecc.report.compare import run_onnx
from edgecc.runtime import run_library
from edgecc.targets import get_target

RTOL = ATOL = 1e-5


def _value(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


class _Graph:
    """Collects several independent cases into one ONNX graph (one compile, one run)."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.seed = 0

    def const(self, name: str, shape: list[int] | None = None, value: float | None = None) -> str:
        self.seed += 1
        rng = np.random.default_rng(self.seed)
        array = (
            np.array(value, np.float32)
            if value is not None
            else rng.standard_normal(shape).astype(np.float32)
        )
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def input(self, name: str, shape: list[int]) -> str:
        self.inputs.append(_value(name, shape))
        return name

    def node(self, op: str, ins: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def output(self, name: str, shape: list[int]) -> None:
        self.outputs.append(_value(name, shape))

    def matmul(
        self, tag: str, m: int, k: int, n: int, epilogue: str = "none", batch: tuple[int, ...] = ()
    ) -> None:
        """``y = epilogue(a @ W)``, a ``[*batch, m, k]`` input, W ``[k, n]`` a constant."""
        y_shape = [*batch, m, n]
        mm = self.node(
            "MatMul",
            [self.input(f"{tag}_a", [*batch, m, k]), self.const(f"{tag}_w", [k, n])],
            f"{tag}_mm",
        )
        bias = f"{tag}_bias"
        if epilogue == "bias":
            mm = self.node("Add", [mm, self.const(bias, [n])], f"{tag}_add")
        elif epilogue == "relu":
            mm = self.node(
                "Relu", [self.node("Add", [mm, self.const(bias, [n])], f"{tag}_add")], f"{tag}_relu"
            )
        elif epilogue == "clip":
            mm = self.node(
                "Clip",
                [mm, self.const(f"{tag}_lo", value=-0.5), self.const(f"{tag}_hi", value=0.7)],
                f"{tag}_clip",
            )
        elif epilogue == "gelu":  # x * 0.5 * (1 + erf(x / sqrt 2)), as torch exports it
            g0 = self.node("Div", [mm, self.const(f"{tag}_s2", value=math.sqrt(2.0))], f"{tag}_g0")
            g1 = self.node("Erf", [g0], f"{tag}_g1")
            g2 = self.node("Add", [g1, self.const(f"{tag}_one", value=1.0)], f"{tag}_g2")
            g3 = self.node("Mul", [mm, g2], f"{tag}_g3")
            mm = self.node("Mul", [g3, self.const(f"{tag}_half", value=0.5)], f"{tag}_g4")
        elif epilogue == "residual":
            mm = self.node("Add", [mm, self.input(f"{tag}_res", y_shape)], f"{tag}_res_add")
        else:
            assert epilogue == "none", epilogue
        self.output(mm, y_shape)

    def model(self) -> onnx.ModelProto:
        return make_model(self.nodes, self.inputs, self.outputs, self.inits)


# (tag, M, K, N): sizes off the vector width and tile, K = 1, M = 1, N = 1
DENSE_SHAPES = [
    ("m1", 1, 64, 40),
    ("m3k17n1000", 3, 17, 1000),
    ("k1", 17, 1, 24),
    ("m1000n17", 1000, 3, 17),
    ("tiny", 2, 5, 3),
    ("n1", 9, 12, 1),
    ("aligned", 128, 96, 48),
]
EPILOGUES = ["none", "relu", "gelu", "clip", "residual"]


def _zoo() -> onnx.ModelProto:
    g = _Graph()
    for tag, m, k, n in DENSE_SHAPES:
        g.matmul(tag, m, k, n, "bias")
    for epi in EPILOGUES:
        g.matmul(f"epi_{epi}", 20, 32, 24, epi, batch=(1,))
    g.matmul("bcast", 7, 6, 16, "bias", batch=(2, 3))  # batch axes broadcast against W [K, N]
    # batch matmul of two inputs
    g.output(
        g.node("MatMul", [g.input("bm_a", [2, 3, 17, 8]), g.input("bm_b", [2, 3, 8, 5])], "bm_y"),
        [2, 3, 17, 5],
    )
    # attention without softmax: (Q K^T) * scale + mask, then P V; transposed K as a prologue
    shape = [1, 4, 9, 8]
    kt = g.node("Transpose", [g.input("att_k", shape)], "att_kt", perm=[0, 1, 3, 2])
    s = g.node("MatMul", [g.input("att_q", shape), kt], "att_s")
    s = g.node("Mul", [s, g.const("att_scale", value=0.35)], "att_s2")
    p = g.node("Add", [s, g.input("att_mask", [1, 1, 9, 9])], "att_p")
    g.output(g.node("MatMul", [p, g.input("att_v", shape)], "att_y"), shape)
    # Gemm(transB=1) with bias, then a Gemm down to N = 1
    h = g.node(
        "Gemm",
        [g.input("gemm_x", [6, 20]), g.const("gemm_w1", [33, 20]), g.const("gemm_b1", [33])],
        "gemm_h",
        transB=1,
    )
    h = g.node("Relu", [h], "gemm_hr")
    g.output(g.node("Gemm", [h, g.const("gemm_w2", [1, 33])], "gemm_y", transB=1), [6, 1])
    return g.model()


@pytest.fixture(scope="module")
def zoo_library(tmp_path_factory):
    model = _zoo()
    shapes, dtypes = shapes_of(model)
    out = tmp_path_factory.mktemp("zoo") / "m.so"
    return model, lower(model, get_target("x86"), shapes, dtypes, out)


def test_every_matmul_kernel_is_scheduled(zoo_library) -> None:
    _, lib = zoo_library
    kernels = lib.details["schedules"]["kernels"]
    matmuls = {name: rule for name, rule in kernels.items() if "matmul" in name}
    assert len(matmuls) >= len(DENSE_SHAPES) + len(EPILOGUES), kernels
    assert all(rule == "matmul" for rule in matmuls.values()), kernels
    for op in ("relu", "erf", "minimum"):  # ReLU, GELU and Clip fused into their matmul kernels
        assert any("matmul" in name and op in name for name in kernels), (op, kernels)


def test_outputs_match_onnxruntime(zoo_library) -> None:
    model, lib = zoo_library
    shapes, _ = shapes_of(model)
    rng = np.random.default_rng(3)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    names = [o.name for o in model.graph.output]
    got = run_library(lib.path, get_target("x86"), feeds, names)
    ref = run_onnx(model, feeds)
    for name in names:
        np.testing.assert_allclose(got[name], ref[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-gcc"), reason="no aarch64 cross gcc")
def test_aarch64_library_builds_with_the_rule(tmp_path) -> None:
    g = _Graph()
    g.matmul("a", 16, 32, 40, "relu", batch=(1,))
    g.matmul("b", 1, 32, 12, "bias")
    model = g.model()
    shapes, dtypes = shapes_of(model)
    lib = lower(model, get_target("rpi4"), shapes, dtypes, tmp_path / "m.so")
    assert set(lib.details["schedules"]["kernels"].values()) == {"matmul"}


def test_tiling_fits_the_register_file() -> None:
    for target, lanes in (("x86-avx2", 8), ("x86-avx512", 16), ("rpi4", 4)):
        params = CpuParams.of(get_target(target))
        for m, n in ((128, 384), (128, 1536), (1, 384), (17, 17), (128, 32), (3, 1000)):
            t = choose_tiling(m, n, params)
            assert m % t.mr == 0 and n % (t.nr * t.v) == 0 and t.v <= lanes
            assert t.mr * t.nr + t.nr + 1 <= vector_registers(params)
    assert choose_tiling(128, 384, CpuParams.of(get_target("x86-avx2"))).v == 8
