"""Pass manager: pipeline text round-trips, instruments, --disable-pass, tagging, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.errors import PassError, UserInputError
from edgecc.passes.dump import DumpInstrument
from edgecc.passes.manager import (
    PassContext,
    PassManager,
    PassResult,
    PassSpec,
    TimingInstrument,
    format_pipeline,
    node_tag,
    parse_pipeline,
    register,
)


@register("test-append-neg")
class AppendNeg:
    """Test pass: appends Neg->Neg after the output (numerically a no-op)."""

    def __init__(self, times: int = 1):
        self.times = times

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        g = model.graph
        out = g.output[0].name
        for _ in range(self.times):
            mid, new = out + "_n1", out + "_n2"
            for n in g.node:
                n.output[:] = [mid if o == out else o for o in n.output]
            g.node.extend(
                [
                    helper.make_node("Neg", [mid], [out + "_x"], name=f"neg_{len(g.node)}"),
                    helper.make_node("Neg", [out + "_x"], [out]),
                ]
            )
            del new
        return PassResult(model, self.times > 0)


@register("test-boom")
class Boom:
    """Test pass that always fails."""

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        raise RuntimeError("kaboom")


def _model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    "text",
    [
        "fold-bn",
        "fold-bn,prune(ratio=0.3,round_to=8),qdq(method=entropy)",
        "prune(skip=[conv1,conv2],overrides={layer1:0.5})",
        "lowrank(energy=0.95),qdq(method=percentile,percentile=99.99,keep_float=[Gemm])",
    ],
)
def test_pipeline_text_round_trips(text: str) -> None:
    specs = parse_pipeline(text)
    assert format_pipeline(specs) == text
    assert parse_pipeline(format_pipeline(specs)) == specs


def test_pipeline_values_are_typed() -> None:
    (spec,) = parse_pipeline("prune(ratio=0.3,round_to=8,criterion=l2,use_bn=False)")
    assert dict(spec.options) == {"ratio": 0.3, "round_to": 8, "criterion": "l2", "use_bn": False}


@pytest.mark.parametrize("bad", ["prune(ratio)", "prune(ratio=0.3", "9bad"])
def test_bad_pipeline_text_is_a_user_error(bad: str) -> None:
    with pytest.raises(UserInputError):
        parse_pipeline(bad)


def test_unknown_pass_and_bad_option_fail_before_running() -> None:
    with pytest.raises(UserInputError, match="unknown pass 'nope'"):
        PassManager(parse_pipeline("nope"))
    with pytest.raises(UserInputError, match="bad options for pass 'test-append-neg'"):
        PassManager(parse_pipeline("test-append-neg(bogus=1)"))
    with pytest.raises(UserInputError, match="--disable-pass 'nope'"):
        PassManager([], disabled=["nope"])


def test_new_nodes_are_tagged_with_their_pass_and_input_untouched() -> None:
    model = _model()
    before = model.SerializeToString()
    out = PassManager(parse_pipeline("test-append-neg")).run(model)
    assert model.SerializeToString() == before  # the caller's model is not edited
    tags = {n.op_type: node_tag(n) for n in out.graph.node}
    assert tags == {"MatMul": "input", "Neg": "test-append-neg"}
    assert len({n.name for n in out.graph.node}) == len(out.graph.node)  # unique names


def test_disable_pass_skips_and_records() -> None:
    pm = PassManager(
        parse_pipeline("test-append-neg,test-append-neg(times=2)"), disabled=["test-append-neg"]
    )
    out = pm.run(_model())
    assert len(out.graph.node) == 1
    assert [r.skipped for r in pm.records] == [True, True]


def test_failure_names_the_pass_and_those_before() -> None:
    pm = PassManager(parse_pipeline("test-append-neg,test-boom"))
    with pytest.raises(
        PassError, match=r"pass 2 test-boom failed: RuntimeError: kaboom \(after: test-append-neg\)"
    ):
        pm.run(_model())


def test_dump_instrument_writes_files_and_rows_agree(tmp_path) -> None:
    x = {"x": np.ones((1, 2), np.float32)}
    ref = {"y": (x["x"] @ np.arange(6, dtype=np.float32).reshape(2, 3))}
    dump = DumpInstrument(tmp_path, ref)
    timing = TimingInstrument()
    out = PassManager(parse_pipeline("test-append-neg"), [dump, timing]).run(
        _model(), PassContext(probe_inputs=x)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000_input.onnx",
        "000_input.txt",
        "001_test-append-neg.onnx",
        "001_test-append-neg.txt",
        "summary.json",
        "summary.tsv",
    ]
    dumped = onnx.load(str(tmp_path / "001_test-append-neg.onnx"))
    onnx.checker.check_model(dumped)
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["nodes"] for r in rows] == [1, 3] == [1, len(out.graph.node)]
    assert (
        rows[1]["modified"] is True and rows[1]["max_abs_diff"] == 0.0 and rows[1]["cosine"] == 1.0
    )
    assert rows[0]["macs"] == 6 and rows[0]["params"] == 6
    assert "# from test-append-neg" in (tmp_path / "001_test-append-neg.txt").read_text()
    assert [name for name, _ in timing.rows] == ["001_test-append-neg"]


def test_passspec_text_quotes_odd_strings() -> None:
    spec = PassSpec("qdq", (("keep_float", ["a b", "Conv"]),))
    assert parse_pipeline(spec.text()) == [spec]
