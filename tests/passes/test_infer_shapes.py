"""shape-inference: value_info filled with data propagation; modified exactly when it changes.

Shape inference never changes numbers; each case also checks the outputs against ONNX Runtime
on the original graph (exact equality).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgecc.passes.infer_shapes import InferShapes
from edgecc.passes.manager import PassContext
from edgecc.report.compare import run_onnx
from tests.models import onnx_model, tensor


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    return {
        v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in list(model.graph.value_info) + list(model.graph.output)
    }


def _chain() -> onnx.ModelProto:
    """x -> Relu -> Transpose -> Reshape(shape computed from Shape/Gather/Concat) -> y."""
    return onnx_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
            helper.make_node("Shape", ["t"], ["s"]),
            helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
            helper.make_node("Concat", ["b", "minus1"], ["target"], axis=0),
            helper.make_node("Reshape", ["t", "target"], ["y"]),
        ],
        [tensor("x", [2, 3, 4])],
        [tensor("y", [None, None])],
        {"i0": np.array([0], np.int64), "minus1": np.array([-1], np.int64)},
    )


def _run(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    before = model.SerializeToString()
    result = InferShapes()(model, PassContext())
    outputs = run_onnx(result.model, {"x": np.ones((2, 3, 4), np.float32)})
    expected = run_onnx(onnx.load_from_string(before), {"x": np.ones((2, 3, 4), np.float32)})
    for name, value in expected.items():
        np.testing.assert_array_equal(outputs[name], value)
    return result.model, result.modified


def test_fills_value_info_with_data_propagation() -> None:
    model, modified = _run(_chain())
    assert modified
    shapes = _shapes(model)
    assert shapes["t"] == [2, 4, 3]
    assert shapes["target"] == [2]
    assert shapes["y"] == [2, 12]  # needs the propagated value of `target`, not just its shape


def test_second_run_changes_nothing() -> None:
    model, _ = _run(_chain())
    again, modified = _run(model)
    assert not modified
    assert again is model


def test_nothing_to_infer() -> None:
    model = onnx_model(
        [helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [2, 3, 4])], [tensor("y", [2, 3, 4])]
    )
    result, modified = _run(model)
    assert not modified and len(result.graph.value_info) == 0


def test_refines_a_graph_output_without_shape() -> None:
    model = onnx_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor("x", [2, 3, 4])],
        [tensor("y", [None, None, None])],
    )
    result, modified = _run(model)
    assert modified and _shapes(result)["y"] == [2, 3, 4]


def test_stale_value_info_is_replaced() -> None:
    """An earlier pass changed shapes without refreshing them: the contradiction is fixed."""
    model, _ = _run(_chain())
    for v in model.graph.value_info:
        if v.name == "t":
            v.type.tensor_type.shape.dim[1].dim_value = 7
    result, modified = _run(model)
    assert modified and _shapes(result)["t"] == [2, 4, 3]


def test_keeps_hints_inference_cannot_derive() -> None:
    """Existing (exporter) value_info knows dims inference alone leaves unknown; keep them."""
    model = onnx_model(
        [helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Relu", ["nz"], ["y"])],
        [tensor("x", [4])],
        [tensor("y", [None, None], TensorProto.INT64)],
        value_info=[tensor("nz", [1, 3], TensorProto.INT64)],
    )
    result = InferShapes()(model, PassContext())
    assert _shapes(result.model)["nz"] == [1, 3]


@pytest.mark.parametrize("strict", [True, False])
def test_options(strict: bool) -> None:
    assert InferShapes(strict=strict)(_chain(), PassContext()).modified
