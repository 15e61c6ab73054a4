"""expand-rnn: LSTM/GRU/RNN unrolled into plain ops match ONNX Runtime on the original node.

Every variant (direction, layout, initial states, biases, peepholes, GRU linear_before_reset,
activations with alpha/beta, clip, input_forget, sequence length 1, constant sequence_lens) is
run by ONNX Runtime (graph optimisations off) before and after the pass; all outputs (Y, Y_h,
Y_c) agree to rtol 1e-5, atol 1e-5 (float32 arithmetic in a different order).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgecc.passes.expand_rnn import ExpandRecurrent
from edgecc.passes.manager import PassContext, PassManager, clone, parse_pipeline
from edgecc.report.compare import run_onnx
from tests.models import onnx_model, tensor

HIDDEN, SIZE, BATCH = 5, 3, 2
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _model(
    op: str,
    steps: int = 4,
    direction: str = "forward",
    layout: int = 0,
    states: bool = False,
    bias: bool = True,
    peepholes: bool = False,
    seq_lens: np.ndarray | None = None,
    outputs: tuple[str, ...] = ("Y", "Y_h", "Y_c"),
    **attrs: object,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One recurrent node; initial states (when given) are graph inputs."""
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    inits = {
        "W": rng.normal(size=(dirs, g * HIDDEN, SIZE)).astype(np.float32) * 0.6,
        "R": rng.normal(size=(dirs, g * HIDDEN, HIDDEN)).astype(np.float32) * 0.6,
    }
    if bias:
        inits["B"] = rng.normal(size=(dirs, 2 * g * HIDDEN)).astype(np.float32) * 0.5
    if seq_lens is not None:
        inits["lens"] = seq_lens
    if peepholes:
        inits["P"] = rng.normal(size=(dirs, 3 * HIDDEN)).astype(np.float32) * 0.5
    x_shape = [steps, BATCH, SIZE] if layout == 0 else [BATCH, steps, SIZE]
    s_shape = [dirs, BATCH, HIDDEN] if layout == 0 else [BATCH, dirs, HIDDEN]
    feeds = {"x": rng.normal(size=x_shape).astype(np.float32)}
    inputs = [tensor("x", x_shape)]
    if states:
        for name in ("h0", "c0") if op == "LSTM" else ("h0",):
            feeds[name] = rng.normal(size=s_shape).astype(np.float32)
            inputs.append(tensor(name, s_shape))
    names = [
        "x",
        "W",
        "R",
        "B" if bias else "",
        "lens" if seq_lens is not None else "",
        "h0" if states else "",
        "c0" if states and op == "LSTM" else "",
        "P" if peepholes else "",
    ]
    names = names[: 8 if op == "LSTM" else 6]
    while not names[-1]:
        names.pop()
    n_out = 3 if op == "LSTM" else 2
    outs = [o if o in outputs else "" for o in ("Y", "Y_h", "Y_c")[:n_out]]
    node = helper.make_node(
        op,
        names,
        outs,
        name="rnn",
        hidden_size=HIDDEN,
        direction=direction,
        layout=layout,
        **attrs,
    )
    y_shape = [steps, dirs, BATCH, HIDDEN] if layout == 0 else [BATCH, steps, dirs, HIDDEN]
    out_vi = [tensor(o, y_shape if o == "Y" else s_shape) for o in outs if o]
    return onnx_model([node], inputs, out_vi, inits), feeds


