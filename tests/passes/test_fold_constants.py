"""fold-constants: constant subexpressions become initializers; modified exactly when one does.

Numerics: outputs after folding vs ONNX Runtime on the original graph, rtol 1e-6 (the folded
values come from ONNX's reference evaluator, which may round the last bit differently).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.passes.fold_constants import FoldConstants
from edgecc.passes.manager import PassContext
from edgecc.report.compare import run_onnx
from tests.models import onnx_model, tensor

RNG = np.random.default_rng(0)
A = RNG.standard_normal((2, 3)).astype(np.float32)
B = RNG.standard_normal((2, 3)).astype(np.float32)
X = RNG.standard_normal((2, 3)).astype(np.float32)


def _fold(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None, **options: object
) -> tuple[onnx.ModelProto, bool, dict]:
    feeds = feeds if feeds is not None else {"x": X}
    expected = run_onnx(model, feeds)
    original = model.SerializeToString()
    result = FoldConstants(**options)(model, PassContext())
    if not result.modified:
        assert result.model.SerializeToString() == original
    onnx.checker.check_model(result.model, full_check=True)
    outputs = run_onnx(result.model, feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(outputs[name], value, rtol=1e-6, atol=0)
    return result.model, result.modified, result.info


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_nothing_to_fold() -> None:
    model = onnx_model(
        [helper.make_node("Mul", ["x", "a"], ["y"])],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        {"a": A},
    )
    _, modified, info = _fold(model)
    assert not modified and info["folded"] == 0


def test_chain_folds_and_orphans_go() -> None:
    """Constant(float list) -> Reshape, Add(a, b) -> Exp: all of it folds in one run."""
    model = onnx_model(
        [
            helper.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            helper.make_node("Reshape", ["c", "shape"], ["c2"]),
            helper.make_node("Add", ["a", "b"], ["ab"]),
            helper.make_node("Exp", ["ab"], ["e"]),
            helper.make_node("Mul", ["e", "c2"], ["k"]),
            helper.make_node("Mul", ["x", "k"], ["y"]),
        ],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        {"a": A, "b": B, "shape": np.array([2, 3], np.int64), "unrelated": A},
    )
    folded, modified, info = _fold(model)
    assert modified and info["folded"] == 4
    assert _ops(folded) == ["Mul"]
    inits = _inits(folded)
    assert set(inits) == {"k", "unrelated"}  # unused before the pass: not this pass's business
    expected = np.exp(A + B) * np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(inits["k"], expected, rtol=1e-6)
    assert inits["k"].dtype == np.float32


def test_static_shape_folds_dynamic_does_not() -> None:
    def model(dims: list[int | str]) -> onnx.ModelProto:
        return onnx_model(
            [
                helper.make_node("Shape", ["x"], ["s"], start=1),
                helper.make_node("Concat", ["minus1", "s"], ["target"], axis=0),
                helper.make_node("Reshape", ["x", "target"], ["y"]),
            ],
            [tensor("x", dims)],
            [tensor("y", [None, 3])],
            {"minus1": np.array([-1], np.int64)},
        )

    folded, modified, info = _fold(model([2, 3]))
    assert modified and info["ops"] == {"Shape": 1, "Concat": 1}
    assert _ops(folded) == ["Reshape"]
    np.testing.assert_array_equal(_inits(folded)["target"], [-1, 3])
    _, modified, _ = _fold(model(["N", 3]))
    assert not modified


def test_castlike_of_a_constant_folds() -> None:
    """torch's exporter: Expand(CastLike(0, x), Shape(w)) as the zero bias of a bias-free conv."""
    model = onnx_model(
        [
            helper.make_node(
                "Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float64))
            ),
            helper.make_node("CastLike", ["zero", "x"], ["z"]),
            helper.make_node("Shape", ["a"], ["s"], start=0, end=1),
            helper.make_node("Expand", ["z", "s"], ["bias"]),
            helper.make_node("Add", ["x", "bias"], ["y"]),
        ],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        {"a": A[:, :1].T.copy()},
    )
    folded, modified, _ = _fold(model)
    assert modified and _ops(folded) == ["Add"]
    bias = _inits(folded)["bias"]
    assert bias.dtype == np.float32 and bias.shape == (1,) and not bias.any()


