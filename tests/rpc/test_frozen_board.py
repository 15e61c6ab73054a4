"""A board that freezes without closing its sockets (tests/rpc/rpc_farm.py's FrozenBoard: it
is registered with the tracker and accepts connections, like a SIGSTOPped server, but never
answers).

* Among working boards, the frozen one costs one candidate (an error after the answer
  deadline); tuning goes on, on the other board, and the tracker never hands the frozen one
  out again.
* Alone under its key, `edgecc tune` stops with one error line in bounded time, `run` and
  `bench` give one line each; the record files stay valid.

Small timeouts (2-4 s) keep the tests short; the bounds asserted are generous multiples of
them (they check that nothing waits for ever, not a speed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgecc.cli import main
from edgecc.lower.tune import intrinsics_registrar
from edgecc.rpc import count_boards, make_runner
from tests.rpc.rpc_farm import FrozenBoard, matmul_relu
from tests.rpc.test_tuning import matmul, records, run_secs, tune

TIMEOUT = 4.0  # session timeout and answer deadline of the tuning test (s)


@pytest.fixture
def frozen(farm, request) -> Iterator[FrozenBoard]:
    """A frozen board under the key given as the test's parameter (default ``frozen``); gone
    from the tracker at the end."""
    key = getattr(request, "param", "frozen")
    farm.wait("x86")  # registered first: the tracker hands it out before the frozen board
    before = count_boards(farm.address, key)
    board = FrozenBoard(farm.address, key)
    board.key = key
    try:
        yield board
    finally:
        board.close()
        deadline = time.monotonic() + 30
        while count_boards(farm.address, key) > before:  # the tracker dropped it
            assert time.monotonic() < deadline, "the tracker still lists the frozen board"
            time.sleep(0.1)


def lines(path: Path) -> list:
    """The JSON lines of a record folder (fails on a half-written line); [] if none."""
    if not (path / "database_workload.json").exists():
        return []
    return records(path)


@pytest.mark.parametrize("frozen", ["x86"], indirect=True)
def test_tuning_goes_on_when_one_board_of_the_key_freezes(farm, frozen, tmp_path):
    register = intrinsics_registrar("x86_64")
    register()
    assert count_boards(farm.address, "x86") == 2  # the x86 board, then the frozen one
    # one worker (one TVM import less): the candidates go to the boards in turn
    runner = make_runner(farm.tracker, "x86", TIMEOUT, number=1, min_repeat_ms=0, max_workers=1)
    start = time.monotonic()
    database = tune(matmul(), runner, tmp_path, register, trials=3)
    assert time.monotonic() - start < 20 * TIMEOUT  # bounded: nothing waited for the board
    assert len(frozen.accepted) == 1  # one candidate went to it, none after
    times = run_secs(database)
    lost = [t for t in times if t is None or float(t[0]) >= 1e9]
    assert len(times) == 3 and len(lost) == 1
    assert runner.stopped is None
    assert len(records(tmp_path)) == 4  # one workload, three records, all parse


@pytest.mark.parametrize("frozen", ["frozen-tune"], indirect=True)
def test_tune_with_only_a_frozen_board_stops_with_one_line(capsys, farm, frozen, tmp_path):
    import onnx

    onnx.save(matmul_relu(), tmp_path / "m.onnx")
    start = time.monotonic()
    code = main(
        [
            "-q", "tune", str(tmp_path / "m.onnx"), "--trials", "2",
            "--records", str(tmp_path / "records"), "--rpc-tracker", farm.tracker,
            "--rpc-key", frozen.key, "--rpc-timeout", "2",
        ]
    )  # fmt: skip
    _, err = capsys.readouterr()
    assert time.monotonic() - start < 120  # compile + one answer deadline, not for ever
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("edgecc: error:")]
    assert errors == [err.strip().splitlines()[-1]], err
    # the board asked what it is before tuning (tune_remote.check_boards_fit) never answers
    assert f"no answer from board 127.0.0.1:{frozen.port} (key {frozen.key})" in errors[0]
    assert len(frozen.accepted) == 1
    # the files parse; the lost baseline is not a record (records begin with a workload index)
    assert not [r for r in lines(tmp_path / "records") if isinstance(r[0], int)]


def test_run_and_bench_on_a_frozen_board_give_one_line(capsys, monkeypatch, farm, frozen, packages):
    monkeypatch.setenv("EDGECC_RPC_TIMEOUT", "2")
    board = ["--rpc-tracker", farm.tracker, "--rpc-key", frozen.key]
    expected = {
        "run": "no answer from board",  # the tracker hands the frozen board out once...
        "bench": f"no board of key '{frozen.key}' became free within 2 s",  # ...and never again
    }
    for command, message in expected.items():
        start = time.monotonic()
        code = main([command, str(packages["x86"]), *board])
        _, err = capsys.readouterr()
        assert time.monotonic() - start < 30, command
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("edgecc: error: ") and message in err, err
    assert len(frozen.accepted) == 1
    monkeypatch.setenv("EDGECC_RPC_TIMEOUT", "soon")
    code = main(["run", str(packages["x86"]), *board])
    _, err = capsys.readouterr()
    assert code == 2 and "EDGECC_RPC_TIMEOUT='soon'" in err


def test_a_batch_lost_to_frozen_boards_stops_the_tuning():
    """FarmRunner's rule (no board needed): a batch whose every candidate was lost to a board
    (no answer, never free, killed at the pool timeout) stops the tuning with one RPCError line
    (edgecc.rpc.runner_errors raises it even when MetaSchedule's loop went on); a batch with
    one measured candidate, or with a candidate's own failure, does not."""
    from types import SimpleNamespace

    from edgecc.rpc import RPCError, runner_errors
    from edgecc.rpc.runner import _Batch

    runner = SimpleNamespace(stopped=None, board_key="rpi4")
    lost = "RPCRunner: An exception occurred\nTraceback ...\nRuntimeError: no answer from board "
    batch = _Batch(runner, 2)
    batch.report(lost + "1.2.3.4:9090 (key rpi4) within 2 s: it froze")
    batch.report(None)  # measured
    batch = _Batch(runner, 1)
    batch.report("RPCRunner: An exception occurred\nRuntimeError: segfault")  # its own failure
    assert runner.stopped is None
    with pytest.raises(RPCError) as caught, runner_errors(runner):  # the loop went on
        batch = _Batch(runner, 2)
        batch.report(lost + "1.2.3.4:9090 (key rpi4) within 2 s: it froze")
        batch.report("RPCRunner: Timeout, killed after 14.0 seconds")
    text = str(caught.value)
    assert "\n" not in text and text.startswith("tuning stopped: no board of key 'rpi4'")
    assert text.endswith("RPCRunner: Timeout, killed after 14.0 seconds")
    with pytest.raises(RPCError) as again, runner_errors(runner):
        raise RuntimeError("MetaSchedule's loop re-raised the runner's error")
    assert again.value is runner.stopped
