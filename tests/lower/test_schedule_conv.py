"""The conv2d, depthwise and pooling schedule rules: outputs match ONNX Runtime and every conv and
pooling kernel is scheduled by its rule (manifest coverage).

Tolerance: float32 against ONNX Runtime (optimisations off); the rules reorder the reduction
(channels, then window) so sums differ by rounding only: atol 1e-4 on outputs of magnitude ~10.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from lower_models import feeds_for, make_model, shapes_of
from onnx import TensorProto, helper, numpy_helper

from edgecc.lower import lower
from edgecc.lower.schedules import CpuParams
from edgecc.lower.schedules.conv2d import channel_tile, pixel_tile, register_tile
from edgecc.report.compare import run_onnx
from edgecc.runtime import run_library
from edgecc.targets import get_target

ATOL = 1e-4
HAS_CROSS = shutil.which("aarch64-linux-gnu-gcc") is not None


def conv_model(
    cin: int = 8,
    cout: int = 16,
    k: int = 3,
    stride: int = 1,
    dilation: int = 1,
    pads: tuple[int, int, int, int] | None = None,
    groups: int = 1,
    batch: int = 1,
    size: int = 9,
    epilogue: tuple[str, ...] = ("bias",),
) -> onnx.ModelProto:
    """x[batch, cin, size, size] -> Conv -> epilogue ops -> y."""
    rng = np.random.default_rng(cin * 31 + cout * 7 + k)
    pads = pads if pads is not None else (k // 2 * dilation,) * 4
    inits = [
        numpy_helper.from_array(
            rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32), "w"
        )
    ]
    conv_in = ["x", "w"]
    if "bias" in epilogue:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
        conv_in.append("b")
    nodes = [
        helper.make_node(
            "Conv",
            conv_in,
            ["c"],
            name="conv",
            kernel_shape=[k, k],
            strides=[stride, stride],
            dilations=[dilation, dilation],
            pads=list(pads),
            group=groups,
        )
    ]
    oh, ow = ((size + pads[i] + pads[i + 2] - dilation * (k - 1) - 1) // stride + 1 for i in (0, 1))
    last = "c"
    for i, op in enumerate(e for e in epilogue if e != "bias"):
        name = f"e{i}"
        if op == "relu":
            nodes.append(helper.make_node("Relu", [last], [name]))
        elif op == "relu6":
            inits += [
                numpy_helper.from_array(np.array(0, np.float32), "lo"),
                numpy_helper.from_array(np.array(6, np.float32), "hi"),
            ]
            nodes.append(helper.make_node("Clip", [last, "lo", "hi"], [name]))
        elif op == "sigmoid":
            nodes.append(helper.make_node("Sigmoid", [last], [name]))
        elif op == "silu":
            nodes += [
                helper.make_node("Sigmoid", [last], [f"{name}s"]),
                helper.make_node("Mul", [last, f"{name}s"], [name]),
            ]
        elif op == "residual":
            inits.append(
                numpy_helper.from_array(
                    rng.standard_normal((batch, cout, oh, ow)).astype(np.float32), "skip"
                )
            )
            nodes.append(helper.make_node("Add", [last, "skip"], [name]))
        last = name
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, cout, oh, ow])
    return make_model(nodes, [x], [y], inits)


def pool_model(op: str, channels: int = 17, size: int = 9, **attrs) -> onnx.ModelProto:
    """x -> Conv 1x1 (so the pool runs channels-last) -> MaxPool/AveragePool/GAP -> y."""
    rng = np.random.default_rng(channels)
    w = numpy_helper.from_array(rng.standard_normal((channels, 3, 1, 1)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1]),
        helper.make_node(op, ["c"], ["p"], name="pool", **attrs),
        helper.make_node("Relu", ["p"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], [w])
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def run_here(library, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run an x86 library in this process (a runner subprocess would re-import TVM per test)."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(a) for a in feeds.values()))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def compile_and_check(model: onnx.ModelProto, tmp_path, target: str = "x86") -> dict:
    """Build for ``target``, run (x86), compare with ORT; return the schedule coverage."""
    shapes, dtypes = shapes_of(model)
    lib = lower(model, get_target(target), shapes, dtypes, tmp_path / "m.so")
    if target == "x86":
        feeds = feeds_for(model)
        got = run_here(lib.path, feeds)
        ref = run_onnx(model, feeds)["y"]
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
    return lib.details["schedules"]["kernels"]


def rule_of(kernels: dict, word: str) -> list:
    found = [rule for name, rule in kernels.items() if word in name]
    assert found, f"no kernel with {word!r} in {sorted(kernels)}"
    return found


CONV_CASES = {
    "1x1": dict(k=1),
    "3x3": dict(),
    "5x5-stride2": dict(k=5, stride=2, cin=3, cout=17),
    "7x7-stride2-stem": dict(k=7, stride=2, cin=3, cout=16, size=16),
    "dilation2": dict(dilation=2, cin=4, cout=8),
    "asymmetric-pads": dict(pads=(0, 1, 2, 0), cin=1, cout=3),
    "groups2": dict(groups=2, cin=8, cout=16),
    "batch3-no-bias": dict(batch=3, epilogue=()),
    "cout-not-lanes": dict(cin=17, cout=40, epilogue=("bias", "relu")),
    "relu6": dict(epilogue=("bias", "relu6")),
    "residual-relu": dict(epilogue=("bias", "residual", "relu")),
    "sigmoid": dict(epilogue=("bias", "sigmoid")),
    "silu": dict(cout=24, epilogue=("bias", "silu")),
    "wide-1x1": dict(k=1, cin=64, cout=96, size=14, epilogue=("bias", "relu")),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d(tmp_path, case):
    kernels = compile_and_check(conv_model(**CONV_CASES[case]), tmp_path)
    assert rule_of(kernels, "conv2d") == ["conv2d"]


DEPTHWISE_CASES = {
    "3x3": dict(cin=16, cout=16, groups=16, epilogue=("bias", "relu6")),
    "5x5-stride2-17ch": dict(cin=17, cout=17, groups=17, k=5, stride=2, epilogue=("bias",)),
    "3ch-dilation2-silu": dict(cin=3, cout=3, groups=3, dilation=2, epilogue=("bias", "silu")),
    "multiplier2-residual": dict(cin=8, cout=16, groups=8, batch=2, epilogue=("bias", "residual")),
}


@pytest.mark.parametrize("case", list(DEPTHWISE_CASES))
def test_depthwise(tmp_path, case):
    kernels = compile_and_check(conv_model(**DEPTHWISE_CASES[case]), tmp_path)
    assert rule_of(kernels, "conv2d") == ["depthwise-conv2d"]


POOL_CASES = {
    "max3x3-s2-pad": ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "max2x2-ceil": ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    "avg3x3-pad-exclude": ("AveragePool", dict(kernel_shape=[3, 3], pads=[1, 0, 1, 2])),
    "avg3x3-s2-include-pad": (
        "AveragePool",
        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
    ),
    "global-average": ("GlobalAveragePool", {}),
}


@pytest.mark.parametrize("case", list(POOL_CASES))
def test_pooling(tmp_path, case):
    op, attrs = POOL_CASES[case]
    kernels = compile_and_check(pool_model(op, **attrs), tmp_path)
    pooled = [rule for name, rule in kernels.items() if "pool" in name or "mean" in name]
    assert pooled == ["pooling"], kernels


def test_global_average_pool_of_8_channels(tmp_path):
    """Channels a multiple of the vector width (no tail) and a 1x1 conv before it."""
    kernels = compile_and_check(pool_model("GlobalAveragePool", channels=16, size=7), tmp_path)
    assert rule_of(kernels, "mean") == ["pooling"]
    assert rule_of(kernels, "conv2d") == ["conv2d"]


def test_tiles_follow_the_vector_width() -> None:
    assert channel_tile(64, 8, 3) == 16 and channel_tile(96, 8, 3) == 24
    assert channel_tile(64, 16, 3) == 64 // 2 and channel_tile(17, 8, 3) == 17
    assert channel_tile(40, 16, 3) == 40 and channel_tile(100, 8, 3) == 10
    assert channel_tile(3, 4, 3) == 3
    assert pixel_tile(56, 6) == 4 and pixel_tile(7, 12) == 7 and pixel_tile(13, 6) == 6
    assert CpuParams.of(get_target("rpi4")).lanes == 4
    # (pixels, channels): 7 wide rows take 4 + a partial 3 on AVX2, all 7 with AVX-512
    assert register_tile(7, 512, 8, 12, 3) == (4, 16)
    assert register_tile(7, 512, 16, 24, 3) == (7, 32)
    assert register_tile(56, 64, 8, 12, 3) == (4, 16)


def mobile_chain() -> onnx.ModelProto:
    """x[1,3,16,16] -> Conv 3x3/2 + Relu -> depthwise 3x3 + Clip(0, 6) -> Conv 1x1 + residual
    -> MaxPool 3x3/2 -> GlobalAveragePool -> y[1,8,1,1]."""
    rng = np.random.default_rng(1)

    def const(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [
        const("w1", 8, 3, 3, 3),
        const("b1", 8),
        const("w2", 8, 1, 3, 3),
        const("b2", 8),
        const("w3", 8, 8, 1, 1),
        const("b3", 8),
        numpy_helper.from_array(np.array(0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], strides=[2, 2], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], group=8, pads=[1] * 4),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"]),
        helper.make_node("Add", ["c3", "r1"], ["s"]),
        helper.make_node(
            "MaxPool", ["s"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4
        ),
        helper.make_node("GlobalAveragePool", ["p"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 1, 1])
    return make_model(nodes, [x], [y], inits)


RPI4_RULES = ["conv2d", "conv2d", "depthwise-conv2d", "pooling", "pooling"]


def conv_and_pool_rules(kernels: dict[str, str | None]) -> list[str]:
    """The rules of the kernels that are not layout transposes (those are elementwise)."""
    return sorted(r for k, r in kernels.items() if r and "transpose" not in k)


def test_conv_chain_x86(tmp_path):
    """Layout changes only at the chain's edges; every conv and pooling kernel scheduled."""
    kernels = compile_and_check(mobile_chain(), tmp_path)
    assert conv_and_pool_rules(kernels) == RPI4_RULES, kernels
    transposes = [name for name in kernels if "transpose" in name]
    assert len(transposes) <= 2, kernels  # NCHW -> NHWC at the input, back at the output
    assert all(kernels[name] == "elementwise" for name in transposes), kernels


@pytest.mark.skipif(not HAS_CROSS, reason="aarch64-linux-gnu-gcc not installed")
def test_rules_build_for_rpi4(tmp_path):
    """4 NEON lanes: every conv and pooling kernel is scheduled and the library links."""
    kernels = compile_and_check(mobile_chain(), tmp_path, target="rpi4")
    assert conv_and_pool_rules(kernels) == RPI4_RULES, kernels


@pytest.mark.skipif(not HAS_CROSS, reason="aarch64-linux-gnu-gcc not installed")
@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="qemu-user not installed")
@pytest.mark.emulation
def test_rpi4_schedules_run_under_emulation(tmp_path):
    model = mobile_chain()
    shapes, dtypes = shapes_of(model)
    lib = lower(model, get_target("rpi4"), shapes, dtypes, tmp_path / "m.so")
    feeds = feeds_for(model)
    got = run_library(lib.path, get_target("rpi4"), feeds, ["y"])["y"]
    np.testing.assert_allclose(got, run_onnx(model, feeds)["y"], rtol=0, atol=ATOL)
