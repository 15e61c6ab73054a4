"""remove-identity: pass-through nodes go, graph output names never change.

Removing pass-through nodes never changes numbers: outputs (by name) are compared with ONNX
Runtime on the original graph for exact equality.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgecc.passes.manager import PassContext
from edgecc.passes.remove_identity import RemoveIdentity
from edgecc.report.compare import run_onnx
from tests.models import onnx_model, tensor

X = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
W = np.arange(6, dtype=np.float32).reshape(2, 3)


def _run(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool, dict]:
    expected = run_onnx(model, {"x": X})
    original = model.SerializeToString()
    outputs_before = [o.name for o in model.graph.output]
    result = RemoveIdentity()(model, PassContext())
    if not result.modified:
        assert result.model.SerializeToString() == original
    onnx.checker.check_model(result.model, full_check=True)
    assert [o.name for o in result.model.graph.output] == outputs_before
    outputs = run_onnx(result.model, {"x": X})
    assert list(outputs) == list(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(outputs[name], value)
    return result.model, result.modified, result.info


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _identity(src: str, dst: str) -> onnx.NodeProto:
    return helper.make_node("Identity", [src], [dst])


def test_nothing_to_remove() -> None:
    model = onnx_model(
        [helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [2, 3])], [tensor("y", [2, 3])]
    )
    _, modified, info = _run(model)
    assert not modified and info["removed"] == 0


def test_inner_identity_is_bypassed() -> None:
    model = onnx_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            _identity("a", "b"),
            helper.make_node("Neg", ["b"], ["y"]),
        ],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        value_info=[tensor("a", [2, 3]), tensor("b", [2, 3])],
    )
    result, modified, info = _run(model)
    assert modified and info["ops"] == {"Identity": 1}
    assert _ops(result) == ["Relu", "Neg"]
    assert list(result.graph.node[1].input) == ["a"]
    assert [v.name for v in result.graph.value_info] == ["a"]


@pytest.mark.parametrize("chain", [1, 3])
def test_identity_chain_into_a_graph_output(chain: int) -> None:
    """Relu -> a -> Identity x chain -> y (output); a is also read by Neg -> z (output)."""
    names = ["a"] + [f"i{k}" for k in range(chain - 1)] + ["y"]
    model = onnx_model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["z"])]
        + [_identity(s, d) for s, d in zip(names, names[1:], strict=False)],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3]), tensor("z", [2, 3])],
    )
    result, modified, info = _run(model)
    assert modified and info["removed"] == chain
    assert _ops(result) == ["Relu", "Neg"]
    assert list(result.graph.node[0].output) == ["y"]  # the producer writes the output itself
    assert list(result.graph.node[1].input) == ["y"]


@pytest.mark.parametrize(
    "source,reason",
    [("x", "graph input"), ("w", "initializer")],
)
def test_input_or_constant_straight_to_output_stays(source: str, reason: str) -> None:
    model = onnx_model(
        [_identity(source, "y"), helper.make_node("Abs", ["x"], ["z"])],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3]), tensor("z", [2, 3])],
        {"w": W},
    )
    _, modified, info = _run(model)
    assert not modified and reason in info["declined"][0]["reason"]


def test_one_tensor_as_two_outputs_keeps_one_identity() -> None:
    model = onnx_model(
        [helper.make_node("Relu", ["x"], ["a"]), _identity("a", "y1"), _identity("a", "y2")],
        [tensor("x", [2, 3])],
        [tensor("y1", [2, 3]), tensor("y2", [2, 3])],
    )
    result, modified, info = _run(model)
    assert modified and info["removed"] == 1 and len(info["declined"]) == 1
    assert _ops(result) == ["Relu", "Identity"]


@pytest.mark.parametrize(
    "node,removed",
    [
        (helper.make_node("Dropout", ["a"], ["b"]), True),
        (helper.make_node("Dropout", ["a", "ratio", "off"], ["b"]), True),
        (helper.make_node("Dropout", ["a", "ratio", "on"], ["b"]), False),
        (helper.make_node("Dropout", ["a"], ["b", "mask"]), False),  # mask is an output
        (helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT), True),
        (helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT16), False),
        (helper.make_node("CastLike", ["a", "x"], ["b"]), True),
        (helper.make_node("CastLike", ["a", "half"], ["b"]), False),
    ],
)
def test_dropout_and_casts(node: onnx.NodeProto, removed: bool) -> None:
    half = "half" in node.input or _cast_to(node) == TensorProto.FLOAT16
    outputs = [tensor("y", [2, 3], TensorProto.FLOAT16 if half else TensorProto.FLOAT)]
    if "mask" in node.output:
        outputs.append(tensor("mask", [2, 3], TensorProto.BOOL))
    model = onnx_model(
        [helper.make_node("Relu", ["x"], ["a"]), node, helper.make_node("Abs", ["b"], ["y"])],
        [tensor("x", [2, 3])],
        outputs,
        {
            "ratio": np.array(0.5, np.float32),
            "off": np.array(False),
            "on": np.array(True),
            "half": np.zeros(1, np.float16),
        },
    )
    if "on" in node.input:  # training-mode dropout is random: structure only
        result = RemoveIdentity()(model, PassContext())
        assert not result.modified
        return
    result, modified, info = _run(model)
    assert modified == removed
    assert (node.op_type in _ops(result)) != removed
    if removed:
        assert info["ops"] == {node.op_type: 1}


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def test_subgraph_reads_are_rewired() -> None:
    """An If branch reads the Identity's output from the outer scope."""
    branch = helper.make_graph(
        [helper.make_node("Neg", ["b"], ["t"])], "branch", [], [tensor("t", [2, 3])]
    )
    model = onnx_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            _identity("a", "b"),
            helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch),
        ],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        {"cond": np.array(True)},
    )
    result, modified, _ = _run(model)
    assert modified and _ops(result) == ["Relu", "If"]
    assert list(result.graph.node[1].attribute[0].g.node[0].input) == ["a"]


def test_registered_name() -> None:
    assert RemoveIdentity.name == "remove-identity"
