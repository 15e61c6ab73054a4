"""dynamic-quant: weight-only int8 for MatMul/Gemm/LSTM/GRU; accuracy, bytes, edge cases."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.passes.manager import PassContext, PassManager, clone, parse_pipeline
from edgecc.passes.quantize_dynamic import QuantizeDynamic
from edgecc.report.compare import cosine, run_onnx

F = TensorProto.FLOAT


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs,
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _run(model: onnx.ModelProto, **options):
    return QuantizeDynamic(**options)(clone(model), PassContext())


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _cos_default_ort(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> float:
    """Cosine of ``a`` run by ONNX Runtime at its default optimisation level vs ``b``'s
    reference run (optimisations off)."""
    sess = ort.InferenceSession(a.SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    ref = run_onnx(b, feeds)
    return min(cosine(out[k], ref[k]) for k in ref)


def _mlp() -> onnx.ModelProto:
    """Gemm (transB=1, bias) -> Relu -> MatMul on 3-D activations -> Gemm (transB=0)."""
    rng = _rng(1)
    inits = {"w1": (rng.normal(size=(256, 128)) / 11).astype(np.float32),
             "b1": rng.normal(size=256).astype(np.float32),
             "w2": (rng.normal(size=(256, 256)) / 16).astype(np.float32),
             "w3": (rng.normal(size=(256, 10)) / 16).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
             helper.make_node("Reshape", ["r1", "shape3"], ["r3"], name="to3d"),
             helper.make_node("MatMul", ["r3", "w2"], ["h2"], name="fc2"),
             helper.make_node("Reshape", ["h2", "shape2"], ["h2f"], name="to2d"),
             helper.make_node("Gemm", ["h2f", "w3"], ["y"], name="fc3")]
    inits["shape3"] = np.array([2, -1, 256], np.int64)
    inits["shape2"] = np.array([-1, 256], np.int64)
    return _model(nodes, [helper.make_tensor_value_info("x", F, [8, 128])],
                  [helper.make_tensor_value_info("y", F, [8, 10])], inits)


def test_mlp_cosine_0999_and_bytes_reduced():
    """Bound: cosine >= 0.999 vs float (ORT default optimisations); bytes <= 0.3x."""
    model = _mlp()
    result = _run(model)
    assert result.modified
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"x": _rng(2).normal(size=(8, 128)).astype(np.float32)}
    assert _cos_default_ort(result.model, model, feeds) >= 0.999
    info = result.info
    assert info["bytes_before"] == model.ByteSize()
    assert info["bytes_after"] == result.model.ByteSize()
    assert info["ratio"] <= 0.3
    assert [q["node"] for q in info["quantized"]] == ["fc1", "fc2", "fc3"]
    inits = _inits(result.model)
    assert {k for k in inits if k.startswith("w")} == {
        f"w{i}_{s}" for i in (1, 2, 3) for s in ("quantized", "scale", "zero_point")}
    # per output channel: fc1 (transB=1) along axis 0, fc2/fc3 along W's last axis
    assert inits["w1_scale"].shape == (256,) and inits["w2_scale"].shape == (256,)
    assert inits["w3_scale"].shape == (10,)
    assert inits["b1"].dtype == np.float32  # biases stay float
    ops = {n.op_type for n in result.model.graph.node}
    assert "QuantizeLinear" not in ops  # weight-only: activations stay float


def test_weights_dequantize_to_within_half_a_step():
    model = _mlp()
    inits = _inits(_run(model).model)
    w = _inits(model)["w1"]
    deq = inits["w1_quantized"].astype(np.float32) * inits["w1_scale"][:, None]
    assert np.all(np.abs(deq - w) <= inits["w1_scale"][:, None] / 2 + 1e-7)
    assert np.abs(inits["w1_quantized"]).max() == 127


def _rnn(op: str, directions: int = 1) -> onnx.ModelProto:
    rng = _rng(3)
    gates, hidden, size = {"LSTM": 4, "GRU": 3}[op], 16, 8
    inits = {"W": rng.normal(size=(directions, gates * hidden, size)).astype(np.float32) * 0.3,
             "R": rng.normal(size=(directions, gates * hidden, hidden)).astype(np.float32) * 0.3,
             "B": rng.normal(size=(directions, 2 * gates * hidden)).astype(np.float32) * 0.1}
    direction = "bidirectional" if directions == 2 else "forward"
    node = helper.make_node(op, ["x", "W", "R", "B"], ["y"], name="rnn", hidden_size=hidden,
                            direction=direction)
    return _model([node], [helper.make_tensor_value_info("x", F, [5, 2, size])],
                  [helper.make_tensor_value_info("y", F, [5, directions, 2, hidden])], inits)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize("directions", [1, 2])
def test_recurrent_weights_are_int8(op, directions):
    """Bound: cosine >= 0.999 vs float on a 5-step sequence."""
    model = _rnn(op, directions)
    result = _run(model)
    inits = _inits(result.model)
    assert inits["W_quantized"].dtype == np.int8 and inits["R_quantized"].dtype == np.int8
    assert inits["W_scale"].shape == (model.graph.initializer[0].dims[1],)  # one per gate row
    assert "W" not in inits and "R" not in inits and inits["B"].dtype == np.float32
    feeds = {"x": _rng(4).normal(size=(5, 2, 8)).astype(np.float32)}
    assert _cos_default_ort(result.model, model, feeds) >= 0.999


def test_nothing_to_do_and_idempotence():
    conv = _model([helper.make_node("Conv", ["x", "k"], ["y"], name="conv")],
                  [helper.make_tensor_value_info("x", F, [1, 2, 4, 4])],
                  [helper.make_tensor_value_info("y", F, [1, 2, 2, 2])],
                  {"k": np.ones((2, 2, 3, 3), np.float32)})
    result = _run(conv)
    assert not result.modified and result.info["bytes_after"] == result.info["bytes_before"]
    once = _run(_mlp()).model
    again = _run(once)
    assert not again.modified  # weights are DQ outputs now, not constants
    assert {d["reason"] for d in again.info["declined"]} == {"no constant weight"}


@pytest.mark.parametrize(("options", "declined"), [
    ({"skip": ["fc2"]}, {"fc2": "in skip"}),
    ({"skip": "Gemm"}, {"fc1": "in skip", "fc3": "in skip"}),
    ({"min_size": 10_000}, {"fc3": "2560 weight elements < min_size=10000"}),
])
def test_skip_and_min_size(options, declined):
    result = _run(_mlp(), **options)
    assert {d["node"]: d["reason"] for d in result.info["declined"]} == declined
    quantized = {q["node"] for q in result.info["quantized"]}
    assert quantized == {"fc1", "fc2", "fc3"} - set(declined)


def test_tied_weight_is_declined():
    rng = _rng(5)
    emb = rng.normal(size=(20, 6)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "emb_t"], ["logits"], name="tied"),
             helper.make_node("MatMul", ["emb", "e_t"], ["scores"], name="w_at_x"),
             helper.make_node("Transpose", ["e"], ["e_t"], name="t")]
    model = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                   [helper.make_tensor_value_info("logits", F, [3, 20]),
                    helper.make_tensor_value_info("scores", F, [20, 3])],
                   {"emb": emb, "emb_t": emb.T.copy()})
    result = _run(model)
    reasons = {d["node"]: d["reason"] for d in result.info["declined"]}
    assert reasons == {"w_at_x": "weight 'emb' is also read by embed"}
    assert [q["node"] for q in result.info["quantized"]] == ["tied"]
    feeds = {"ids": np.array([1, 5, 7])}
    assert _cos_default_ort(result.model, model, feeds) >= 0.999


def test_constant_first_operand_is_quantized_along_its_rows():
    w = _rng(6).normal(size=(12, 5)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["w", "x"], ["y"], name="w_at_x")],
                   [helper.make_tensor_value_info("x", F, [5, 3])],
                   [helper.make_tensor_value_info("y", F, [12, 3])], {"w": w})
    result = _run(model)
    assert _inits(result.model)["w_scale"].shape == (12,)
    dq = next(n for n in result.model.graph.node if n.op_type == "DequantizeLinear")
    assert helper.get_attribute_value(dq.attribute[0]) == 0
    feeds = {"x": _rng(7).normal(size=(5, 3)).astype(np.float32)}
    assert _cos_default_ort(result.model, model, feeds) >= 0.999


def test_weight_computed_from_constants_asks_for_fold_constants():
    nodes = [helper.make_node("Transpose", ["w_t"], ["w"], name="transpose"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("MatMul", ["y", "z"], ["attn"], name="act_by_act")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [3, 4]),
                           helper.make_tensor_value_info("z", F, [5, 2])],
                   [helper.make_tensor_value_info("attn", F, [3, 2])],
                   {"w_t": np.ones((5, 4), np.float32)})
    result = _run(model)
    assert not result.modified
    assert {d["node"]: d["reason"] for d in result.info["declined"]} == {
        "mm": "weight 'w' is computed from constants: run fold-constants first",
        "act_by_act": "no constant weight"}


def test_through_the_pipeline_text():
    model = _mlp()
    manager = PassManager(parse_pipeline("dynamic-quant(skip=[fc3],min_size=0)"))
    out = manager.run(model, PassContext())
    assert manager.records[0].modified
    assert "w3" in {t.name for t in out.graph.initializer}
