"""Tuning records (edgecc.lower.tune): tune writes records with the rule's schedule as baseline,
compile applies them and still matches ONNX Runtime, a second model reuses shared kernels,
truncated record files are repaired, an interrupted tuning leaves valid records.

Tiny convolutions and 2 trials per kernel keep MetaSchedule to seconds. No timing assertions:
whether tuning pays is measured by ``scripts/benchmark.py --tune-trials``.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from lower_models import fused_kernels
from onnx import TensorProto, helper

import edgecc
from edgecc.errors import ToolchainError, UserInputError
from edgecc.lower.tune import (
    META_SCHEDULE_LOGGER,
    RECORDS,
    WORKLOADS,
    _rule_schedule,
    intrinsics_registrar,
    meta_schedule_logging,
    open_records,
    repair_records,
)

TRIALS = 2


def conv_model(path: Path, second: bool, seed: int) -> Path:
    """x[1,8,12,12] -> Conv 3x3 8->8 (pad 1) -> Relu; with ``second``, then a 1x1 conv 8->4 and a
    Sigmoid: the 3x3 conv (the anchor block shared by both models) gets the same shape."""
    rng = np.random.default_rng(seed)

    def weight(name: str, shape: list[int]):
        return helper.make_tensor(name, TensorProto.FLOAT, shape, rng.standard_normal(shape) * 0.3)

    inits = [weight("w1", [8, 8, 3, 3]), weight("b1", [8])]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["y" if not second else "r1"]),
    ]
    shape = [1, 8, 12, 12]
    if second:
        inits += [weight("w2", [4, 8, 1, 1])]
        nodes += [
            helper.make_node("Conv", ["r1", "w2"], ["c2"]),
            helper.make_node("Sigmoid", ["c2"], ["y"]),
        ]
        shape = [1, 4, 12, 12]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """Model A tuned into a record folder, then model B tuned into the same folder."""
    root = tmp_path_factory.mktemp("tune")
    records = root / "records"
    first = edgecc.compile(
        conv_model(root / "a.onnx", False, 0),
        "x86",
        out=root / "a",
        tuning_records=records,
        tune_trials=TRIALS,
    )
    lines_after_first = len((records / RECORDS).read_text().splitlines())
    second = edgecc.compile(
        conv_model(root / "b.onnx", True, 1),
        "x86",
        out=root / "b",
        tuning_records=records,
        tune_trials=TRIALS,
    )
    return root, records, first, second, lines_after_first


@pytest.mark.slow
def test_tune_writes_records_and_the_build_applies_them(tuned):
    root, records, first, _, lines = tuned
    facts = first.manifest["library"]["tuning"]
    assert (records / WORKLOADS).stat().st_size > 0 and lines >= TRIALS + 1
    assert facts["records"] == str(records) and facts["explicit"] is True
    assert facts["kernels_tuned"] and facts["baselines_measured"] == len(facts["kernels_tuned"])
    assert facts["measured"] == TRIALS * len(facts["kernels_tuned"])
    assert set(facts["kernels_tuned"]) | set(facts["kernels_rules"]) == set(
        first.manifest["library"]["schedules"]["kernels"]
    )
    assert any("not byte-for-byte reproducible" in n for n in first.manifest["library"]["notes"])


@pytest.mark.slow
def test_compile_with_records_applies_them_without_measuring(tuned, tmp_path):
    root, records, first, _, _ = tuned
    before = (records / RECORDS).read_bytes()
    pkg = edgecc.compile(root / "a.onnx", "x86", out=tmp_path / "a", tuning_records=records)
    facts = pkg.manifest["library"]["tuning"]
    assert facts["kernels_tuned"] == first.manifest["library"]["tuning"]["kernels_tuned"]
    assert "measured" not in facts and (records / RECORDS).read_bytes() == before
    assert facts["records_sha256"] and any(
        "reproducible given the same record files" in n for n in pkg.manifest["library"]["notes"]
    )
    # the same library as the tuned build (which therefore computes the same)
    assert pkg.manifest["library"]["sha256"] == first.manifest["library"]["sha256"]
    res = pkg.check(pkg.run())  # against ONNX Runtime on the package graph
    assert res["passed"], res


@pytest.mark.slow
def test_second_model_reuses_the_shared_conv(tuned):
    _, records, first, second, lines_after_first = tuned
    a, b = first.manifest["library"]["tuning"], second.manifest["library"]["tuning"]
    assert b["kernels_reused"] >= 1  # B's 3x3 conv (another epilogue) matched A's by anchor
    assert b["measured"] < TRIALS * len(b["kernels_tuned"])  # fresh records would measure all
    new = len((records / RECORDS).read_text().splitlines()) - lines_after_first
    assert new == b["measured"] + b["baselines_measured"]
    assert len(b["kernels_tuned"]) > len(a["kernels_tuned"])


@pytest.mark.slow
def test_the_rule_schedule_is_a_record_of_every_tuned_workload(tuned):
    """Rules as the baseline: each workload's records hold the rule's trace, so its best record
    is at worst the rule's schedule (as measured)."""
    from edgecc.lower.schedules import CpuParams, rules_for
    from edgecc.lower.tune import _task_module, tuning_target
    from edgecc.targets import get_target

    _, records, first, _, _ = tuned
    target = get_target("x86")
    tvm_target = tuning_target(target)
    kernels = fused_kernels(onnx.load(str(first.path / "model.onnx")))
    database = open_records(records)
    rules = rules_for(CpuParams.of(target))
    checked = 0
    for name in first.manifest["library"]["tuning"]["kernels_tuned"]:
        func = kernels[name]
        _, rule_sch = _rule_schedule(func, tvm_target, rules)
        workload = database.commit_workload(_task_module(func))
        traces = [str(r.trace) for r in database.get_top_k(workload, 100)]
        assert str(rule_sch.trace) in traces
        checked += 1
    assert checked >= 1