def _reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime on the original node; ORT has no layout=1, so a layout-1 node runs as its
    layout-0 equivalent (the spec's definition: batch and time axes swapped on every tensor)."""
    node = model.graph.node[0]
    if not any(a.name == "layout" and a.i == 1 for a in node.attribute):
        return run_onnx(model, feeds)
    swapped = clone(model)
    for a in swapped.graph.node[0].attribute:
        if a.name == "layout":
            a.i = 0
    for vi in list(swapped.graph.input) + list(swapped.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.name == "Y":  # (batch, T, dirs, hidden) -> (T, dirs, batch, hidden)
            b, t, d = (dims[k].dim_value for k in range(3))
            dims[0].dim_value, dims[1].dim_value, dims[2].dim_value = t, d, b
        else:
            dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value
    out = run_onnx(swapped, {k: np.swapaxes(v, 0, 1) for k, v in feeds.items()})
    return {
        k: v.transpose(2, 0, 1, 3) if k == "Y" else np.swapaxes(v, 0, 1) for k, v in out.items()
    }


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    expected = _reference(model, feeds)
    result = ExpandRecurrent()(clone(model), PassContext())
    assert result.modified and result.info["expanded"][0]["node"] == "rnn"
    onnx.checker.check_model(result.model, full_check=True)
    ops = {n.op_type for n in result.model.graph.node}
    assert not ops & {"LSTM", "GRU", "RNN"}
    got = run_onnx(result.model, feeds)
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    return result.model


DIRECTIONS = ["forward", "reverse", "bidirectional"]


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("states", [False, True])
def test_directions_layouts_states(op: str, direction: str, layout: int, states: bool) -> None:
    _check(*_model(op, direction=direction, layout=layout, states=states))


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("steps", [1, 3])
def test_no_bias_and_one_step(op: str, steps: int) -> None:
    _check(*_model(op, steps=steps, bias=False, direction="bidirectional", states=steps == 1))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("states", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gru_linear_before_reset(direction: str, states: bool, bias: bool) -> None:
    _check(*_model("GRU", direction=direction, states=states, bias=bias, linear_before_reset=1))


@pytest.mark.parametrize("states", [False, True])
@pytest.mark.parametrize("input_forget", [0, 1])
def test_lstm_peepholes_and_input_forget(states: bool, input_forget: int) -> None:
    _check(*_model("LSTM", states=states, peepholes=True, input_forget=input_forget))


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("lbr", [0, 1])
def test_clip(op: str, lbr: int) -> None:
    extra = {"linear_before_reset": lbr} if op == "GRU" else {}
    _check(*_model(op, states=True, peepholes=op == "LSTM", clip=0.7, **extra))


# (op, activations of one direction, alphas, betas); alphas/betas are consumed in order by the
# activations that take them
ACTIVATION_CASES = [
    ("RNN", ["Relu"], [], []),
    ("RNN", ["Affine"], [0.5], [0.2]),
    ("RNN", ["LeakyRelu"], [0.1], []),
    ("RNN", ["ThresholdedRelu"], [0.3], []),
    ("RNN", ["ScaledTanh"], [1.5], [0.7]),
    ("RNN", ["HardSigmoid"], [0.3], [0.4]),
    ("RNN", ["Elu"], [0.8], []),
    ("RNN", ["Softsign"], [], []),
    ("RNN", ["Softplus"], [], []),
    ("RNN", ["LeakyRelu"], [], []),  # spec default alpha
    ("GRU", ["HardSigmoid", "Softsign"], [0.25], [0.45]),
    ("LSTM", ["HardSigmoid", "ScaledTanh", "Affine"], [0.3, 1.2, 0.9], [0.4, 0.8, 0.1]),
]


@pytest.mark.parametrize(("op", "acts", "alphas", "betas"), ACTIVATION_CASES)
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_activations(op: str, acts: list[str], alphas: list, betas: list, direction: str) -> None:
    dirs = 2 if direction == "bidirectional" else 1
    attrs: dict[str, object] = {"activations": acts * dirs}
    if alphas:
        attrs["activation_alpha"] = alphas * dirs
    if betas:
        attrs["activation_beta"] = betas * dirs
    _check(*_model(op, direction=direction, states=True, **attrs))


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_constant_full_sequence_lens_and_partial_outputs(op: str) -> None:
    lens = np.full(BATCH, 4, np.int32)
    _check(*_model(op, seq_lens=lens, outputs=("Y_h",)))
    _check(*_model(op, seq_lens=lens, outputs=("Y",), direction="reverse"))


def test_constant_zero_states_skip_the_first_recurrent_matmul() -> None:
    model, feeds = _model("LSTM", steps=3)
    zeros = np.zeros((1, BATCH, HIDDEN), np.float32)
    model.graph.initializer.extend(
        [onnx.numpy_helper.from_array(zeros, "h0"), onnx.numpy_helper.from_array(zeros, "c0")]
    )
    model.graph.node[0].input.extend(["", "h0", "c0"])
    expanded = _check(model, feeds)
    assert [n.op_type for n in expanded.graph.node].count("MatMul") == 1 + 2  # steps 2 and 3


def _declined(model: onnx.ModelProto) -> str:
    result = ExpandRecurrent()(clone(model), PassContext())
    assert not result.modified
    assert result.model.SerializeToString() == model.SerializeToString()
    (entry,) = result.info["declined"]
    return entry["reason"]


def test_declines_shorter_sequence_lens() -> None:
    model, _ = _model("LSTM", seq_lens=np.array([4, 2], np.int32))
    assert "differ from the sequence length 4" in _declined(model)


def test_declines_dynamic_sequence_length_and_runtime_lens() -> None:
    model, _ = _model("GRU")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "T"
    assert "not static" in _declined(model)
    model, _ = _model("GRU")
    model.graph.input.append(tensor("lens", [BATCH], TensorProto.INT32))
    model.graph.node[0].input.extend(["lens"])
    assert "computed at run time" in _declined(model)


def test_declines_non_constant_weights() -> None:
    model, _ = _model("RNN")
    w = model.graph.initializer[0]
    model.graph.input.append(tensor("W", list(w.dims)))
    del model.graph.initializer[0]
    assert "W ('W') is not constant" in _declined(model)


def test_nothing_to_expand() -> None:
    model = onnx_model(
        [helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", [2])]
    )
    result = ExpandRecurrent()(clone(model), PassContext())
    assert not result.modified and result.info == {"expanded": [], "declined": []}


def test_dynamic_quant_after_expansion_quantizes_the_matmuls() -> None:
    """Bound: cosine >= 0.999 vs the float LSTM (weight-only int8)."""
    from edgecc.report.compare import cosine

    model, feeds = _model("LSTM", direction="bidirectional", states=True)
    out = PassManager(parse_pipeline("expand-rnn,dynamic-quant")).run(model)
    matmuls = [n for n in out.graph.node if n.op_type == "MatMul"]
    dq = {n.output[0] for n in out.graph.node if n.op_type == "DequantizeLinear"}
    assert len(matmuls) == 2 + 2 * (4 - 0)  # one input projection + one per step, per direction
    assert all(m.input[1] in dq for m in matmuls)
    assert len(dq) == 4  # W^T and R^T per direction; R^T shared by all steps
    got, ref = run_onnx(out, feeds), run_onnx(model, feeds)
    assert min(cosine(got[k], ref[k]) for k in ref) >= 0.999
