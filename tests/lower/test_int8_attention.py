"""Activation x activation MatMuls (attention's Q K^T and P V) as integer matmuls, against ONNX
Runtime with optimisations off.

Both operands are ``DequantizeLinear(QuantizeLinear(x))`` (per tensor, zero points on either,
both or neither side), batched ``[B, H, S, D]`` as in a transformer, plus a broadcast batch and a
softmax-probability operand. ``exact`` graphs use power-of-two scales and inputs whose float sums
are exact, so the integer result must equal ONNX Runtime's bit for bit (tolerance 0); ``random``
graphs use arbitrary scales: one float rounding against ORT's rounded sums, relative 1e-5 of the
output's largest value.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.lower.int8_graphs import QdqGraph, feeds, ort_run, tvm_build

# (a dtype, a zero point, b dtype, b zero point, a shape, b shape)
CASES = {
    "u8zp_x_u8zp_bhsd": ("uint8", 131, "uint8", 120, [1, 3, 8, 16], [1, 3, 16, 8]),
    "s8_x_s8_symmetric": ("int8", 0, "int8", 0, [1, 3, 8, 16], [1, 3, 16, 8]),
    "s8zp_x_u8_broadcast_batch": ("int8", -7, "uint8", 0, [2, 3, 8, 16], [1, 3, 16, 24]),
    "u8_x_s8zp_3d": ("uint8", 0, "int8", 5, [4, 8, 16], [4, 16, 8]),
}


def build(exact: bool) -> QdqGraph:
    g = QdqGraph(exact, seed=3)
    for da, za, db, zb, sa, sb in CASES.values():
        a, _ = g.qdq(g.input(sa), da, za)
        b, _ = g.qdq(g.input(sb), db, zb)
        g.output_float(g.node("MatMul", [a, b]))
    # P V: softmax probabilities (uint8, zero point 0) times values, as in attention
    p, _ = g.qdq(g.node("Softmax", [g.input([1, 3, 8, 8])], axis=-1), "uint8", 0, 1 / 256)
    v, _ = g.qdq(g.input([1, 3, 8, 16]), "uint8", 128)
    g.output_float(g.node("MatMul", [p, v]))
    return g


@pytest.fixture(scope="module", params=["exact", "random"])
def compiled(request, tmp_path_factory):
    g = build(request.param == "exact")
    model = g.model()
    run, details = tvm_build(model, tmp_path_factory.mktemp(request.param))
    return request.param, model, run, details


def test_every_attention_matmul_is_integer_and_scheduled(compiled):
    _, _, _, details = compiled
    ops = details["int8_ops"]
    assert len(ops) == len(CASES) + 1
    assert all(op["integer"] for op in ops), ops
    assert all("activation x activation" in op["detail"] for op in ops)
    rules = details["schedules"]["kernels"]
    for op in ops:  # the schedules pass may append a digit to the kernel's name
        rule = [
            r
            for k, r in rules.items()
            if k.startswith(op["kernel"]) and k[len(op["kernel"]) :].isdigit()
        ]
        assert rule == ["int8-batch-matmul"], (op, rules)


@pytest.mark.parametrize("case", [*CASES, "softmax_x_values"])
def test_matches_onnx_runtime(compiled, case):
    kind, model, run, _ = compiled
    index = [*CASES, "softmax_x_values"].index(case)
    # exact: small integers times power-of-two steps, so every float sum ORT forms is exact
    inputs = feeds(model, scale=4.0)
    if kind == "exact":
        inputs = {k: np.round(v * 4) / 4 for k, v in inputs.items()}
    ref = ort_run(model, inputs)[index]
    got = run(inputs)[index]
    assert got.shape == ref.shape
    if kind == "exact":
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
