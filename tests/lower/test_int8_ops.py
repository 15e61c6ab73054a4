"""Integer lowering of QDQ ops (edgecc.lower.int8) against ONNX Runtime, optimisations off.

One graph holds every case as its own output (one compile per scale regime):

* ``exact`` graphs use power-of-two scales: ORT's float reference is then exact arithmetic, so
  each rewritten op must equal it bit for bit (tolerance 0).
* ``random`` graphs use arbitrary float scales: ORT rounds its float sums, so a quantized output
  may differ by one quantization step where ``y / s_y`` sits on a rounding boundary (tolerance:
  1 step, and at least 99% of the values equal); float outputs to 1e-5 relative.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.lower.int8_graphs import QdqGraph, feeds, ort_run, tvm_build

CASES = [
    "conv_perchannel_u8_zp_pad_bias_relu",
    "conv_pertensor_s8_zp_stride2_asympad_clip",
    "conv_grouped_dilated_s8_zp",
    "conv_depthwise_bias_relu",
    "conv_transpose_stride2_bias",
    "gemm_transb_bias_u8_float_out",
    "matmul_perchannel_s8",
    "maxpool_between",
    "concat_between",
    "add_between",
    "avgpool_between",
]


def build(exact: bool) -> tuple[QdqGraph, list[str]]:
    g = QdqGraph(exact)
    x = g.input([1, 8, 10, 10])
    v = g.input([3, 24])
    names: list[str] = []

    def out_q(y: str, name: str, dtype: str = "uint8", zp: int = 0) -> str:
        names.append(name)
        return g.output_q(y, dtype, zp)

    # conv 3x3, per-channel int8 weights, uint8 activation with a nonzero zero point, padding
    xa, (sa, _, _) = g.qdq(x, "uint8", 7)
    w, sw = g.weight([8, 8, 3, 3], 0)
    a = g.node("Relu", [g.node("Conv", [xa, w, g.bias(sa, sw)], pads=[1, 1, 1, 1])])
    a_out = out_q(a, CASES[0])
    # conv stride 2, asymmetric pads, per-tensor weight, int8 activation zp -5, Clip(0, 6)
    xb, _ = g.qdq(x, "int8", -5)
    w, _ = g.weight([6, 8, 3, 3], None)
    b = g.node("Conv", [xb, w], strides=[2, 2], pads=[0, 1, 1, 0])
    b = g.node("Clip", [b, g.const(np.float32(0)), g.const(np.float32(6))])
    out_q(b, CASES[1], "int8", 3)
    # grouped conv, dilation 2
    xc, _ = g.qdq(x, "int8", -3)
    w, _ = g.weight([4, 4, 3, 3], 0)
    out_q(g.node("Conv", [xc, w], group=2, dilations=[2, 2], pads=[2, 2, 2, 2]), CASES[2], "int8")
    # depthwise + bias + relu
    xd, (sd, _, _) = g.qdq(x, "uint8", 0)
    w, sw = g.weight([8, 1, 3, 3], 0)
    d = g.node("Relu", [g.node("Conv", [xd, w, g.bias(sd, sw)], group=8, pads=[1, 1, 1, 1])])
    d_out = out_q(d, CASES[3])
    # conv transpose, per-channel weights on axis 1
    xe, (se, _, _) = g.qdq(x, "int8", 0)
    w, sw = g.weight([8, 5, 3, 3], 1)
    e = g.node("ConvTranspose", [xe, w, g.bias(se, sw)], strides=[2, 2], pads=[1, 1, 1, 1])
    out_q(e, CASES[4], "int8", -2)
    # Gemm transB with bias, float output (as the qdq pass leaves Gemm outputs)
    vf, (sf, _, _) = g.qdq(v, "uint8", 100)
    w, sw = g.weight([10, 24], 0)
    names.append(CASES[5])
    g.output_float(g.node("Gemm", [vf, w, g.bias(sf, sw)], transB=1))
    # MatMul, per-channel along N
    vg, _ = g.qdq(v, "int8", 0)
    w, _ = g.weight([24, 7], 1)
    out_q(g.node("MatMul", [vg, w]), CASES[6], "int8")
    # between quantized layers: max pool, concat (equal scales), add (different), average pool
    _, (sa_out, _, _) = g.qdq(a, "uint8", 0, g.steps[a_out])  # the same tensor as a_out
    pool = g.node("MaxPool", [a_out], kernel_shape=[2, 2], strides=[2, 2])
    pq, _ = g.qdq(pool, "uint8", 0, sa_out)
    w, _ = g.weight([4, 8, 1, 1], 0)
    out_q(g.node("Conv", [pq, w]), CASES[7])
    same = g.dq(g.q(d, sa_out, 0, "uint8"), sa_out, 0, "uint8")
    cat = g.node("Concat", [a_out, same], axis=1)
    cq, _ = g.qdq(cat, "uint8", 0, sa_out)
    w, _ = g.weight([4, 16, 1, 1], 0)
    out_q(g.node("Conv", [cq, w]), CASES[8])
    added = g.node("Add", [a_out, d_out])
    aq, _ = g.qdq(added, "uint8", 0)
    w, _ = g.weight([4, 8, 3, 3], 0)
    out_q(g.node("Conv", [aq, w], pads=[1, 1, 1, 1]), CASES[9])
    avg = g.node("AveragePool", [a_out], kernel_shape=[2, 2], strides=[2, 2])
    vq, _ = g.qdq(avg, "uint8", 0)
    w, _ = g.weight([4, 8, 1, 1], 0)
    out_q(g.node("Conv", [vq, w]), CASES[10])
    assert names == CASES
    return g, names


@pytest.fixture(scope="module", params=["exact", "random"])
def compiled(request, tmp_path_factory):
    g, names = build(request.param == "exact")
    model = g.model()
    run, details = tvm_build(model, tmp_path_factory.mktemp(request.param))
    return request.param, g, model, run, details


def test_every_quantized_op_runs_as_integers(compiled):
    _, _, _, _, details = compiled
    ops = details["int8_ops"]
    assert len(ops) == 11  # 7 cases + 4 convs after the between-layer ops
    assert all(op["integer"] for op in ops), ops
    assert {op["op"] for op in ops} == {"conv2d", "conv2d_transpose", "matmul"}


@pytest.mark.parametrize("case", CASES)
def test_matches_onnx_runtime(compiled, case):
    kind, g, model, run, _ = compiled
    index = CASES.index(case)
    inputs = feeds(model)
    ref = ort_run(model, inputs)[index]
    got = run(inputs)[index]
    assert got.shape == ref.shape
    step = g.steps[g.outputs[index]]
    if kind == "exact":
        np.testing.assert_array_equal(got, ref)  # bit for bit
    elif step == 0.0:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    else:
        steps = np.abs(got.astype(np.float64) - ref) / step
        assert steps.max() <= 1.0 + 1e-6, steps.max()
        assert (got == ref).mean() >= 0.99, (got == ref).mean()
