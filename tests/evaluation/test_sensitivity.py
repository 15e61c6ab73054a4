"""Per-layer sensitivity, the only= pass option, and the --max-drop accuracy budget."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

import edgecc
from edgecc.cli import main
from edgecc.errors import CheckFailedError, UserInputError
from edgecc.evaluation.budget import fit_budget
from edgecc.evaluation.data import open_data
from edgecc.evaluation.runners import OnnxRunner
from edgecc.passes import PassContext, PassManager, parse_pipeline
from edgecc.passes.calibration import load_calibration
from tests.evaluation.nets import FRAGILE, mlp_onnx, save_digits, train_mlp

SCHEMA = {"model", "pass", "metric", "baseline", "layers"}
ROW = {"layer", "op", "metric", "drop", "params"}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sens")
    layers = train_mlp()
    onnx.save(mlp_onnx(layers, fragile=True, batch=1), str(root / "fragile.onnx"))
    onnx.save(mlp_onnx(layers, batch=1), str(root / "plain.onnx"))
    save_digits(root / "test.npz")
    save_digits(root / "calib.npz", "train", labels=False)
    return {"root": root, "layers": layers}


def ctx_for(model: onnx.ModelProto, root: Path) -> PassContext:
    ctx = PassContext()
    ctx.calibration, ctx.calibration_source = load_calibration(str(root / "calib.npz"), model)
    return ctx


def test_qdq_only_quantizes_the_named_layer(work: dict) -> None:
    model = onnx.load(str(work["root"] / "plain.onnx"))
    manager = PassManager(parse_pipeline("qdq(only=[gemm1])"))
    out = manager.run(model, ctx_for(model, work["root"]))
    assert manager.records[-1].info["quantized_nodes"] == ["gemm1"]
    readers = {n.name: list(n.input) for n in out.graph.node}
    assert any(i.endswith("_dequantized") for i in readers["gemm1"])
    assert not any(i.endswith("_dequantized") for i in readers["gemm2"] + readers["gemm3"])


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("qdq(only=[nope])", "qdq: only: no node named 'nope'"),
        ("prune(only=[nope])", "prune: no node named 'nope'"),
        ("lowrank(only=[nope])", "lowrank: only: no node named 'nope'"),
        ("qdq(only=3)", "qdq: option only=3 must be"),
    ],
)
def test_only_refuses_unknown_names_and_bad_types(work: dict, pipeline: str, message: str) -> None:
    model = onnx.load(str(work["root"] / "plain.onnx"))
    with pytest.raises(UserInputError, match=message.replace("[", r"\[")):
        PassManager(parse_pipeline(pipeline)).run(model, ctx_for(model, work["root"]))


@pytest.mark.parametrize(
    "pipeline, info_key",
    [("prune(ratio=0.5,only=[gemm2])", "groups"), ("lowrank(rank=2,only=[gemm2])", "layers")],
)
def test_prune_and_lowrank_only(work: dict, pipeline: str, info_key: str) -> None:
    model = onnx.load(str(work["root"] / "plain.onnx"))
    manager = PassManager(parse_pipeline(pipeline))
    out = manager.run(model, PassContext())
    info = manager.records[-1].info
    if info_key == "groups":
        assert [g["sources"] for g in info["groups"]] == [["gemm2"]]
        shapes = {t.name: list(t.dims) for t in out.graph.initializer}
        assert (shapes["w1"], shapes["w2"], shapes["w3"]) == ([64, 48], [48, 16], [16, 10])
    else:
        assert [row["nodes"] for row in info["layers"]] == [["gemm2"]]
        assert {n.name for n in out.graph.node} >= {"gemm1", "gemm3", "gemm2_lowrank_1"}


def test_sensitivity_ranks_the_fragile_layer_first(work: dict, tmp_path: Path, capsys) -> None:
    root = work["root"]
    res = edgecc.sensitivity(
        root / "fragile.onnx", root / "test.npz", "qdq", calib=str(root / "calib.npz")
    )
    assert set(res) >= SCHEMA and res["pass"] == "qdq" and res["metric"] == "top1"
    assert all(set(r) == ROW for r in res["layers"])
    assert [r["layer"] for r in res["layers"]][0] == FRAGILE
    assert sorted({r["layer"] for r in res["layers"]}) == ["gemm1", "gemm2", "gemm3"]
    drops = [r["drop"] for r in res["layers"]]
    assert drops == sorted(drops, reverse=True) and drops[0] > 20 and abs(drops[1]) < 3
    for r in res["layers"]:
        assert r["drop"] == pytest.approx(res["baseline"] - r["metric"])
    assert {r["layer"]: r["params"] for r in res["layers"]} == {
        "gemm1": 64 * 48 + 48,
        "gemm2": 48 * 32 + 32,
        "gemm3": 32 * 10 + 10,
    }
    # the CLI writes the same table as JSON
    out = tmp_path / "sens.json"
    args = ["sensitivity", str(root / "fragile.onnx"), "--data", str(root / "test.npz")]
    code = main([*args, "--calib", str(root / "calib.npz"), "--passes", "qdq", "-o", str(out)])
    text = capsys.readouterr().out
    written = json.loads(out.read_text())
    assert code == 0 and written["layers"][0]["layer"] == FRAGILE and FRAGILE in text
    assert [r["drop"] for r in written["layers"]] == pytest.approx(drops)


def test_sensitivity_prune_and_agreement(work: dict) -> None:
    """prune(ratio=0.5) without labels: ranked by 1 - cosine against the float graph."""
    root = work["root"]
    nolabels = save_digits(root / "nolabels.npz", labels=False)
    res = edgecc.sensitivity(root / "plain.onnx", nolabels, "prune(ratio=0.5)")
    assert res["metric"] == "agreement" and res["baseline"] == pytest.approx(1.0)
    assert sorted(r["layer"] for r in res["layers"]) == ["gemm1", "gemm2"]
    for r in res["layers"]:
        assert r["drop"] == pytest.approx(1 - r["metric"]) and 0 < r["drop"] < 1


def bound(model: onnx.ModelProto, root: Path):
    return open_data(root / "test.npz", OnnxRunner(model).inputs)


def test_budget_keeps_the_fragile_layer_float(work: dict) -> None:
    root = work["root"]
    model = onnx.load(str(root / "fragile.onnx"))
    specs = parse_pipeline("qdq")
    budget = fit_budget(model, specs, ctx_for(model, root), bound(model, root), max_drop=1.0)
    assert budget.kept_float == [FRAGILE] and budget.spared is None
    assert budget.specs[0].text() == f"qdq(keep_float=[{FRAGILE}])"
    assert budget.sensitivity["layers"][0]["layer"] == FRAGILE
    trials = {t["exempt"]: t["drop"] for t in budget.trials}
    assert trials[3] == 0.0  # all float: the float graph itself
    assert trials[0] > 20  # everything quantized misses the budget by far
    assert trials[1] <= 1.0
    final = PassManager(budget.specs).run(model, ctx_for(model, root))
    record = budget.record(final)
    acc = record["accuracy"]
    assert set(acc) == {"metric", "float", "final", "drop", "max_drop", "samples", "data"}
    assert acc["drop"] <= 1.0 and acc["max_drop"] == 1.0 and acc["samples"] == 450
    assert record["kept_float"] == [FRAGILE] and "sensitivity" in record


def test_budget_spares_prune_layers(work: dict) -> None:
    root = work["root"]
    model = onnx.load(str(root / "plain.onnx"))
    specs = parse_pipeline("prune(ratio=0.9)")
    budget = fit_budget(model, specs, PassContext(), bound(model, root), max_drop=3.0)
    assert budget.kept_float is None and budget.spared
    spared = [s["layer"] for s in budget.spared]
    assert spared == [r["layer"] for r in budget.sensitivity["layers"]][: len(spared)]
    assert budget.specs[0].text().startswith("prune(ratio=0.9,overrides={")
    final = PassManager(budget.specs).run(model, PassContext())
    assert budget.record(final)["accuracy"]["drop"] <= 3.0


def test_budget_that_cannot_be_met_fails(work: dict) -> None:
    root = work["root"]
    model = onnx.load(str(root / "plain.onnx"))
    specs = parse_pipeline("lowrank(rank=1),qdq")
    with pytest.raises(CheckFailedError, match="even with all 6 layers of qdq exempt"):
        fit_budget(model, specs, ctx_for(model, root), bound(model, root), max_drop=0.5)


def test_compile_max_drop_cli(work: dict, tmp_path: Path, capsys) -> None:
    """compile --max-drop writes the manifest keys; eval of the package (TVM) agrees."""
    root = work["root"]
    out = tmp_path / "pkg"
    args = ["compile", str(root / "fragile.onnx"), "-o", str(out), "--passes", "qdq"]
    args += ["--calib", str(root / "calib.npz"), "--data", str(root / "test.npz")]
    code = main([*args, "--max-drop", "1"])
    text = capsys.readouterr().out
    assert code == 0, text
    manifest = json.loads((out / "manifest.json").read_text())
    acc = manifest["accuracy"]
    assert acc["drop"] <= 1 and acc["metric"] == "top1" and manifest["kept_float"] == [FRAGILE]
    assert manifest["sensitivity"]["layers"][0]["layer"] == FRAGILE
    assert f"kept float: 1 layers ({FRAGILE})" in text and "drop" in text
    assert manifest["pipeline"].endswith(f"qdq(keep_float=[{FRAGILE}])")
    # one package run: labels give top-1; metric agreement compares with the source the
    # manifest records (the package's own runner, TVM)
    res = edgecc.evaluate(out, root / "test.npz", metric="agreement")
    assert res["runner"].startswith("package") and res["samples"] == 450
    assert abs(res["top1"] - acc["final"]) <= 100 / 450 + 1e-9  # TVM vs ORT: <= 1 sample
    assert res["reference"] == str((root / "fragile.onnx").resolve())
    assert res["agreement"]["cosine"] > 0.99 and res["value"] == res["agreement"]["cosine"]


@pytest.mark.parametrize(
    "extra, code_wanted, message",
    [
        (["--max-drop", "1"], 2, "--max-drop needs --data"),
        (["--max-drop", "0.5", "--data", "DATA", "--passes", "lowrank(rank=1),qdq"], 4, "even"),
    ],
)
def test_compile_max_drop_errors(
    work: dict, tmp_path: Path, capsys, extra: list[str], code_wanted: int, message: str
) -> None:
    root = work["root"]
    out = tmp_path / "pkg"
    extra = [str(root / "test.npz") if e == "DATA" else e for e in extra]
    args = ["compile", str(root / "plain.onnx"), "-o", str(out), "--calib", str(root / "calib.npz")]
    code = main([*args, *extra])
    err = capsys.readouterr().err
    assert code == code_wanted and message in err and not out.exists()


@pytest.mark.slow
@pytest.mark.emulation
def test_eval_rpi4_package_under_emulation(work: dict, tmp_path: Path) -> None:
    """An aarch64 package runs its stacked batches in one emulated process."""
    root = work["root"]
    pkg = edgecc.compile(root / "plain.onnx", "rpi4", out=tmp_path / "rpi4", passes="")
    res = edgecc.evaluate(pkg.path, root / "test.npz", samples=24)
    ref = edgecc.evaluate(root / "plain.onnx", root / "test.npz", samples=24)
    assert res["top1"] == pytest.approx(ref["top1"]) and res["top5"] == pytest.approx(ref["top5"])
