"""qlinear-to-qdq: each fused integer operator against ONNX Runtime running the original node.

Tolerances: ConvInteger / MatMulInteger exact (their QDQ form uses scale 1, exact integer
floats); QLinearConv / QLinearMatMul within one output quantization step and at least 95% of the
values equal (ORT computes them with an int32 accumulator and one float multiplier, the QDQ
form in float: the two round differently only at rounding boundaries). The lowered (TVM)
results are checked the same way against ORT on the original graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecc.passes.manager import PassContext
from edgecc.passes.qlinear_to_qdq import QLinearToQDQ
from tests.lower.int8_graphs import ort_run, tvm_build


def _c(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def integer_ops_model(opset: int = 19) -> onnx.ModelProto:
    """x (uint8 [1,4,8,8]) and v (int8 [3,12]) through the four operators, one output each."""
    rng = np.random.default_rng(0)
    inits = [
        _c("sx", np.float32(0.02)),
        _c("zx", np.uint8(120)),
        # 7-bit weights: ORT's u8 x s8 x86 kernel sums pairs of products in int16 with
        # saturation (vpmaddubsw), which full-range weights overflow (its reduce_range advice).
        _c("w", rng.integers(-63, 64, (6, 4, 3, 3)).astype(np.int8)),
        _c("sw", rng.uniform(0.005, 0.02, 6).astype(np.float32)),
        _c("zw", np.zeros(6, np.int8)),
        _c("sy", np.float32(0.05)),
        _c("zy", np.uint8(128)),
        _c("bias", rng.integers(-500, 500, 6).astype(np.int32)),
        _c("sv", np.float32(0.03)),
        _c("zv", np.int8(-4)),
        _c("m", rng.integers(-127, 128, (12, 5)).astype(np.int8)),
        _c("sm", rng.uniform(0.005, 0.02, 5).astype(np.float32)),
        _c("zm", np.zeros(5, np.int8)),
        _c("sz", np.float32(0.04)),
        _c("zz", np.int8(2)),
        _c("wi", rng.integers(-125, 125, (6, 2, 3, 3)).astype(np.int8)),  # w - 3 fits int8
        _c("zwi", np.int8(3)),
        _c("mi", rng.integers(0, 256, (12, 5)).astype(np.uint8)),
        _c("zmi", np.uint8(128)),
    ]
    nodes = [
        helper.make_node(
            "QLinearConv",
            ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "bias"],
            ["conv"],
            name="qconv",
            pads=[1, 1, 1, 1],
            strides=[2, 2],
        ),
        helper.make_node(
            "QLinearMatMul", ["v", "sv", "zv", "m", "sm", "zm", "sz", "zz"], ["mm"], name="qmm"
        ),
        helper.make_node("ConvInteger", ["x", "wi", "zx", "zwi"], ["convi"], name="convi", group=2),
        helper.make_node("MatMulInteger", ["v", "mi", "zv", "zmi"], ["mmi"], name="mmi"),
    ]
    graph = helper.make_graph(
        nodes,
        "integer_ops",
        [
            helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4, 8, 8]),
            helper.make_tensor_value_info("v", TensorProto.INT8, [3, 12]),
        ],
        [
            helper.make_tensor_value_info("conv", TensorProto.UINT8, [1, 6, 4, 4]),
            helper.make_tensor_value_info("mm", TensorProto.INT8, [3, 5]),
            helper.make_tensor_value_info("convi", TensorProto.INT32, [1, 6, 6, 6]),
            helper.make_tensor_value_info("mmi", TensorProto.INT32, [3, 5]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x": rng.integers(0, 256, (1, 4, 8, 8)).astype(np.uint8),
        "v": rng.integers(-128, 128, (3, 12)).astype(np.int8),
    }


def assert_close(got: list[np.ndarray], ref: list[np.ndarray]) -> None:
    for g, r, exact in zip(got, ref, (False, False, True, True), strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        diff = np.abs(g.astype(np.int64) - r.astype(np.int64))
        if exact:
            assert diff.max() == 0
        else:
            assert diff.max() <= 1 and (diff == 0).mean() >= 0.95, (diff.max(), (diff == 0).mean())


def test_rewrite_matches_the_original_operators():
    model = integer_ops_model()
    ref = ort_run(model, feeds())
    result = QLinearToQDQ()(onnx.ModelProto.FromString(model.SerializeToString()), PassContext())
    assert result.modified
    assert result.info["rewritten"] == {
        "QLinearConv": 1,
        "QLinearMatMul": 1,
        "ConvInteger": 1,
        "MatMulInteger": 1,
    }
    onnx.checker.check_model(result.model, full_check=True)
    ops = {n.op_type for n in result.model.graph.node}
    assert not ops & {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
    assert_close(ort_run(result.model, feeds()), ref)


def test_nothing_to_rewrite():
    model = integer_ops_model()
    del model.graph.node[:]
    result = QLinearToQDQ()(model, PassContext())
    assert not result.modified and result.reason


def test_per_channel_below_opset_13_is_declined():
    model = integer_ops_model(opset=12)
    del model.graph.node[1:]  # QLinearConv, per-channel weight scales
    del model.graph.output[1:]
    result = QLinearToQDQ()(model, PassContext())
    assert not result.modified
    assert "opset >= 13" in result.info["declined"][0]["reason"]


def test_lowered_integer_ops_match_onnx_runtime(tmp_path):
    """The pass output compiles (each op becomes an integer kernel) and matches ORT on the
    original graph; the integer inputs enter as float (edgecc packages take float inputs)
    through a Cast, which the graph here adds."""
    model = integer_ops_model()
    ref = ort_run(model, feeds())
    qdq = QLinearToQDQ()(model, PassContext()).model
    # edgecc's lowering takes float32 graph inputs: cast them back to the integer types.
    for inp, to in (("x", TensorProto.UINT8), ("v", TensorProto.INT8)):
        for node in qdq.graph.node:
            node.input[:] = [f"{inp}_int" if i == inp else i for i in node.input]
        qdq.graph.node.insert(0, helper.make_node("Cast", [inp], [f"{inp}_int"], to=to))
    for value in qdq.graph.input:
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    run, details = tvm_build(qdq, tmp_path)
    assert [op["integer"] for op in details["int8_ops"]] == [True] * 4, details["int8_ops"]
    got = run({k: v.astype(np.float32) for k, v in feeds().items()})
    assert_close(got, ref)


def test_quantize_static_qoperator_model_end_to_end(tmp_path):
    """A model from ONNX Runtime's quantize_static (QOperator format: QLinearConv) compiles
    with integer kernels and stays within one output step of ORT running it."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    rng = np.random.default_rng(2)
    inits = [
        _c("w1", rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3),
        _c("b1", rng.standard_normal(8).astype(np.float32) * 0.1),
        _c("w2", rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.2),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        inits,
    )
    float_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    float_path, q_path = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(float_model, str(float_path))
    samples = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(float_path), str(q_path), Reader(), quant_format=QuantFormat.QOperator)
    qmodel = onnx.load(str(q_path))
    assert "QLinearConv" in {n.op_type for n in qmodel.graph.node}
    qdq = QLinearToQDQ()(onnx.load(str(q_path)), PassContext()).model
    run, details = tvm_build(qdq, tmp_path)
    assert [op["integer"] for op in details["int8_ops"]] == [True, True]
    (last,) = [n for n in qmodel.graph.node if n.op_type == "DequantizeLinear"]  # the output's
    step = float(
        numpy_helper.to_array(next(t for t in qmodel.graph.initializer if t.name == last.input[1]))
    )
    x = {"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)}
    (ref,) = ort_run(qmodel, x)
    (got,) = run(x)
    assert np.abs(got - ref).max() <= step + 1e-6
