"""eliminate-dead: dead nodes, unused initializers and stale value_info go; the interface stays.

Removing dead code never changes numbers: outputs are compared with ONNX Runtime on the original
graph for exact equality.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from edgecc.passes.eliminate_dead import EliminateDead
from edgecc.passes.manager import PassContext
from edgecc.report.compare import run_onnx
from tests.models import onnx_model, tensor

W = np.arange(6, dtype=np.float32).reshape(2, 3)
FEEDS = {"x": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)}


def _run(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool, dict]:
    expected = run_onnx(model, FEEDS)
    result = EliminateDead()(model, PassContext())
    onnx.checker.check_model(result.model, full_check=True)
    outputs = run_onnx(result.model, FEEDS)
    assert list(outputs) == list(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(outputs[name], value)
    return result.model, result.modified, result.info


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_nothing_dead() -> None:
    model = onnx_model(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        {"w": W},
    )
    _, modified, info = _run(model)
    assert not modified and info["nodes"] == 0


def test_dead_chain_its_constants_and_value_info_go() -> None:
    model = onnx_model(
        [
            helper.make_node("Mul", ["x", "w_dead"], ["a"]),
            helper.make_node("Neg", ["a"], ["b"]),
            helper.make_node("Abs", ["x"], ["y"]),
        ],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        {"w_dead": W, "w_unused": W},
        value_info=[tensor("a", [2, 3]), tensor("b", [2, 3])],
    )
    result, modified, info = _run(model)
    assert modified
    assert _ops(result) == ["Abs"]
    assert not result.graph.initializer
    assert not result.graph.value_info
    assert info == {"nodes": 2, "ops": {"Mul": 1, "Neg": 1}, "initializers": 2, "value_info": 2}


@pytest.mark.parametrize("what", ["initializer", "value_info"])
def test_only_unused_constants_or_stale_shapes(what: str) -> None:
    extra = (
        {"initializers": {"w_unused": W}}
        if what == "initializer"
        else {"value_info": [tensor("gone", [2, 3])]}
    )
    model = onnx_model(
        [helper.make_node("Abs", ["x"], ["y"])],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        **extra,
    )
    result, modified, _ = _run(model)
    assert modified and _ops(result) == ["Abs"]
    assert not result.graph.initializer and not result.graph.value_info


def test_interface_is_kept() -> None:
    """Unused graph inputs and initializers that are graph inputs (defaults) stay."""
    model = onnx_model(
        [helper.make_node("Abs", ["x"], ["y"])],
        [tensor("x", [2, 3]), tensor("unused", [2, 3]), tensor("w", [2, 3])],
        [tensor("y", [2, 3])],
        {"w": W},
    )
    result = EliminateDead()(model, PassContext())
    assert not result.modified
    assert [i.name for i in result.model.graph.input] == ["x", "unused", "w"]
    assert [t.name for t in result.model.graph.initializer] == ["w"]


def test_node_with_one_live_output_stays() -> None:
    model = onnx_model(
        [helper.make_node("Split", ["x", "sizes"], ["s0", "s1"], axis=1)],
        [tensor("x", [2, 3])],
        [tensor("s0", [2, 1])],
        {"sizes": np.array([1, 2], np.int64)},
    )
    result, modified, _ = _run(model)
    assert not modified and _ops(result) == ["Split"]


def test_subgraph_reads_keep_their_producers() -> None:
    """An If branch reads `a` from the outer scope: Neg producing it is live."""
    then_branch = helper.make_graph(
        [helper.make_node("Abs", ["a"], ["t"])], "then", [], [tensor("t", [2, 3])]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Mul", ["a", "w"], ["e"])], "else", [], [tensor("e", [2, 3])]
    )
    model = onnx_model(
        [
            helper.make_node("Neg", ["x"], ["a"]),
            helper.make_node("Relu", ["x"], ["dead"]),
            helper.make_node(
                "If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch
            ),
        ],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        {"cond": np.array(False), "w": W},
    )
    result, modified, info = _run(model)
    assert modified and info["ops"] == {"Relu": 1}
    assert _ops(result) == ["Neg", "If"]
    assert {t.name for t in result.graph.initializer} == {"cond", "w"}  # w is read by the branch
