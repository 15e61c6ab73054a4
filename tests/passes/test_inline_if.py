"""fold-constants inlines an ``If`` whose condition is constant after folding.

Numerics: outputs after the pass vs ONNX Runtime on the original graph, rtol 1e-6 (as in
test_fold_constants.py: folded values come from ONNX's reference evaluator).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgecc.passes.fold_constants import FoldConstants
from edgecc.passes.manager import PassContext, clone
from edgecc.report.compare import run_onnx
from tests.models import onnx_model, tensor

X = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
W = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)


def _reference_evaluator(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    outs = ReferenceEvaluator(model).run(None, feeds)
    return dict(zip([o.name for o in model.graph.output], outs, strict=True))


def _fold(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], reference=run_onnx
) -> tuple[onnx.ModelProto, dict]:
    expected = reference(model, feeds)
    result = FoldConstants()(clone(model), PassContext())
    assert result.modified
    onnx.checker.check_model(result.model, full_check=True)
    got = run_onnx(result.model, feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=0, err_msg=name)
    return result.model, result.info


def _ops(graph: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in graph.node]


def _branch(name: str, nodes: list[onnx.NodeProto], outputs: list[str], **inits) -> onnx.GraphProto:
    return helper.make_graph(
        nodes,
        name,
        [],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()],
    )


# then: y = x * w + 1 (outer-scope x and w, a branch initializer); else: y = x - w
THEN = _branch(
    "then",
    [
        helper.make_node("Mul", ["x", "w"], ["t_mul"]),
        helper.make_node("Add", ["t_mul", "one"], ["t"]),
    ],
    ["t"],
    one=np.ones((), np.float32),
)
ELSE = _branch("else", [helper.make_node("Sub", ["x", "w"], ["e"])], ["e"])


@pytest.mark.parametrize("flag", [True, False])
def test_if_on_a_constant_node_inlines_the_taken_branch(flag: bool) -> None:
    model = onnx_model(
        [
            helper.make_node(
                "Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.array(flag))
            ),
            helper.make_node("If", ["c"], ["y"], name="mode", then_branch=THEN, else_branch=ELSE),
        ],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        {"w": W},
    )
    folded, info = _fold(model, {"x": X})
    assert info["inlined_if"] == 1
    assert _ops(folded.graph) == (["Constant", "Mul", "Add"] if flag else ["Sub"])
    assert folded.graph.node[-1].output[0] == "y"  # the branch writes the If's output directly
    assert "c" not in {t.name for t in folded.graph.initializer} | {
        o for n in folded.graph.node for o in n.output
    }


def test_if_on_a_folded_expression_of_an_initializer() -> None:
    """``If(Equal(sample_rate, 16000))``: the condition folds first, then the If inlines."""
    model = onnx_model(
        [
            helper.make_node("Equal", ["sample_rate", "sr16k"], ["is16k"]),
            helper.make_node("If", ["is16k"], ["y"], name="sr", then_branch=THEN, else_branch=ELSE),
            helper.make_node("Relu", ["y"], ["z"]),
        ],
        [tensor("x", [2, 3])],
        [tensor("z", [2, 3])],
        {"w": W, "sample_rate": np.array(8000, np.int64), "sr16k": np.array(16000, np.int64)},
    )
    folded, info = _fold(model, {"x": X})
    assert info["inlined_if"] == 1 and info["ops"] == {"Equal": 1}
    assert _ops(folded.graph) == ["Sub", "Relu"]
    assert {t.name for t in folded.graph.initializer} == {"w"}  # sample_rate, sr16k orphaned


def test_nested_subgraphs_and_outputs_are_renamed() -> None:
    """The taken branch holds a nested If (runtime condition) whose branches read a branch
    tensor; it returns a branch constant and returns one tensor twice (both via Identity)."""
    inner_then = _branch("it", [helper.make_node("Neg", ["b_mid"], ["it_out"])], ["it_out"])
    inner_else = _branch("ie", [helper.make_node("Identity", ["b_mid"], ["ie_out"])], ["ie_out"])
    then = _branch(
        "then",
        [
            helper.make_node("Add", ["x", "w"], ["b_mid"]),
            helper.make_node(
                "If", ["flag"], ["b_in"], then_branch=inner_then, else_branch=inner_else
            ),
        ],
        ["b_in", "k", "b_in"],
        k=np.full((2, 3), 3.0, np.float32),
    )
    other = _branch(
        "else",
        [helper.make_node("Identity", ["x"], ["o1"])],
        ["o1", "o1", "o1"],
    )
    model = onnx_model(
        [
            helper.make_node("Constant", [], ["c"], value_int=1),
            helper.make_node("Cast", ["c"], ["cb"], to=TensorProto.BOOL),
            helper.make_node(
                "If",
                ["cb"],
                ["y1", "y2", "y3"],
                name="outer",
                then_branch=then,
                else_branch=other,
            ),  # fmt: skip
        ],
        [tensor("x", [2, 3]), tensor("flag", [], TensorProto.BOOL)],
        [tensor(n, [2, 3]) for n in ("y1", "y2", "y3")],
        {"w": W},
    )
    for flag in (True, False):
        # ONNX Runtime 1.32 returns zeros for a branch tensor listed twice as a branch output:
        # ONNX's reference evaluator is the reference here
        feeds = {"x": X, "flag": np.array(flag)}
        folded, info = _fold(model, feeds, _reference_evaluator)
        assert info["inlined_if"] == 1
    names = [o for n in folded.graph.node for o in n.output]
    assert len(names) == len(set(names))
    nested = next(n for n in folded.graph.node if n.op_type == "If")
    mid = next(n for n in folded.graph.node if n.op_type == "Add").output[0]
    assert mid != "b_mid" and mid.startswith("outer/then/")
    then_g, else_g = (a.g for a in nested.attribute)
    assert then_g.node[0].input[0] == mid and else_g.node[0].input[0] == mid


def test_runtime_condition_is_left_alone() -> None:
    model = onnx_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=THEN, else_branch=ELSE)],
        [tensor("x", [2, 3]), tensor("c", [], TensorProto.BOOL)],
        [tensor("y", [2, 3])],
        {"w": W},
    )
    result = FoldConstants()(clone(model), PassContext())
    assert not result.modified and result.info["inlined_if"] == 0


def test_condition_with_several_elements_is_declined() -> None:
    model = onnx_model(
        [helper.make_node("If", ["c"], ["y"], name="bad", then_branch=THEN, else_branch=ELSE)],
        [tensor("x", [2, 3])],
        [tensor("y", [2, 3])],
        {"w": W, "c": np.array([True, False])},
    )
    result = FoldConstants()(clone(model), PassContext())
    assert not result.modified
    assert {"node": "bad", "op": "If", "reason": "condition has 2 elements"} in result.info[
        "declined"
    ]


def _sample_rate_switch(sample_rate: int) -> onnx.ModelProto:
    """Conv, then ``If(sample_rate == 16000)``: 16 kHz passes the frames on, otherwise they are
    repeated (a stand-in for resampling), so the branches' output shapes differ; a constant
    scalar initializer holds the sample rate."""
    rng = np.random.default_rng(0)
    then = _branch("then", [helper.make_node("Relu", ["c"], ["t"])], ["t"])
    other = _branch("else", [helper.make_node("Concat", ["c", "c"], ["e"], axis=2)], ["e"])
    for g, length in ((then, 10), (other, 20)):
        g.output[0].type.tensor_type.shape.CopyFrom(
            helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 8, length]).tensor_type.shape
        )
    return onnx_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1]),
            helper.make_node("Equal", ["sample_rate", "sr16k"], ["is16k"]),
            helper.make_node("If", ["is16k"], ["y"], then_branch=then, else_branch=other),
            helper.make_node("Sigmoid", ["y"], ["z"]),
        ],
        [tensor("x", [1, 4, 10])],
        [tensor("z", [1, 8, "frames"])],
        {
            "w": rng.standard_normal((8, 4, 3)).astype(np.float32),
            "sample_rate": np.array(sample_rate, np.int64),
            "sr16k": np.array(16000, np.int64),
        },
    )


@pytest.mark.parametrize("sample_rate", [8000])
def test_model_with_a_sample_rate_if_compiles_for_x86(sample_rate: int, tmp_path) -> None:
    """Before: TVM imported the If and failed in VM codegen (internal error). Tolerance vs ONNX
    Runtime on the original model: rtol 1e-5, atol 1e-6."""
    import edgecc

    model = _sample_rate_switch(sample_rate)
    onnx.save(model, str(tmp_path / "sr.onnx"))
    pkg = edgecc.compile(tmp_path / "sr.onnx", "x86", out=tmp_path / "pkg")
    x = np.random.default_rng(2).standard_normal((1, 4, 10)).astype(np.float32)
    got = pkg.run({"x": x})["z"]
    expected = run_onnx(model, {"x": x})["z"]
    assert got.shape == (1, 8, 10 if sample_rate == 16000 else 20)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_cond_on_a_buffer_compiles_for_x86(tmp_path) -> None:
    """``torch.cond(self.sample_rate == 16000, ...)`` exports an If on a constant; tolerance vs
    torch: rtol 1e-5, atol 1e-5."""
    import torch

    import edgecc

    class Switch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
            self.register_buffer("sample_rate", torch.tensor(8000))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(
                self.sample_rate == 16000,
                lambda t: torch.relu(t) * 2.0,
                lambda t: torch.sigmoid(t),
                (self.conv(x),),
            )

    torch.manual_seed(0)
    model = Switch().eval()
    x = torch.randn(1, 4, 10)
    pkg = edgecc.compile(model, "x86", example_inputs=(x,), out=tmp_path / "pkg")
    assert "If" not in {
        n.op_type for n in onnx.load(str(tmp_path / "pkg" / "model.onnx")).graph.node
    }
    got = pkg.run({pkg.input_names[0]: x.numpy()})[pkg.output_names[0]]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
