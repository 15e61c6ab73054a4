"""Graph statistics and output comparison."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.report.compare import compare_outputs, cosine
from edgecc.report.metrics import graph_stats


def test_conv_gemm_macs_and_params() -> None:
    w = numpy_helper.from_array(np.zeros((8, 2, 3, 3), np.float32), "w")  # groups=2 on 4 inputs
    fc = numpy_helper.from_array(np.zeros((8 * 6 * 6, 10), np.float32), "fc")
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], group=2),
            helper.make_node("Flatten", ["c"], ["f"]),
            helper.make_node("Gemm", ["f", "fc"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [w, fc],
    )
    stats = graph_stats(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    conv = 1 * 8 * 6 * 6 * (4 // 2) * 9
    gemm = 10 * 288
    assert stats["macs"] == conv + gemm
    assert stats["params"] == 8 * 2 * 9 + 288 * 10
    assert stats["nodes"] == 3 and stats["macs_unknown"] == []


def test_compare_outputs_worst_case() -> None:
    ref = {"a": np.array([1.0, 2.0]), "b": np.array([0.0, 4.0])}
    out = {"a": np.array([1.0, 2.5]), "b": np.array([0.0, 4.0])}
    res = compare_outputs(out, ref)
    assert res["max_abs_diff"] == pytest.approx(0.5)
    assert res["max_rel_diff"] == pytest.approx(0.25)
    assert res["cosine"] == pytest.approx(cosine(out["a"], ref["a"]))
    with pytest.raises(ValueError, match="shape"):
        compare_outputs({"a": np.zeros(3), "b": np.zeros(2)}, ref)
