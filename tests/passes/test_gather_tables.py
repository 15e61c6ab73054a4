"""gather_tables: constant Gather tables (embeddings) stored int8 per row, via the ``gather=``
option of ``dynamic-quant`` and ``qdq``; accuracy against float, declines, ``modified``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.passes.insert_qdq import InsertQDQ
from edgecc.passes.manager import PassContext, clone
from edgecc.passes.quantize_dynamic import QuantizeDynamic
from edgecc.report.compare import cosine, run_onnx

V, D = 300, 32


def _model(tied: bool = False, axis1: bool = False) -> onnx.ModelProto:
    """ids -> Gather(emb) + Gather(pos) -> MatMul(w) -> y; ``tied``: emb also read by a MatMul
    (an output projection); ``axis1``: a second Gather of ``cols`` on axis 1."""
    rng = np.random.default_rng(0)
    inits = {
        "emb": (rng.normal(size=(V, D)) * rng.uniform(0.01, 1, (V, 1))).astype(np.float32),
        "pos": rng.normal(size=(20, D)).astype(np.float32) * 0.1,
        "types": rng.normal(size=(2, D)).astype(np.float32) * 0.1,
        "pos_ids": np.arange(8, dtype=np.int64)[None],
        "w": (rng.normal(size=(D, 16)) / 6).astype(np.float32),
        "cols": rng.normal(size=(D, 40)).astype(np.float32),
        "col_ids": np.array([1, 5, 7], np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="word", axis=0),
        helper.make_node("Gather", ["pos", "pos_ids"], ["p"], name="position", axis=0),
        helper.make_node("Gather", ["types", "type_ids"], ["t"], name="token_type", axis=0),
        helper.make_node("Add", ["e", "p"], ["ep"], name="add"),
        helper.make_node("Add", ["ep", "t"], ["h"], name="add_type"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])]
    if tied:
        nodes.append(helper.make_node("MatMul", ["h", "emb_t"], ["logits"], name="tied"))
        nodes.insert(0, helper.make_node("Transpose", ["emb"], ["emb_t"], name="t"))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8, V]))
    if axis1:
        nodes.append(helper.make_node("Gather", ["cols", "col_ids"], ["c"], name="cols", axis=1))
        outputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [D, 3]))
    g = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8]),
            helper.make_tensor_value_info("type_ids", TensorProto.INT64, [1, 8]),
        ],
        outputs,
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


FEEDS = {
    "ids": np.random.default_rng(3).integers(0, V, (1, 8)).astype(np.int64),
    "type_ids": np.zeros((1, 8), np.int64),
}


_TWO_ROWS = "table 'types' has 2 rows < 16: kept float"


def _calib_ctx() -> PassContext:
    batches = [{**FEEDS, "ids": np.random.default_rng(s).integers(0, V, (1, 8))} for s in range(4)]
    return PassContext(calibration=lambda: iter(batches))


def _dq_tables(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Gather node -> the int8 table it now reads through a per-row DequantizeLinear."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for n in model.graph.node:
        dq = producer.get(n.input[0]) if n.op_type == "Gather" else None
        if dq is not None and dq.op_type == "DequantizeLinear":
            assert helper.get_attribute_value(dq.attribute[0]) == 0  # axis 0: one scale per row
            assert inits[dq.input[1]].shape == (inits[dq.input[0]].shape[0],)
            assert not inits[dq.input[2]].any()  # zero point 0
            found[n.name] = inits[dq.input[0]]
    return found


@pytest.mark.parametrize("which", ["dynamic-quant", "qdq"])
def test_tables_int8_per_row_and_outputs_close_to_float(which):
    """Bound: cosine >= 0.9999 of the Gather outputs (per-row int8 rounding alone: each element
    within s_v / 2), and of y >= 0.999 (with the MatMul's own quantization)."""
    model = _model()
    if which == "qdq":
        result = InsertQDQ()(clone(model), _calib_ctx())
    else:
        result = QuantizeDynamic()(clone(model), PassContext())
    assert result.modified
    onnx.checker.check_model(result.model, full_check=True)
    tables = _dq_tables(result.model)
    assert set(tables) == {"word", "position"}
    assert all(t.dtype == np.int8 and np.abs(t).max() == 127 for t in tables.values())
    names = {t.name for t in result.model.graph.initializer}
    assert "emb" not in names and "pos" not in names  # the float tables are gone
    assert [t["node"] for t in result.info["tables_quantized"]] == ["word", "position"]
    ref, got = run_onnx(model, FEEDS), run_onnx(result.model, FEEDS)
    assert cosine(got["y"], ref["y"]) >= 0.999
    probe = clone(result.model)  # the Gather output itself
    probe.graph.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, None))
    emb = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "emb"))
    rows = emb[FEEDS["ids"][0]]
    e = run_onnx(probe, FEEDS)["e"][0]
    assert cosine(e, rows) >= 0.9999
    step = np.abs(rows).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(e - rows) <= step / 2 * (1 + 1e-5))


def test_gather_false_keeps_tables_float():
    model = _model()
    result = QuantizeDynamic(gather=False)(clone(model), PassContext())
    assert result.modified  # the MatMul weight still
    assert _dq_tables(result.model) == {}
    assert "tables_quantized" not in result.info


def test_only_tables_still_modifies():
    """dynamic-quant with nothing but tables (min_size leaves the MatMul weight alone)."""
    result = QuantizeDynamic(min_size=1000)(clone(_model()), PassContext())
    assert result.modified and set(_dq_tables(result.model)) == {"word"}
    reasons = [d["reason"] for d in result.info["declined_tables"]]
    assert reasons == [f"{20 * D} table elements < min_size=1000", _TWO_ROWS]


def test_declines_tied_tables_and_other_axes():
    result = QuantizeDynamic()(clone(_model(tied=True, axis1=True)), PassContext())
    declined = {d["node"]: d["reason"] for d in result.info["declined_tables"]}
    assert declined == {
        "word": "table 'emb' is also read by t",
        "token_type": _TWO_ROWS,
        "cols": "Gather on axis 1, not the row axis 0",
    }
    assert set(_dq_tables(result.model)) == {"position"}


def test_nothing_to_do_is_unchanged():
    model = _model(axis1=True)
    result = QuantizeDynamic(skip=["Gather", "MatMul"])(clone(model), PassContext())
    assert not result.modified
