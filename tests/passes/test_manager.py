"""Pass manager: pipeline text round-trips, instruments, --disable-pass, tagging, errors."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.errors import EdgeccError, PassError, UserInputError
from edgecc.passes.dump import DumpInstrument, format_table
from edgecc.passes.manager import (
    PassContext,
    PassManager,
    PassResult,
    PassSpec,
    TimingInstrument,
    format_pipeline,
    node_origin,
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
    with pytest.raises(
        UserInputError, match="test-append-neg: unknown option 'bogus'; its options: times"
    ):
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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prune(ratio=abc)", "prune: option ratio=abc must be a finite number"),
        ("prune(round_to=abc)", "prune: option round_to=abc must be an integer"),
        ("prune(round_to=2.5)", "prune: option round_to=2.5 must be an integer"),
        ("prune(use_bn=maybe)", "prune: option use_bn=maybe must be true or false"),
        ("prune(ratio=0.3\u200b)", r"prune: option ratio='0.3\\u200b' must be a finite number"),
        ("prune(ratio=nan)", "prune: option ratio=nan must be a finite number"),
        ("prune(overrides={a:x})", r"overrides=\{a:x\} must be a map \{a name:a finite number\}"),
        ("prune(skip=[1,2])", r"skip=\[1,2\] must be a list \[...\] of a name"),
        ("lowrank(rank=True)", "lowrank: option rank=True must be an integer or None"),
        ("lowrank(min_size=abc)", "lowrank: option min_size=abc must be an integer"),
        ("dynamic-quant(min_size=abc)", "dynamic-quant: option min_size=abc must be an integer"),
        ("sparsify(amount=abc)", "sparsify: option amount=abc must be a finite number"),
        ("prune(ratio=0.3,ratio=0.5)", "prune: option 'ratio' given twice"),
        ("prune(nope=1)", "prune: unknown option 'nope'; its options: ratio, criterion"),
        ("prune(skip=" + "[" * 1000 + "]" * 1000 + ")", "nested more than 8 deep"),
        ("prune(=1)", "needs the form key=value"),
        ("prune(ratio=0.3))(", "unbalanced brackets"),
    ],
)
def test_malformed_options_are_one_line_user_errors(text: str, message: str) -> None:
    """Options are checked against each pass's declared types before anything runs."""
    with pytest.raises(UserInputError, match=message) as err:
        PassManager(parse_pipeline(text))
    assert "\n" not in str(err.value) and err.value.exit_code == 2


def test_repeated_option_in_spec_data_is_refused() -> None:
    with pytest.raises(UserInputError, match="given twice"):
        PassSpec("prune", (("ratio", 0.1), ("ratio", 0.2))).build()


def test_valid_options_of_every_type_build() -> None:
    text = (
        "prune(ratio=0,round_to=8,use_bn=false,skip=conv1,overrides={conv1:0.5}),"
        "lowrank(rank=None,energy=0.9),qdq(keep_float=[Conv],outputs=true),sparsify(amount=1)"
    )
    assert [type(p).__name__ for p in PassManager(parse_pipeline(text)).passes] == [
        "PruneChannels",
        "SplitLowRank",
        "InsertQDQ",
        "Sparsify",
    ]


def _mutants(seed: int, count: int) -> list[str]:
    """Seeded character-level mutants of valid pipeline texts."""
    rng = np.random.default_rng(seed)
    seeds = [
        "fold-bn,prune(ratio=0.3,round_to=8,skip=[conv1],overrides={conv2:0.1})",
        "lowrank(rank=4,min_size=16,skip=[Gemm]),dynamic-quant(min_size=0)",
        "sparsify(amount=0.5,scope=global),prune(use_bn=true,criterion=l2)",
        "qdq(method=percentile,percentile=99.9,keep_float=[fc],bins=256)",
    ]
    alphabet = list("()[]{},=:'\"-_. 0123456789aeilnrstx") + ["\u200b", "é", "True", "None"]
    out = list(seeds)  # the unmutated texts must run
    for _ in range(count - len(seeds)):
        text = list(seeds[rng.integers(len(seeds))])
        for _ in range(rng.integers(1, 3)):
            pos = int(rng.integers(len(text) + 1))
            op = rng.integers(3)
            if op == 0 and text:  # delete
                del text[min(pos, len(text) - 1)]
            elif op == 1:  # insert
                text.insert(pos, alphabet[rng.integers(len(alphabet))])
            elif text:  # replace
                text[min(pos, len(text) - 1)] = alphabet[rng.integers(len(alphabet))]
        out.append("".join(text))
    return out


