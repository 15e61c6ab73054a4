"""qdq: static int8 with calibration; accuracy bounds, sizes, ONNX Runtime fusion, edge cases."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgecc.errors import UserInputError
from edgecc.passes.calibration import load_calibration
from edgecc.passes.insert_qdq import NO_CALIBRATION, ORT_NOTE, InsertQDQ
from edgecc.passes.manager import PassContext, PassManager, clone, parse_pipeline
from edgecc.report.compare import cosine, run_onnx
from edgecc.targets import get_target

F = TensorProto.FLOAT


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _ctx(
    model: onnx.ModelProto, samples: int = 32, target: str | None = None, tmp_path=None
) -> PassContext:
    """A context with seeded N(0, 1) calibration data for ``model``'s inputs."""
    data, desc = load_calibration("random", model, batch_size=8, limit=samples, seed=1)
    return PassContext(
        calibration=data, calibration_source=desc, target=get_target(target) if target else None
    )


def _held_out(model: onnx.ModelProto, n: int = 16, seed: int = 7) -> dict[str, np.ndarray]:
    feeds = {}
    for vi in model.graph.input:
        dims = [d.dim_value or n for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = _rng(seed).normal(size=dims).astype(np.float32)
    return feeds


def _run(model, ctx=None, **options):
    ctx = ctx or _ctx(model)
    return InsertQDQ(**options)(clone(model), ctx)


def _cos(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> float:
    ra, rb = run_onnx(a, feeds), run_onnx(b, feeds)
    return min(cosine(ra[k], rb[k]) for k in ra)


def _ort_optimised(model: onnx.ModelProto, feeds, tmp_path) -> tuple[list[str], dict]:
    """Op types after ONNX Runtime's default optimisations (which fuse QDQ) and the outputs."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "ort_optimised.onnx")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    return ops, outs


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ------------------------------------------------------------------------------------------
# A small CNN exported by torch (conv, bias-free conv, depthwise, residual add, linear)


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.dw = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = torch.nn.Conv2d(32, 32, 1)
        self.c3 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.pw(torch.relu(self.dw(x))) + x)
        x = torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        SmallCNN().eval(),
        (torch.randn(2, 3, 16, 16),),
        dynamo=True,
        optimize=False,
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    return program.model_proto


@pytest.mark.parametrize("activation", ["uint8", "int8"])
@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_small_cnn_keeps_cosine_099_on_held_out_inputs(cnn, method, activation, tmp_path):
    """32 calibration samples; bound: cosine >= 0.99 vs fp32 on 16 held-out inputs, with ORT's
    reference runner (optimisations off) and with its default optimisations (QDQ fused)."""
    result = _run(cnn, _ctx(cnn, samples=32), method=method, activation=activation)
    assert result.modified
    onnx.checker.check_model(result.model, full_check=True)
    held = _held_out(cnn)
    assert _cos(result.model, cnn, held) >= 0.99
    ops, outs = _ort_optimised(result.model, held, tmp_path)
    ref = run_onnx(cnn, held)
    assert min(cosine(outs[k], ref[k]) for k in ref) >= 0.99
    assert "QGemm" in ops and "QLinearConv" in ops
    if activation == "uint8":  # ReLU outputs get zp = 0: ORT drops the ReLU, fuses the add too
        assert "QLinearAdd" in ops
    info = result.info
    assert info["calibration"]["samples"] == 32 and info["calibration"]["batches"] == 4
    assert info["method"] == method and info["activation"].startswith(activation)
    inits = _inits(result.model)
    assert all(
        inits[f"{t}_scale"].shape == inits[f"{t}_zero_point"].shape == ()
        for t in info["activations"]
    )  # per tensor: scalars, as QLinearAdd requires
    # every float weight went, the torch zero bias of the bias-free conv included
    floats = [k for k, v in inits.items() if v.dtype == np.float32 and v.ndim > 1]
    assert floats == [] and info["float_weights_kept"] == []


def test_reduce_range_gives_7_bit_weights_and_keeps_cosine(cnn):
    """``reduce_range=true``: every int8 weight in [-63, 63] (so each channel reaches +-63) and
    the small CNN still within cosine 0.99 of fp32 on held-out inputs (ORT reference runner)."""
    result = _run(cnn, _ctx(cnn, samples=32), reduce_range=True)
    assert result.info["weights"].endswith("(reduce_range)")
    weights = [v for k, v in _inits(result.model).items() if v.dtype == np.int8 and v.ndim > 1]
    assert weights and all(np.abs(w).max() == 63 for w in weights)
    assert _cos(result.model, cnn, _held_out(cnn)) >= 0.99
    full = _run(cnn, _ctx(cnn, samples=32))
    assert max(np.abs(v).max() for k, v in _inits(full.model).items() if v.dtype == np.int8) == 127


def test_weight_heavy_net_is_at_most_03x_the_bytes(tmp_path):
    rng = _rng(2)
    dims = [256, 512, 512, 10]
    inits, nodes, x = {}, [], "x"
    for i, (k, n) in enumerate(zip(dims, dims[1:], strict=False)):
        inits[f"w{i}"] = (rng.normal(size=(n, k)) / np.sqrt(k)).astype(np.float32)
        inits[f"b{i}"] = rng.normal(size=n).astype(np.float32) * 0.1
        nodes.append(
            helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}", transB=1)
        )
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["n", 256])],
        [helper.make_tensor_value_info("h2", F, ["n", 10])],
        inits,
    )
    result = _run(model, _ctx(model), activation="uint8")
    ratio = result.model.ByteSize() / model.ByteSize()
    assert ratio <= 0.3, ratio
    assert result.info["bytes_after"] / result.info["bytes_before"] == pytest.approx(ratio)
    weights = {k: v for k, v in _inits(result.model).items() if v.ndim == 2}
    assert sorted(weights) == ["w0_quantized", "w1_quantized", "w2_quantized"]
    assert all(v.dtype == np.int8 for v in weights.values())
    held = _held_out(model)
    assert _cos(result.model, model, held) >= 0.99
    ops, _ = _ort_optimised(result.model, held, tmp_path)
    assert ops.count("QGemm") == 3


# ------------------------------------------------------------------------------------------
# Single layers


def _layer(kind: str, bias: bool) -> tuple[onnx.ModelProto, int, int]:
    """A one-layer model, the weight's channel axis and channel count."""
    rng = _rng(3)
    inits: dict[str, np.ndarray] = {}
    if kind.startswith("gemm"):
        trans_b = int(kind == "gemm-t")
        inits["w"] = rng.normal(size=(8, 12) if trans_b else (12, 8)).astype(np.float32)
        ins = ["x", "w"] + (["b"] * bias)
        node = helper.make_node("Gemm", ins, ["y"], name="layer", transB=trans_b)
        xs, ys, axis = [4, 12], [4, 8], 0 if trans_b else 1
    elif kind == "matmul-3d":
        inits["w"] = rng.normal(size=(12, 8)).astype(np.float32)
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")
        xs, ys, axis = [2, 5, 12], [2, 5, 8], 1
    else:
        groups = {"conv": 1, "conv-g2": 2, "conv-dw": 8}[kind]
        inits["w"] = rng.normal(size=(8, 8 // groups, 3, 3)).astype(np.float32)
        ins = ["x", "w"] + (["b"] * bias)
        node = helper.make_node("Conv", ins, ["y"], name="layer", group=groups, pads=[1] * 4)
        xs, ys, axis = [2, 8, 6, 6], [2, 8, 6, 6], 0
    if bias:
        inits["b"] = rng.normal(size=8).astype(np.float32)
    model = _model(
        [node],
        [helper.make_tensor_value_info("x", F, xs)],
        [helper.make_tensor_value_info("y", F, ys)],
        inits,
    )
    return model, axis, 8


LAYERS = [
    ("gemm", True),
    ("gemm", False),
    ("gemm-t", True),
    ("gemm-t", False),
    ("matmul-3d", False),
    ("conv", True),
    ("conv", False),
    ("conv-g2", True),
    ("conv-dw", False),
]


@pytest.mark.parametrize(("kind", "bias"), LAYERS)
def test_single_layers_per_channel_weights_and_int32_bias(kind, bias, tmp_path):
    """Bound: cosine >= 0.999 vs float on held-out N(0, 1) inputs (one int8 layer)."""
    model, axis, channels = _layer(kind, bias)
    result = _run(model, activation="int8")
    assert result.modified and result.info["quantized_nodes"] == ["layer"]
    inits = _inits(result.model)
    assert inits["w_quantized"].dtype == np.int8 and "w" not in inits
    assert inits["w_scale"].shape == (channels,)
    dq = next(n for n in result.model.graph.node if n.input[0] == "w_quantized")
    assert helper.get_attribute_value(dq.attribute[0]) == axis
    assert ("b_quantized" in inits and inits["b_quantized"].dtype == np.int32) == bias
    held = _held_out(model)
    assert _cos(result.model, model, held) >= 0.999
    _ort_optimised(result.model, held, tmp_path)  # ORT runs it with its fusions on


def test_activations_on_both_inputs_of_a_matmul():
    a = helper.make_tensor_value_info("a", F, [2, 4, 6])
    b = helper.make_tensor_value_info("b", F, [2, 6, 3])
    model = _model(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
        [a, b],
        [helper.make_tensor_value_info("y", F, [2, 4, 3])],
        {},
    )
    result = _run(model)
    qs = [n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(qs) == ["a", "b"]
    assert _cos(result.model, model, _held_out(model)) >= 0.999


# ------------------------------------------------------------------------------------------
# Edge cases


def test_no_calibration_is_a_user_error():
    model, _, _ = _layer("gemm", True)
    with pytest.raises(UserInputError, match=re.escape(NO_CALIBRATION)):
        InsertQDQ()(model, PassContext())
    assert NO_CALIBRATION == "qdq needs calibration data: pass --calib data.npz|dir|random"


def test_old_opset_is_a_user_error():
    model, _, _ = _layer("gemm", True)
    model.opset_import[0].version = 12
    with pytest.raises(UserInputError, match="opset >= 13"):
        _run(model)


def test_nothing_to_quantize_leaves_the_model_alone():
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Add", ["r", "x"], ["y"], name="add"),
        ],
        [helper.make_tensor_value_info("x", F, [2, 3])],
        [helper.make_tensor_value_info("y", F, [2, 3])],
        {},
    )
    before = model.SerializeToString()
    result = _run(model)
    assert not result.modified and result.model.SerializeToString() == before


def _two_layer_mlp() -> onnx.ModelProto:
    rng = _rng(4)
    inits = {
        "w1": rng.normal(size=(6, 8)).astype(np.float32),
        "w2": rng.normal(size=(8, 4)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["n", 6])],
        [helper.make_tensor_value_info("y", F, ["n", 4])],
        inits,
    )


@pytest.mark.parametrize("keep", [["fc2"], ["MatMul"], "fc2"])
def test_keep_float_by_name_or_op_type(keep):
    model = _two_layer_mlp()
    result = _run(model, keep_float=keep, outputs=True, activation="uint8")
    fc2 = next(n for n in result.model.graph.node if n.name == "fc2")
    assert list(fc2.input) == ["r", "w2"]  # untouched: float input, float weight
    if keep == ["MatMul"]:
        assert not result.modified and result.info["kept_float"] == ["fc1", "fc2"]
    else:
        assert result.info["quantized_nodes"] == ["fc1"] and result.info["kept_float"] == ["fc2"]
        # the relu output is fc1's output point: quantized, but fc2 still reads the float tensor
        assert "r_dequantized" in {o for n in result.model.graph.node for o in n.output}


@pytest.mark.parametrize(
    ("outputs", "quantized"),
    [
        (("Conv",), {"x", "r"}),
        (True, {"x", "r", "h2"}),
        (False, {"x", "r"}),
        (["MatMul"], {"x", "r", "h2"}),
        ("Gemm", {"x", "r"}),
    ],
)
def test_outputs_option_picks_whose_outputs_are_quantized(outputs, quantized):
    """By default only Conv outputs get a Q/DQ (MatMul/Gemm outputs stay float)."""
    model = _two_layer_mlp()  # x -> fc1 -> h -> relu -> r -> fc2 -> y; then y -> Neg
    model.graph.node[2].output[0] = "h2"
    model.graph.node.append(helper.make_node("Neg", ["h2"], ["y"], name="neg"))
    result = _run(model, outputs=outputs, activation="uint8")
    assert set(result.info["activations"]) == quantized


@pytest.mark.parametrize(
    ("activation", "conv_output", "relu_output"), [("uint8", None, "r"), ("int8", "c", "r")]
)
def test_conv_output_point_relative_to_its_relu(activation, conv_output, relu_output, tmp_path):
    """uint8: the Q goes after the ReLU (zp = 0 lets ORT drop it); int8: before it, and the
    ReLU output, read by the next conv, gets its own Q. ORT fuses conv1 either way (conv2 writes
    the graph output, which stays float, so it runs as DQ + float conv)."""
    rng = _rng(8)
    nodes = [
        helper.make_node("Conv", ["x", "k1"], ["c"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "k2"], ["y"], name="conv2", pads=[1] * 4),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", F, [1, 4, 6, 6])],
        {
            "k1": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "k2": rng.normal(size=(4, 4, 3, 3)).astype(np.float32),
        },
    )
    result = _run(model, activation=activation)
    expected = {"x", relu_output} | ({conv_output} if conv_output else set())
    assert set(result.info["activations"]) == expected
    ops, _ = _ort_optimised(result.model, _held_out(model, n=1), tmp_path)
    assert ops.count("QLinearConv") == 1


def test_outputs_option_rejects_other_ops():
    with pytest.raises(UserInputError, match="outputs must list ops among Conv, Gemm, MatMul"):
        InsertQDQ(outputs=["Relu"])


def test_graph_outputs_stay_float():
    model = _two_layer_mlp()
    model.graph.output.append(helper.make_tensor_value_info("r", F, ["n", 8]))
    result = _run(model)
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert producers["y"] == "MatMul" and producers["r"] == "Relu"
    fc2 = next(n for n in result.model.graph.node if n.name == "fc2")
    assert fc2.input[0] == "r_dequantized"  # its reader still gets the quantized tensor


def test_shared_weight_is_quantized_once_and_kept_float_for_other_readers():
    rng = _rng(5)
    w = rng.normal(size=(6, 6)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="mm2"),
    ]
    io = (
        [helper.make_tensor_value_info("x", F, [3, 6])],
        [helper.make_tensor_value_info("y", F, [3, 6])],
    )
    model = _model(nodes, *io, {"w": w})
    result = _run(model)
    inits = _inits(result.model)
    assert [k for k in inits if k.startswith("w")] == ["w_quantized", "w_scale", "w_zero_point"]
    assert (
        sum(
            n.op_type == "DequantizeLinear" and n.input[0] == "w_quantized"
            for n in result.model.graph.node
        )
        == 1
    )
    # a non-quantized reader (Mul) keeps the float weight
    nodes.append(helper.make_node("Mul", ["w", "w"], ["w2"], name="square"))
    model = _model(nodes, io[0], io[1] + [helper.make_tensor_value_info("w2", F, [6, 6])], {"w": w})
    result = _run(model)
    assert result.info["float_weights_kept"] == ["w"]
    np.testing.assert_array_equal(_inits(result.model)["w"], w)


def test_declined_nodes_have_reasons():
    rng = _rng(6)
    nodes = [
        helper.make_node("MatMul", ["w", "x"], ["h"], name="w_at_x"),
        helper.make_node("Conv", ["img", "k"], ["c"], name="dynamic_conv"),
        helper.make_node("Transpose", ["w"], ["w_t"], name="transpose"),
        helper.make_node("MatMul", ["h", "w_t"], ["v"], name="computed"),
    ]
    model = _model(
        nodes,
        [
            helper.make_tensor_value_info("x", F, [4, 3]),
            helper.make_tensor_value_info("img", F, [1, 2, 5, 5]),
            helper.make_tensor_value_info("k", F, [2, 2, 3, 3]),
        ],
        [
            helper.make_tensor_value_info("v", F, [3, 5]),
            helper.make_tensor_value_info("c", F, [1, 2, 3, 3]),
        ],
        {"w": rng.normal(size=(5, 4)).astype(np.float32)},
    )
    result = _run(model, PassContext(calibration=lambda: []))  # nothing left to calibrate
    assert not result.modified
    reasons = {d["node"]: d["reason"] for d in result.info["declined"]}
    assert reasons == {
        "w_at_x": "constant first operand (W @ x) is not handled",
        "dynamic_conv": "weight 'k' is not constant",
        "computed": "weight 'w_t' is computed from constants: run fold-constants first",
    }


@pytest.mark.parametrize(
    ("target", "activation", "zp_type"),
    [
        (None, "int8", np.int8),
        ("x86", "uint8", np.uint8),
        ("rpi4", "int8", np.int8),
        ("jetson-orin", "int8", np.int8),
    ],
)
def test_activation_type_follows_the_target(target, activation, zp_type):
    model = _two_layer_mlp()
    ctx = _ctx(model, samples=20, target=target)
    result = InsertQDQ(method="entropy")(clone(model), ctx)
    info = result.info
    assert info["activation"].split()[0] == activation
    assert _inits(result.model)["x_zero_point"].dtype == zp_type
    expected = get_target(target).int8_execution if target else ORT_NOTE
    assert info["int8_execution"] == expected
    assert info["calibration"] == {"source": ctx.calibration_source, "samples": 20, "batches": 3}
    assert set(info["activations"]) == {"x", "r"}
    scales = [p["scale"] for p in info["activations"].values()]
    assert info["activation_scales"]["min"] == min(scales) > 0


def test_through_the_pipeline_text():
    model = _two_layer_mlp()
    manager = PassManager(parse_pipeline("qdq(method=percentile,percentile=99.9,keep_float=[fc2])"))
    out = manager.run(model, _ctx(model))
    record = manager.records[0]
    assert record.modified and record.info["percentile"] == 99.9
    assert record.info["kept_float"] == ["fc2"]
    assert _cos(out, model, _held_out(model)) >= 0.999


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "kl"}, "unknown method 'kl'"),
        ({"percentile": 0}, "percentile must be in"),
        ({"activation": "int4"}, "activation must be uint8 or int8"),
        ({"bins": 1000}, "bins"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(UserInputError, match=message):
        InsertQDQ(**options)
