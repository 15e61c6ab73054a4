"""MetaSchedule tuning over RPC with :func:`edgecc.rpc.make_runner`, and its faults.

A tiny matmul is tuned on the farm's x86 board (4 trials); a candidate that hangs (a kernel of
~10^11 steps) is killed by the board at the session timeout, one that crashes the board's
session (a read 1 GiB out of bounds) is an error and the board serves again; with two boards
under one key, killing the busy one mid-run fails only its candidate and the next ones run on
the other; with no board left or the tracker gone, tuning stops with one RPCError line. After
every fault the JSONDatabase files parse line by line and a failed candidate's record has no
run time. No timing assertions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgecc.cli import main
from edgecc.lower.tune import _builder, intrinsics_registrar, meta_schedule_logging
from edgecc.rpc import RPCError, make_runner, runner_errors
from tests.rpc.rpc_farm import LOCAL, free_port, matmul_relu

TIMEOUT = 5.0  # session timeout of the candidates (s)


def matmul():
    from tvm import te

    a, b = te.placeholder((32, 32), name="a"), te.placeholder((32, 32), name="b")
    k = te.reduce_axis((0, 32), name="k")
    c = te.compute((32, 32), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    return te.create_prim_func([a, b, c]).with_attr("global_symbol", "main")


def endless():
    """c[i] = sum of a[(i + k) % 64] over 2^20 k, 2^16 outputs: minutes on any schedule."""
    from tvm import te

    a = te.placeholder((64,), name="a")
    k = te.reduce_axis((0, 1 << 20), name="k")
    c = te.compute((1 << 16,), lambda i: te.sum(a[(i + k) % 64], axis=k), name="c")
    return te.create_prim_func([a, c]).with_attr("global_symbol", "main")


def crashing():
    """c[i] = a[i + 2^28]: reads 1 GiB past a 4-byte buffer (TVM checks no bounds)."""
    from tvm import te

    a = te.placeholder((1,), name="a")
    c = te.compute((1,), lambda i: a[i + (1 << 28)] + 1.0, name="c")
    return te.create_prim_func([a, c]).with_attr("global_symbol", "main")


@pytest.fixture(scope="module")
def register():
    register = intrinsics_registrar("x86_64")
    register()
    return register


def tune(func, runner, work: Path, register, trials: int = 1):
    """MetaSchedule on ``func`` with ``runner``; the database."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    with meta_schedule_logging(), runner_errors(runner):
        return ms.tune_tir(
            func,
            tvm.target.Target({"kind": "llvm", "num-cores": 2}),
            str(work),
            max_trials_global=trials,
            num_trials_per_iter=trials,
            runner=runner,
            builder=_builder("inprocess", register),
            strategy="replay-trace",
            cost_model="random",
        )


def records(work: Path) -> list[list]:
    """Every line of the database files, parsed (fails on a half-written line)."""
    lines = []
    for name in ("database_workload.json", "database_tuning_record.json"):
        lines += [json.loads(line) for line in (work / name).read_text().splitlines() if line]
    return lines


def run_secs(database) -> list:
    return [r.run_secs for r in database.get_all_tuning_records()]


@pytest.fixture(scope="module")
def runner(farm):
    farm.wait("x86")
    return make_runner(farm.tracker, "x86", timeout=TIMEOUT, number=1, min_repeat_ms=0)


def test_tuning_over_rpc_measures_every_candidate(runner, register, tmp_path):
    database = tune(matmul(), runner, tmp_path, register, trials=4)
    times = run_secs(database)
    assert len(times) == 4 and all(t is not None and float(t[0]) > 0 for t in times)
    assert len(records(tmp_path)) == 5  # one workload, four records


def test_a_hanging_candidate_ends_at_the_session_timeout(runner, register, tmp_path, farm):
    start = time.monotonic()
    database = tune(endless(), runner, tmp_path, register)
    assert time.monotonic() - start < 60  # bounded by TIMEOUT, not by the kernel
    assert [t is None or float(t[0]) >= 1e9 for t in run_secs(database)] == [True]
    records(tmp_path)
    farm.wait("x86")  # the board serves again