def _small_cnn() -> onnx.ModelProto:
    """conv1 -> Relu -> conv2 -> Relu -> GlobalAveragePool -> Flatten -> fc (Gemm)."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.standard_normal((8, 3, 3, 3)),
        "b1": rng.standard_normal(8),
        "w2": rng.standard_normal((8, 8, 3, 3)),
        "b2": rng.standard_normal(8),
        "wf": rng.standard_normal((4, 8)),
        "bf": rng.standard_normal(4),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_fuzzed_pipeline_texts_give_user_errors_or_success() -> None:
    """A few hundred seeded mutants: parsing, building and running on a small CNN either
    succeed or raise a user error (exit 2) with a one-line message, never another exception
    (a PassError is exit 1: an internal error)."""
    model = _small_cnn()
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    ctx = PassContext(calibration=lambda: iter(calib), probe_inputs=calib[0])
    outcomes = {"ok": 0, "user error": 0, "ran": 0}
    for text in _mutants(seed=6, count=300):
        try:
            manager = PassManager(parse_pipeline(text))
            assert parse_pipeline(format_pipeline(manager.specs)) == manager.specs, text
            outcomes["ok"] += 1
            manager.run(model, ctx)
            outcomes["ran"] += 1
        except EdgeccError as err:
            assert err.exit_code == 2 and "\n" not in str(err), (text, err)
            outcomes["user error"] += 1
    assert outcomes["ran"] >= 8 and outcomes["user error"] >= 100, outcomes


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("qdq,prune(ratio=0.3)", "weights are already quantized .*run prune before qdq"),
        ("qdq,lowrank(rank=2)", "weights are already quantized .*run lowrank before qdq"),
        ("qdq,sparsify", "weights are already quantized .*run sparsify before qdq"),
        ("qdq,dynamic-quant", "already quantized by an earlier qdq/dynamic-quant"),
        ("qdq,qdq", "already quantized by an earlier qdq/dynamic-quant"),
        ("fold-bn", "no BatchNormalization in the graph"),
        ("prune(ratio=0.05)", "ratio 0.05 removes no channel from the 2 prunable groups"),
        ("lowrank(rank=2,min_size=100000)", "all 3 candidates declined .*conv1"),
        ("eliminate-dead", "no dead node"),
        ("remove-identity", "no no-op node"),
        ("shape-inference,shape-inference", "every shape is already inferred"),
    ],
)
def test_a_pass_that_changes_nothing_says_why(text: str, reason: str, caplog) -> None:
    model = _small_cnn()
    calib = [{"x": np.ones((1, 3, 8, 8), np.float32)}]
    pm = PassManager(parse_pipeline(text))
    with caplog.at_level("INFO", logger="edgecc.passes.manager"):
        pm.run(model, PassContext(calibration=lambda: iter(calib)))
    last = pm.records[-1]
    assert not last.modified
    assert re.search(reason, last.info["no_change"]), last.info["no_change"]
    line = next(r for r in caplog.records if "no change" in r.getMessage())
    assert re.search(reason, line.getMessage())
    housekeeping = last.spec.name in ("eliminate-dead", "remove-identity", "shape-inference")
    assert line.levelname == ("INFO" if housekeeping else "WARNING")


def test_effective_pipeline_is_logged_and_useless_disable_is_dropped(caplog) -> None:
    with caplog.at_level("INFO", logger="edgecc.passes.manager"):
        pm = PassManager(parse_pipeline("test-append-neg,fold-bn"), disabled=["fold-bn", "prune"])
        pm.run(_model())
    messages = [r.getMessage() for r in caplog.records]
    assert "pipeline: test-append-neg (disabled: fold-bn)" in messages
    assert any("--disable-pass prune has no effect" in m for m in messages)
    assert pm.disabled == {"fold-bn"} and [s.name for s in pm.effective] == ["test-append-neg"]
    assert pm.uses("test-append-neg") and not pm.uses("fold-bn")


def test_rewritten_nodes_name_the_pass_that_rewrote_them() -> None:
    out = PassManager(parse_pipeline("prune(ratio=0.5)")).run(_small_cnn())
    origins = {n.name: node_origin(n) for n in out.graph.node}
    assert origins["conv1"] == "input, rewritten by prune"
    assert origins["conv2"] == "input, rewritten by prune"  # its input channels shrank
    assert origins["relu1"] == "input"
    assert origins["fc"] == "input, rewritten by prune"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("qdq(keep_float=[nope])", "qdq: keep_float: no node or op type named 'nope'"),
        ("dynamic-quant(skip=nope)", "dynamic-quant: skip: no node or op type named 'nope'"),
        ("lowrank(rank=2,skip=[conv1,nope])", "lowrank: skip: no node or op type named 'nope'"),
        ("sparsify(skip=[Conv])", "sparsify: skip: no node named 'Conv'"),
        ("prune(skip=[nope])", "prune: no node named 'nope'"),
    ],
)
def test_names_matching_no_node_are_user_errors(text: str, message: str) -> None:
    calib = [{"x": np.ones((1, 3, 8, 8), np.float32)}]
    with pytest.raises(UserInputError, match=message) as err:
        PassManager(parse_pipeline(text)).run(
            _small_cnn(), PassContext(calibration=lambda: iter(calib))
        )
    assert err.value.exit_code == 2


def test_summary_table_stays_aligned_with_long_pass_texts() -> None:
    long = "prune(ratio=0.3,skip=[a_very_long_node_name,another_one],overrides={x:0.1})"
    rows = [
        {"step": "000_input", "pass": "input", "modified": None, "nodes": 7, "cosine": None},
        {
            "step": "001_fold-constants",
            "pass": "fold-constants",
            "modified": False,
            "nodes": 7,
            "cosine": 1.0,
        },
        {"step": "002_prune", "pass": long, "modified": True, "nodes": 12345, "cosine": 0.98},
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["step", "modified", "nodes", "cosine", "pass"]
    ends = {
        line.rindex(word) + len(word)
        for line, word in zip(lines, ["cosine", "-", "1.000000", "0.980000"], strict=True)
    }
    assert len(ends) == 1  # the numbers end in one column whatever the pass text's length
    starts = {
        line.rindex(p)
        for line, p in zip(lines, ["pass", "input", "fold-constants", long], strict=True)
    }
    assert len(starts) == 1 and lines[3].endswith(long)
    tsv = format_table(rows, tsv=True).splitlines()
    assert tsv[0].split("\t") == ["step", "pass", "modified", "nodes", "cosine"]
