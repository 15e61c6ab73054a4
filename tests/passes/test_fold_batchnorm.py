"""fold-bn: exact folding into Conv/ConvTranspose/Gemm/MatMul, Mul+Add fallback, declines.

Tolerance: the folded graph must match the unfolded one (ONNX Runtime, optimisations off) to
1e-5 relative: max |out - ref| <= 1e-5 * max |ref|, i.e. ``compare_outputs``'s max_rel_diff.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgecc.passes.fold_batchnorm import FoldBatchNorm
from edgecc.passes.manager import PassContext, PassManager, parse_pipeline
from edgecc.report.compare import compare_outputs, run_onnx

RTOL = 1e-5


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _bn(x: str, y: str, channels: int, rng: np.random.Generator, name: str = "bn",
        **attrs: object) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A BatchNormalization with random (far from identity) statistics."""
    params = [_init(f"{name}.gamma", rng.uniform(0.5, 1.5, channels)),
              _init(f"{name}.beta", rng.uniform(-0.5, 0.5, channels)),
              _init(f"{name}.mean", rng.uniform(-1, 1, channels)),
              _init(f"{name}.var", rng.uniform(0.5, 2.0, channels))]
    node = helper.make_node("BatchNormalization", [x] + [p.name for p in params], [y],
                            name=name, epsilon=1e-3, **attrs)
    return node, params


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x_shape: list[int],
           outputs: tuple[str, ...] = ("y",), inputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
        + [helper.make_tensor_value_info(i, TensorProto.FLOAT, [4, 3, 1, 1]) for i in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = onnx.shape_inference.infer_shapes(model)  # fills the outputs' shapes
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    return model


def _fold(model: onnx.ModelProto, **options: object):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return FoldBatchNorm(**options)(copy, PassContext())


def _assert_exact(model: onnx.ModelProto, folded: onnx.ModelProto,
                  feeds: dict[str, np.ndarray]) -> float:
    onnx.checker.check_model(folded, full_check=True)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    diff = compare_outputs(run_onnx(folded, feeds), run_onnx(model, feeds))
    assert diff["max_rel_diff"] <= RTOL, diff
    return diff["max_rel_diff"]


def _x(shape: list[int], seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("c_out", "groups"), [(8, 1), (8, 2), (8, 4), (4, 4)],
                         ids=["dense", "groups2", "depthwise-x2", "depthwise"])
def test_conv(bias: bool, c_out: int, groups: int) -> None:
    rng = np.random.default_rng(0)
    inits = [_init("w", rng.standard_normal((c_out, 4 // groups, 3, 3)))]
    if bias:
        inits.append(_init("b", rng.standard_normal(c_out)))
    conv = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["c"], name="conv",
                            group=groups, pads=[1, 1, 1, 1])
    bn, params = _bn("c", "y", c_out, rng)
    model = _model([conv, bn], inits + params, [2, 4, 5, 5])
    result = _fold(model)
    assert result.modified
    assert result.info["folded"] == [{"bn": "bn", "into": "conv", "op": "Conv"}]
    _assert_exact(model, result.model, _x([2, 4, 5, 5]))
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    if bias:  # folded in place: the weight and bias keep their names, the BN params go
        assert {t.name for t in result.model.graph.initializer} == {"w", "b"}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose(bias: bool, groups: int) -> None:
    rng = np.random.default_rng(1)
    c_in, c_out = 4, 6
    inits = [_init("w", rng.standard_normal((c_in, c_out // groups, 3, 3)))]
    if bias:
        inits.append(_init("b", rng.standard_normal(c_out)))
    conv = helper.make_node("ConvTranspose", ["x", "w"] + (["b"] if bias else []), ["c"],
                            name="deconv", group=groups, strides=[2, 2])
    bn, params = _bn("c", "y", c_out, rng)
    model = _model([conv, bn], inits + params, [1, c_in, 4, 4])
    result = _fold(model)
    assert result.modified and result.info["folded"][0]["op"] == "ConvTranspose"
    _assert_exact(model, result.model, _x([1, c_in, 4, 4]))


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [None, "vector", "matrix"])
def test_gemm(trans_b: int, bias: str | None) -> None:
    rng = np.random.default_rng(2)
    k, n = 5, 3
    w = rng.standard_normal((n, k) if trans_b else (k, n))
    inits = [_init("w", w)]
    if bias:
        inits.append(_init("b", rng.standard_normal(n if bias == "vector" else (4, n))))
    gemm = helper.make_node("Gemm", ["x", "w"] + (["b"] if bias else []), ["g"], name="fc",
                            transB=trans_b, alpha=0.7, beta=1.3)
    bn, params = _bn("g", "y", n, rng)
    model = _model([gemm, bn], inits + params, [4, k])
    result = _fold(model)
    assert result.modified and result.info["folded"][0]["op"] == "Gemm"
    _assert_exact(model, result.model, _x([4, k]))


@pytest.mark.parametrize("add", [None, "bias+mm", "mm+bias"])
def test_matmul(add: str | None) -> None:
    rng = np.random.default_rng(3)
    inits = [_init("w", rng.standard_normal((5, 3)))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm")]
    if add:
        inits.append(_init("b", rng.standard_normal(3)))
        nodes.append(helper.make_node("Add", ["m", "b"] if add == "mm+bias" else ["b", "m"],
                                      ["a"], name="add"))
    bn, params = _bn("a" if add else "m", "y", 3, rng)
    model = _model(nodes + [bn], inits + params, [4, 5])
    result = _fold(model)
    assert result.modified and result.info["folded"][0]["op"] == "MatMul"
    _assert_exact(model, result.model, _x([4, 5]))
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]


def test_matmul_3d_output_is_not_folded_but_converted() -> None:
    """On (B, L, C) BatchNorm normalises L, not the MatMul's output channel C."""
    rng = np.random.default_rng(4)
    mm = helper.make_node("MatMul", ["x", "w"], ["m"], name="mm")
    bn, params = _bn("m", "y", 6, rng)
    model = _model([mm, bn], [_init("w", rng.standard_normal((5, 3)))] + params, [2, 6, 5])
    result = _fold(model)
    assert result.info["converted"] == ["bn"] and not result.info["folded"]
    _assert_exact(model, result.model, _x([2, 6, 5]))


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_standalone_becomes_mul_add(rank: int) -> None:
    rng = np.random.default_rng(5)
    relu = helper.make_node("Relu", ["x"], ["r"])
    bn, params = _bn("r", "y", 3, rng)
    shape = [2, 3, 4, 5][:rank]
    model = _model([relu, bn], params, shape)
    result = _fold(model)
    assert result.modified and result.info["converted"] == ["bn"]
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Mul", "Add"]
    scale = next(t for t in result.model.graph.initializer if t.name.endswith("_scale"))
    assert list(scale.dims) == [3] + [1] * (rank - 2)
    _assert_exact(model, result.model, _x(shape))


def test_standalone_disabled_leaves_graph() -> None:
    bn, params = _bn("x", "y", 3, np.random.default_rng(6))
    model = _model([bn], params, [1, 3, 2, 2])
    result = _fold(model, standalone=False)
    assert not result.modified
    assert result.model.SerializeToString() == model.SerializeToString()


def _conv_bn(rng: np.random.Generator, extra: list[onnx.NodeProto] = (),
             outputs: tuple[str, ...] = ("y",), weight_input: bool = False) -> onnx.ModelProto:
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    bn, params = _bn("c", "y", 4, rng)
    inits = [] if weight_input else [_init("w", rng.standard_normal((4, 3, 1, 1)))]
    return _model([conv, bn, *extra], inits + params, [1, 3, 2, 2], outputs,
                  inputs=("w",) if weight_input else ())


@pytest.mark.parametrize(("case", "reason"), [
    ("shared-weight", "shared with conv2"),
    ("graph-output", "is a graph output"),
    ("other-reader", "also read by relu"),
    ("weight-not-constant", "not constant"),
    ("training-mode", "training-mode"),
])
def test_declines(case: str, reason: str) -> None:
    rng = np.random.default_rng(7)
    if case == "shared-weight":
        model = _conv_bn(rng, [helper.make_node("Conv", ["x", "w"], ["z"], name="conv2")],
                         outputs=("y", "z"))
    elif case == "graph-output":
        model = _conv_bn(rng, outputs=("y", "c"))
    elif case == "other-reader":
        model = _conv_bn(rng, [helper.make_node("Relu", ["c"], ["z"], name="relu")],
                         outputs=("y", "z"))
    elif case == "weight-not-constant":
        model = _conv_bn(rng, weight_input=True)
    else:
        model = _conv_bn(rng)
        model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    result = _fold(model)
    assert not result.modified
    assert result.info["declined"] and reason in result.info["declined"][0]["reason"]
    assert result.model.SerializeToString() == model.SerializeToString()


def test_nothing_to_match() -> None:
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    model = _model([conv], [_init("w", np.ones((2, 3, 1, 1)))], [1, 3, 2, 2])
    result = _fold(model)
    assert not result.modified
    assert result.info == {"folded": [], "converted": [], "declined": []}
    assert result.model.SerializeToString() == model.SerializeToString()


class _TorchNet(torch.nn.Module):
    """Conv (no bias, groups) + BN + ReLU6, depthwise + BN, Linear + BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 1, groups=2, bias=False), nn.BatchNorm2d(12))
        self.fc = nn.Linear(12 * 4 * 4, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(torch.flatten(torch.relu(self.features(x)), 1)))


def test_torch_export_folds_everything() -> None:
    """torch's exporter (optimize=False) writes bias-free convs' zero bias as Shape->Expand."""
    torch.manual_seed(0)
    net = _TorchNet().eval()
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model = torch.onnx.export(net, (torch.randn(2, 3, 4, 4),), dynamo=True, optimize=False,
                              verbose=False).model_proto
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 4
    result = _fold(model)
    assert result.modified and len(result.info["folded"]) == 4 and not result.info["declined"]
    assert not [n for n in result.model.graph.node if n.op_type in ("Shape", "Expand")]
    rel = _assert_exact(model, result.model, _x([2, 3, 4, 4]))
    with torch.no_grad():
        expected = net(torch.from_numpy(_x([2, 3, 4, 4])["x"])).numpy()
    (got,) = run_onnx(result.model, _x([2, 3, 4, 4])).values()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert rel <= RTOL


def test_registered_in_pipeline() -> None:
    rng = np.random.default_rng(8)
    model = _conv_bn(rng)
    out = PassManager(parse_pipeline("fold-bn")).run(model)
    assert [n.op_type for n in out.graph.node] == ["Conv"]