def test_a_crashing_candidate_fails_alone_and_the_board_comes_back(
    runner, register, tmp_path, farm
):
    database = tune(crashing(), runner, tmp_path, register)
    assert [t is None or float(t[0]) >= 1e9 for t in run_secs(database)] == [True]
    records(tmp_path)
    farm.wait("x86")
    database = tune(matmul(), runner, tmp_path / "after", register, trials=2)
    assert all(t is not None and float(t[0]) < 1e9 for t in run_secs(database))


def runner_input(func, register):
    """A built candidate of ``func`` (its naive schedule) as MetaSchedule's RunnerInput."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    (built,) = _builder("inprocess", register).build(
        [ms.builder.BuilderInput(tvm.IRModule({"main": func}), target)]
    )
    assert built.error_msg is None, built.error_msg
    return ms.runner.RunnerInput(
        built.artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(func)
    )


def test_boards_that_disconnect_mid_run(farm, register, tmp_path):
    boards = farm.pair
    farm.wait("pair", 2)
    runner = make_runner(farm.tracker, "pair", timeout=30, number=1, min_repeat_ms=0)
    (future,) = runner.run([runner_input(endless(), register)])
    deadline = time.monotonic() + 60
    while not any(len(b.descendants()) > 1 for b in boards):  # a session process forked
        assert time.monotonic() < deadline, "no board took the candidate"
        time.sleep(0.1)
    busy = next(b for b in boards if len(b.descendants()) > 1)
    busy.kill()  # the board goes away mid-session
    result = future.result()
    assert result.run_secs is None and "RPCRunner" in result.error_msg
    fast = [runner_input(matmul(), register) for _ in range(2)]
    results = [f.result() for f in runner.run(fast)]  # both on the board still there
    assert all(r.error_msg is None and len(r.run_secs) == 1 for r in results)
    next(b for b in boards if b is not busy).kill()
    with pytest.raises(RPCError, match="no board serves key 'pair'"):
        tune(matmul(), runner, tmp_path, register)
    records(tmp_path)


def test_tracker_gone_stops_tuning_with_one_line(runner, register, tmp_path):
    runner.address = (LOCAL, free_port())  # as if the tracker went down between batches
    with pytest.raises(RPCError, match="is not reachable") as caught:
        tune(matmul(), runner, tmp_path, register)
    assert "\n" not in str(caught.value)
    records(tmp_path)


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_tune_command_over_rpc_end_to_end(capsys, farm, tmp_path):
    """`edgecc tune --rpc-tracker --rpc-key x86`: the candidates are timed on the farm's x86
    board, the records land in --records, the package matches ORT (compile's check)."""
    import onnx

    farm.wait("x86")
    onnx.save(matmul_relu(), tmp_path / "m.onnx")
    code, out, err = cli(
        capsys,
        "--json",
        "tune",
        tmp_path / "m.onnx",
        "--trials",
        "2",
        "--records",
        tmp_path / "records",
        "-o",
        tmp_path / "pkg",
        "--rpc-tracker",
        farm.tracker,
        "--rpc-key",
        "x86",
    )
    assert code == 0, err
    facts = json.loads(out)["tuning"]
    assert facts["kernels_tuned"] and facts["measured"] >= 1
    lines = (tmp_path / "records" / "database_tuning_record.json").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) >= 2
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["library"]["tuning"]["kernels_tuned"] == facts["kernels_tuned"]


def test_tune_command_with_the_tracker_down_is_one_line(capsys, tmp_path):
    import onnx

    onnx.save(matmul_relu(), tmp_path / "m.onnx")
    code, _, err = cli(
        capsys,
        "tune",
        tmp_path / "m.onnx",
        "--trials",
        "2",
        "--records",
        tmp_path / "r",
        "--rpc-tracker",
        f"127.0.0.1:{free_port()}",
        "--rpc-key",
        "x86",
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
