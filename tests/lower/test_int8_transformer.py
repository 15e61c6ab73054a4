"""End to end: the tiny transformer (token embedding, two encoder layers) through ``qdq``: every
quantized layer integer, attention's Q K^T and P V on the ``int8-batch-matmul`` rule, the
embedding table stored int8, outputs within one output step of ONNX Runtime (optimisations off)
on the same QDQ graph (the step of the package's check rule: one int8 step of the output's
range on the probe input)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import edgecc
from edgecc.cli import cli
from tests.lower.int8_graphs import ort_run
from tests.models import make_model

pytestmark = pytest.mark.slow  # one transformer compile (minutes on the loaded 2-core machine)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    model = make_model("tiny_transformer")
    work = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    calib = work / "calib.npz"
    np.savez(calib, input_ids=rng.integers(0, model.vocab, (16, 16)).astype(np.int64))
    pkg = edgecc.compile(
        model, "x86", example_inputs=model.example_inputs(), passes="qdq", calib=str(calib),
        out=work / "pkg",
    )  # fmt: skip
    return model, pkg


def test_every_layer_integer_attention_on_its_rule_table_int8(package):
    _, pkg = package
    execution = pkg.manifest["int8_execution"]
    layers = execution["layers"]
    assert all(e["execution"] == "integer" for e in layers), execution
    assert all(e.get("kernel") for e in layers), layers
    attention = [e for e in layers if "activation x activation" in e["detail"]]
    assert len(attention) == 4, layers  # Q K^T and P V in each of the two layers
    assert {e["rule"] for e in attention} == {"int8-batch-matmul"}, attention
    assert {e["rule"] for e in layers if e not in attention} <= {"int8-matmul", "matmul"}
    assert [t["execution"] for t in execution["tables"]] == ["int8 table"]
    assert "1 of 1 Gather tables stored as int8" in execution["summary"]
    out = CliRunner().invoke(cli, ["inspect", str(pkg.path)])
    assert out.exit_code == 0, out.output
    assert "(Gather): int8 table, int8 table [100, 32] stored (one scale per row)" in out.output


def test_within_one_step_of_onnx_runtime(package):
    import tvm
    from tvm import relax

    model, pkg = package
    graph = onnx.load(str(pkg.path / "model.onnx"))
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(pkg.library)), tvm.cpu())
    (step,) = pkg.manifest["check"]["steps"].values()
    rng = np.random.default_rng(5)
    for _ in range(4):
        ids = rng.integers(0, model.vocab, model.example_shape).astype(np.int64)
        got = vm["main"](tvm.runtime.tensor(ids))
        got = (got.numpy() if hasattr(got, "numpy") else got[0].numpy()).astype(np.float64)
        (ref,) = ort_run(graph, {pkg.input_names[0]: ids})
        assert np.abs(got - ref).max() <= step + 1e-6, np.abs(got - ref).max() / step
    assert pkg.check(pkg.run())["passed"]
