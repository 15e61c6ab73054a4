"""int8_execution for weight-only (dynamic-quant) graphs: the MatMul/Gemm nodes the dynamic
rewrite ran as integer matmuls (``library.int8_dynamic``) are reported integer, with their kernel
and rule, even where the static rewrite logged nothing for them (a Gemm ``transB`` weight)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgecc.lower.int8.layers import compact_lines, int8_execution


def _model():
    w = numpy_helper.from_array(np.ones((4, 8), np.int8), "wq")
    s = numpy_helper.from_array(np.ones(4, np.float32), "ws")
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="dq", axis=0),
        helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [w, s],
    )
    return helper.make_model(graph)


def test_dynamic_layers_are_integer():
    dynamic = {
        "layers": [
            {
                "node": "fc",
                "kernel": "fused_matmul",
                "rule": "int8-matmul",
                "mode": "dynamic-int8 (per-row)",
                "weight": "per-channel",
            }
        ]
    }
    without = int8_execution(_model(), [], None)
    assert without["layers"][0]["execution"] == "unknown"  # what the static log alone gives
    ex = int8_execution(_model(), [], None, dynamic)
    (layer,) = ex["layers"]
    assert layer["execution"] == "integer"
    assert (layer["kernel"], layer["rule"]) == ("fused_matmul", "int8-matmul")
    assert layer["detail"].startswith("dynamic-int8 (per-row): activations quantized")
    assert ex["summary"].startswith("1 of 1 quantized layers run as integer kernels")
    assert compact_lines(ex)[1] == "  fc (Gemm): integer, fused_matmul [int8-matmul]"
