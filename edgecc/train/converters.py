"""onnx2torch converters for operator versions it lacks (registered on first use).

onnx2torch 1.5 converts ``ReduceMean``/``ReduceMax``/... up to opset 13, where ``axes`` is an
attribute; opset 18 moved ``axes`` to a second input, and torch's exporters emit opset 18. Here
the opset-18 forms with a constant ``axes`` input are converted to onnx2torch's own static-axes
module, so they compute exactly what its opset-13 converters compute. A non-constant ``axes`` is
refused (``NotImplementedError``, reported as a user error by the bridge).
"""

from __future__ import annotations

from typing import Any

import numpy as np

REDUCE_18 = (
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
)
_registered = False


def register_converters() -> None:
    """Add the converters above to onnx2torch's registry (idempotent)."""
    global _registered
    if _registered:
        return
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
    from onnx2torch.node_converters.registry import add_converter
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    def reduce18(node: Any, graph: Any) -> Any:
        attrs = node.attributes
        axes = None
        if len(node.input_values) > 1 and node.input_values[1]:
            name = node.input_values[1]
            if name not in graph.initializers:
                raise NotImplementedError(f"{node.operation_type} with non-constant axes")
            axes = np.asarray(graph.initializers[name].to_numpy()).astype(int).tolist()
        if not axes and attrs.get("noop_with_empty_axes", 0):
            raise NotImplementedError(f"{node.operation_type} with noop_with_empty_axes=1")
        return OperationConverterResult(
            torch_module=OnnxReduceStaticAxes(
                operation_type=node.operation_type,
                axes=axes,
                keepdims=attrs.get("keepdims", 1),
            ),
            onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
        )

    for op in REDUCE_18:
        add_converter(operation_type=op, version=18)(reduce18)
    _registered = True
