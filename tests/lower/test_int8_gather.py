"""Lookups in int8 tables (edgecc.lower.int8.commute's ``take``) against ONNX Runtime.

``Gather(DequantizeLinear(T_q, s, zp, axis=0), idx)``: per-row scales (int8, zero point 0, as
``gather_tables`` writes), per-row uint8 zero points, and one per-tensor scale. The lowering
gathers int8 rows and dequantizes only those, with the one float32 multiply DequantizeLinear
does, so every output must equal ONNX Runtime's (optimisations off) bit for bit (tolerance 0).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.lower.int8_graphs import ort_run

V, D = 500, 24
KINDS = ("rows", "u8", "one")


def _graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {
        "t_rows": rng.integers(-127, 128, (V, D)).astype(np.int8),
        "s_rows": rng.uniform(0.001, 0.05, V).astype(np.float32),
        "z_rows": np.zeros(V, np.int8),
        "t_u8": rng.integers(0, 256, (V, D)).astype(np.uint8),
        "s_u8": rng.uniform(0.001, 0.05, V).astype(np.float32),
        "z_u8": rng.integers(0, 256, V).astype(np.uint8),
        "t_one": rng.integers(-127, 128, (V, D)).astype(np.int8),
        "s_one": np.float32(0.0173),
        "z_one": np.int8(3),
    }
    nodes = []
    for kind in KINDS:
        axis = {} if kind == "one" else {"axis": 0}
        names = [f"t_{kind}", f"s_{kind}", f"z_{kind}"]
        nodes.append(helper.make_node("DequantizeLinear", names, [f"d_{kind}"], **axis))
        nodes.append(helper.make_node("Gather", [f"d_{kind}", "ids"], [f"y_{kind}"], axis=0))
    graph = helper.make_graph(
        nodes,
        "gather",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 7])],
        [helper.make_tensor_value_info(f"y_{k}", TensorProto.FLOAT, [2, 7, D]) for k in KINDS],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=10)
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import tvm
    from tvm import relax

    from edgecc.lower.build import lower
    from edgecc.targets import get_target

    model = _graph()
    lib = lower(
        model, get_target("x86"), {"ids": (2, 7)}, {"ids": "int64"},
        tmp_path_factory.mktemp("gather") / "lib.so",
    )  # fmt: skip
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib.path)), tvm.cpu())
    return model, vm, lib


def test_gathered_rows_equal_onnx_runtime_bit_for_bit(built):
    import tvm

    model, vm, _ = built
    ids = np.random.default_rng(1).integers(-V, V, (2, 7)).astype(np.int64)  # negative ones too
    ref = ort_run(model, {"ids": ids})
    got = [g.numpy() for g in vm["main"](tvm.runtime.tensor(ids))]
    for r, g in zip(ref, got, strict=True):
        assert g.shape == r.shape
        np.testing.assert_array_equal(g, r)


def test_every_lookup_is_recorded_and_the_tables_stay_int8(built):
    _, _, lib = built
    takes = [d for d in lib.details["int8_ops"] if d["op"] == "take"]
    assert len(takes) == 3 and all(d["integer"] for d in takes), takes
    assert sum("one scale per row" in d["detail"] for d in takes) == 2
    # three int8 tables of V x D bytes; float32 copies would be 3 * 4 * V * D alone
    assert lib.path.stat().st_size < 3 * 4 * V * D


def test_manifest_and_inspect_list_the_tables(built):
    from edgecc.lower.int8.layers import compact_lines, int8_execution

    model, _, lib = built
    ex = int8_execution(model, lib.details["int8_ops"], lib.details.get("schedules"))
    assert [t["node"] for t in ex["tables"]] == [f"y_{k}" for k in KINDS]
    assert {t["execution"] for t in ex["tables"]} == {"int8 table"}
    assert "3 of 3 Gather tables stored as int8" in ex["summary"]
    lines = compact_lines(ex)
    assert any(
        line.startswith("  y_rows (Gather): int8 table, int8 table [500, 24]") for line in lines
    )