@pytest.mark.slow
def test_truncated_record_file_is_repaired(tuned, tmp_path, caplog):
    _, records, _, _, _ = tuned
    copy = tmp_path / "records"
    shutil.copytree(records, copy, ignore=shutil.ignore_patterns("logs"))
    text = (copy / RECORDS).read_text()
    lines = text.splitlines()
    (copy / RECORDS).write_text(text[: len(text) - len(lines[-1]) // 2 - 1])  # half a line
    with caplog.at_level(logging.WARNING, logger="edgecc.lower.tune"):
        database = open_records(copy)
    assert "dropped 1 truncated or invalid line" in caplog.text
    assert len(database) == len(lines) - 1
    assert repair_records(copy) == 0  # the rewritten files are clean
    assert all(json.loads(line) for line in (copy / RECORDS).read_text().splitlines())


@pytest.mark.slow
def test_interrupted_tuning_keeps_valid_records(tmp_path):
    """Ctrl-C as the CLI sees it: an interrupt raised at a progress step, after the first kernel
    of model B was tuned; the records so far load and hold that kernel's measurements."""
    records = tmp_path / "records"

    def progress(line: str) -> None:
        if line.startswith("kernel 1/"):
            raise KeyboardInterrupt

    with pytest.raises((KeyboardInterrupt, Exception)):  # TVM may re-wrap it crossing C++
        edgecc.compile(
            conv_model(tmp_path / "b.onnx", True, 1),
            "x86",
            out=tmp_path / "b",
            tuning_records=records,
            tune_trials=TRIALS,
            progress=progress,
        )
    assert not (tmp_path / "b").exists()
    database = open_records(records)
    assert len(database) == TRIALS + 1  # the first kernel's baseline and candidates


def test_refusals(tmp_path):
    model = conv_model(tmp_path / "a.onnx", False, 0)
    with pytest.raises(ToolchainError, match="rpi4 is not a x86_64 CPU target"):
        edgecc.compile(model, "rpi4", out=tmp_path / "p", tune_trials=2)
    with pytest.raises(ToolchainError, match="CPU targets only"):
        edgecc.compile(model, "jetson-orin", out=tmp_path / "p", tuning_records=tmp_path)
    with pytest.raises(UserInputError, match="no such folder"):
        edgecc.compile(model, "x86", out=tmp_path / "p", tuning_records=tmp_path / "none")


def test_default_records_dir_follows_edgecc_cache(monkeypatch, tmp_path):
    from edgecc.lower.tune import default_records_dir
    from edgecc.targets import get_target

    monkeypatch.setenv("EDGECC_CACHE", str(tmp_path))
    assert default_records_dir(get_target("x86")) == tmp_path / "tuning" / "x86"


def test_registrar_imports_only_the_target_intrinsics():
    code = (
        "import sys\nfrom edgecc.lower.tune import intrinsics_registrar\n"
        "intrinsics_registrar('x86_64')()\nimport tvm.s_tir.tensor_intrin\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('tvm.s_tir.tensor_intrin.'))\n"
        "print(','.join(loaded))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )  # this checkout's edgecc
    assert proc.returncode == 0, proc.stderr
    assert "tvm.s_tir.tensor_intrin.x86" in proc.stdout.strip().split(",")
    assert "tvm.s_tir.tensor_intrin.cuda" not in proc.stdout
    assert callable(intrinsics_registrar("aarch64"))


def test_meta_schedule_logging_leaves_no_state_behind(tmp_path):
    """The cause of the whole-file failure: a handler left on MetaSchedule's logger (here an
    unnamed one) made its next ``create_loggers`` fail with 'NoneType' has no 'format'."""
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    top = logging.getLogger(META_SCHEDULE_LOGGER)
    left = logging.NullHandler()  # no name, as a handler left by other code may have
    top.addHandler(left)
    try:
        for run in ("first", "second"):  # two tunings in one process, as the file's two cases
            with meta_schedule_logging():
                loggers = get_loggers_from_work_dir(str(tmp_path / run), ["fused_matmul"])
                loggers[0].info("a task log line")
                assert (tmp_path / run / "logs").is_dir()
            assert top.handlers == [left]  # only what was there before
            assert loggers[0].handlers == []  # the task logger's file handler is closed
        with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'format'"):
            get_loggers_from_work_dir(str(tmp_path / "bare"), ["fused_matmul"])  # without it
    finally:
        for handler in top.handlers[:]:
            top.removeHandler(handler)
            handler.close()


@pytest.mark.slow
def test_merge_records_unions_two_folders_and_the_build_applies_them(tuned, tmp_path):
    """Model B's records merged into a copy of model A's first tuning (and A's again: no
    duplicates): the merged folder serves B's build with no measurement."""
    from edgecc.lower.tune import merge_records

    root, records, _, second, _ = tuned
    merged = tmp_path / "merged"
    shutil.copytree(records, merged, ignore=shutil.ignore_patterns("logs"))
    total = len(open_records(records).get_all_tuning_records())
    assert merge_records([records], merged) == total  # the same records again: none added
    empty = tmp_path / "empty"
    assert merge_records([merged], empty) == total
    assert len((empty / RECORDS).read_text().splitlines()) == total
    pkg = edgecc.compile(root / "b.onnx", "x86", out=tmp_path / "b", tuning_records=empty)
    assert (
        pkg.manifest["library"]["tuning"]["kernels_tuned"]
        == (second.manifest["library"]["tuning"]["kernels_tuned"])
    )
    assert pkg.manifest["library"]["sha256"] == second.manifest["library"]["sha256"]