@pytest.mark.parametrize(
    "node,reason",
    [
        (helper.make_node("RandomUniformLike", ["a"], ["k"]), "never folded"),
        (helper.make_node("Dropout", ["a"], ["k"]), "never folded"),
        (helper.make_node("DequantizeLinear", ["q", "scale"], ["k"]), "never folded"),
    ],
)
def test_declined_ops(node: onnx.NodeProto, reason: str) -> None:
    model = onnx_model(
        [node, helper.make_node("Mul", ["x", "k"], ["y"])],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        {"a": A, "q": np.ones((2, 3), np.int8), "scale": np.array(0.5, np.float32)},
    )
    if node.op_type == "RandomUniformLike":  # random: compare structure only
        result = FoldConstants()(model, PassContext())
        modified, info = result.modified, result.info
    else:
        _, modified, info = _fold(model)
    assert not modified
    assert [d["op"] for d in info["declined"]] == [node.op_type]
    assert reason in info["declined"][0]["reason"]


def test_graph_output_is_not_folded() -> None:
    model = onnx_model(
        [helper.make_node("Add", ["a", "b"], ["k"]), helper.make_node("Mul", ["x", "k"], ["y"])],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3]), tensor("k", [2, 3])],
        {"a": A, "b": B},
    )
    _, modified, info = _fold(model)
    assert not modified and "graph output" in info["declined"][0]["reason"]


def test_huge_outputs_are_not_folded() -> None:
    """ConstantOfShape/Expand to a big shape: cheaper computed at run time than stored."""
    model = onnx_model(
        [
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["big"],
                value=numpy_helper.from_array(np.array([1.0], np.float32)),
            ),
            helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
            helper.make_node("Mul", ["x", "total"], ["y"]),
        ],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        {"shape": np.array([100, 100], np.int64)},
    )
    _, modified, info = _fold(model, max_elements=1000)
    assert not modified and "larger than 1000" in info["declined"][0]["reason"]
    folded, modified, _ = _fold(model)  # 10k elements: fine by default
    assert modified and _ops(folded) == ["Mul"]
    np.testing.assert_array_equal(_inits(folded)["total"], np.float32(10000))


def test_integer_and_bool_ops_keep_their_types() -> None:
    model = onnx_model(
        [
            helper.make_node("Range", ["zero", "n", "one"], ["r"]),
            helper.make_node("Less", ["r", "three"], ["m"]),
            helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "mf"], ["y"]),
        ],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        {
            "zero": np.array(0, np.int64),
            "n": np.array(3, np.int64),
            "one": np.array(1, np.int64),
            "three": np.array(2, np.int64),
        },
    )
    folded, modified, info = _fold(model)
    assert modified and info["folded"] == 3 and _ops(folded) == ["Mul"]
    np.testing.assert_array_equal(_inits(folded)["mf"], np.array([1, 1, 0], np.float32))


def test_registered_name() -> None:
    assert FoldConstants.name == "fold-constants"


@pytest.mark.parametrize("name", ["resnetish", "mobilenetv2ish", "tiny_transformer", "minilm"])
def test_housekeeping_on_exported_models(name: str) -> None:
    """The default housekeeping passes shrink real exports, keep numbers and are idempotent.

    Tolerance: max abs diff <= 1e-5 vs the torch reference and vs the graph before the passes
    (MiniLM moves by ~1.5e-6: its MatMuls now read pre-transposed weights and pre-computed
    attention scales, so float rounding differs); a second round modifies nothing.
    """
    from edgecc.frontend import load_model
    from edgecc.passes.eliminate_dead import EliminateDead
    from edgecc.passes.infer_shapes import InferShapes
    from edgecc.passes.remove_identity import RemoveIdentity
    from tests.models import load_minilm, make_model

    if name == "minilm":
        module, example = load_minilm()
    else:
        module = make_model(name)
        example = module.example_inputs()
    loaded = load_model(module, example_inputs=example)
    passes = [InferShapes(), FoldConstants(), RemoveIdentity(), EliminateDead()]
    model, ctx = onnx.ModelProto(), PassContext()
    model.CopyFrom(loaded.model)  # passes edit in place (the manager hands them a copy)
    first = []
    for pass_ in passes:
        result = pass_(model, ctx)
        model = result.model
        first.append(result.modified)
    assert first[0] is False  # the frontend already stored inferred shapes
    assert first[1] is True  # every export has shape arithmetic or weight transposes to fold
    assert len(model.graph.node) < len(loaded.model.graph.node)
    onnx.checker.check_model(model, full_check=True)
    outputs = run_onnx(model, loaded.probe_inputs)
    before = run_onnx(loaded.model, loaded.probe_inputs)
    for out in loaded.output_names:
        np.testing.assert_allclose(outputs[out], loaded.reference_outputs[out], rtol=0, atol=1e-5)
        np.testing.assert_allclose(outputs[out], before[out], rtol=0, atol=1e-5)
    assert [p(model, ctx).modified for p in passes] == [False] * 4
