"""Comparison and the check rule: NaN/Inf never read as a match; quantized tolerance in steps.

The functions are the package runner's (``run.py``), so these tests cover ``edgecc run
--check`` and a board's ``python3 run.py --check`` alike. Pure numpy and ONNX Runtime: no TVM.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.report.compare import (
    QUANT_MAX_STEPS,
    check_rule,
    compare_outputs,
    is_quantized,
    run_onnx,
    uses_int8,
)
from edgecc.runtime._runner import FP32_RULE, check

REF = {"y": np.linspace(-1.0, 1.0, 128, dtype=np.float32)}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_output_is_never_a_match(bad):
    res = compare_outputs({"y": np.full(128, bad, np.float32)}, REF)
    assert res["nonfinite"] == 128
    assert res["max_abs_diff"] == math.inf and math.isnan(res["cosine"])
    result = check({"y": np.full(128, bad, np.float32)}, REF, reference=REF)
    assert not result["passed"] and "128 NaN/Inf values" in result["failures"][0]


def test_one_nan_among_outputs_fails_and_worst_keeps_it():
    # Python's min(1.0, nan) is 1.0: the worst-case aggregate must not drop the NaN cosine.
    out = {"a": np.ones(4, np.float32), "b": np.array([1, np.nan, 1, 1], np.float32)}
    ref = {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}
    res = compare_outputs(out, ref)
    assert res["nonfinite"] == 1 and math.isnan(res["cosine"])
    assert res["per_output"]["a"]["cosine"] == pytest.approx(1.0)
    assert not check(out, ref)["passed"]


def test_nonfinite_where_the_reference_has_the_same_is_agreement():
    ref = {"y": np.array([1.0, np.nan, np.inf, -np.inf], np.float32)}
    assert check(dict(ref), ref)["passed"]
    swapped = {"y": np.array([1.0, np.inf, np.nan, np.inf], np.float32)}
    assert compare_outputs(swapped, ref)["nonfinite"] == 3


def test_fp32_rule_tolerance():
    near = {"y": REF["y"] + np.float32(5e-4)}  # max rel diff 5e-4 <= 1e-3
    far = {"y": REF["y"] + np.float32(5e-3)}
    assert check(near, REF, FP32_RULE)["passed"]
    res = check(far, REF, FP32_RULE)
    assert not res["passed"] and "max rel diff" in res["failures"][0]


def test_quantized_rule_counts_steps():
    rule = {"kind": "quantized", "max_steps": 8.0, "min_cosine": 0.999, "steps": {"y": 0.01}}
    off = np.zeros(128, np.float32)
    off[3] = 0.05  # 5 steps on one element: a rounding flip amplified by later layers
    res = check({"y": REF["y"] + off}, REF, rule)
    assert res["passed"], res
    assert res["vs_expected"]["per_output"]["y"]["steps"] == pytest.approx(5.0, rel=1e-5)
    assert not FP32_RULE["max_rel_diff"] >= 0.05  # the fp32 rule would have failed it
    off[3] = 0.09  # 9 steps
    res = check({"y": REF["y"] + off}, REF, rule)
    assert not res["passed"] and "quantization steps" in res["failures"][0]


def test_min_cosine_against_the_source_reference():
    lossy = {"y": REF["y"] + np.float32(0.5) * np.sin(np.arange(128, dtype=np.float32))}
    res = check(lossy, lossy, reference=REF)  # agrees with its graph, not with the source
    assert res["passed"] and res["vs_reference"]["cosine"] < 0.9
    res = check(lossy, lossy, reference=REF, min_cosine=0.9)
    assert not res["passed"] and "float reference" in res["failures"][0]


def _qdq_model(dq_output: bool) -> onnx.ModelProto:
    """x -> Q -> DQ -> MatMul(W) [-> Q -> DQ] -> y: a quantized graph, output DQ or float."""
    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    w = numpy_helper.from_array(w, "w")
    inits = [
        w,
        numpy_helper.from_array(np.array(0.02, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
        numpy_helper.from_array(np.array(0.05, np.float32), "so"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("MatMul", ["xd", "w"], ["m" if dq_output else "y"]),
    ]
    if dq_output:
        nodes += [
            helper.make_node("QuantizeLinear", ["m", "so", "z"], ["mq"]),
            helper.make_node("DequantizeLinear", ["mq", "so", "z"], ["y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("dq_output", [True, False])
def test_check_rule_steps(dq_output):
    model = _qdq_model(dq_output)
    expected = run_onnx(model, {"x": np.random.default_rng(1).normal(size=(2, 4)).astype("f")})
    rule = check_rule(model, expected)
    assert is_quantized(model) and uses_int8(model)
    assert rule["kind"] == "quantized" and rule["max_steps"] == QUANT_MAX_STEPS
    y = expected["y"].astype(np.float64)
    step = 0.05 if dq_output else (y.max() - y.min()) / 255
    assert rule["steps"]["y"] == pytest.approx(step, rel=1e-6)


def test_check_rule_of_a_float_graph_is_fp32():
    model = _qdq_model(False)
    del model.graph.node[:2]
    model.graph.node[0].input[0] = "x"
    expected = run_onnx(model, {"x": np.ones((2, 4), np.float32)})
    assert check_rule(model, expected) == FP32_RULE
    assert not is_quantized(model) and not uses_int8(model)
