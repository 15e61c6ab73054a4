"""MetaSchedule's RPC runner for a farm of boards: :func:`make_runner`.

MetaSchedule's ``RPCRunner`` times each candidate in a worker process: it asks the tracker for
a board of the key, uploads the candidate's library, fills its arguments with random data on
the board and runs ``time_evaluator`` there. :class:`FarmRunner` is that runner (same
``RPCConfig``, ``EvaluatorConfig`` and worker function) with one worker per board registered
under the key, so candidates are timed on every board in parallel, and with these faults
bounded:

* a **candidate that hangs** the board: the session is opened with ``session_timeout_sec``, so
  the server kills it then and the candidate's result is an error (no ``run_secs``);
* a candidate that **crashes** the board's session process, or a **board that disconnects**
  mid-run: the connection breaks, that candidate's result is an error, and the next candidates
  go to the boards still registered (TVM's tracker drops a server whose connection closed;
  edgecc's server starts serving again after a crashed session);
* a **board that freezes** without closing its sockets (hung, SIGSTOPped, its network gone
  quiet): the tracker still lists it and its kernel still accepts connections, but it never
  answers. A session it never opens fails after ``min(timeout, 60 s)``
  (:func:`edgecc.rpc.session.session_requester`); one it froze in is killed with its worker at
  the pool timeout (``2 * timeout`` + the answer wait + a margin of ``min(timeout, 30 s)``). Its
  candidate is an error; the tracker never hands out a frozen board again (a server offers
  itself anew only after a session), so the next candidates go to the other boards;
* a worker waits at most ``timeout`` seconds for a free board (TVM's request waits for ever);
* **no board left, or the tracker down**: :meth:`FarmRunner.run` checks the farm before each
  batch and raises :class:`edgecc.rpc.farm.RPCError` (one line), which stops the tuning;
  MetaSchedule's C++ loop hands it on as a ``RuntimeError``, which :func:`runner_errors` turns
  back into the RPCError. A batch whose every candidate was lost to boards that did not answer
  or were never free (every board frozen) stops the tuning the same way, at the next batch
  (``stopped`` is set: edgecc's tuning then stops at once, :mod:`edgecc.lower.tune_remote`).

MetaSchedule commits every measured candidate to its database (one JSON line per record) as
the batch completes; a failed candidate is committed without run times, which MetaSchedule
never picks as a best schedule.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from edgecc.rpc.farm import RPCError, check_boards, parse_address
from edgecc.rpc.session import (
    NO_ANSWER,
    NOT_FREE,
    answer_timeout,
    margin,
    probe_board,
    session_requester,
)

log = logging.getLogger(__name__)

__all__ = ["make_runner", "runner_errors"]

# how MetaSchedule's RPC runner reports a candidate lost to its board, not failed by itself
LOST = (NO_ANSWER, NOT_FREE, "RPCRunner: Timeout, killed after")


def make_runner(
    tracker: str,
    key: str,
    timeout: float = 60.0,
    number: int = 3,
    repeat: int = 1,
    min_repeat_ms: int = 100,
    max_workers: int | None = None,
) -> Any:
    """A MetaSchedule runner that times candidates on the boards of ``key`` at ``tracker``.

    Args:
        tracker: the tracker's ``HOST:PORT``.
        key: the boards' key (``rpi4``).
        timeout: seconds a candidate's session may last on a board (upload, load, run); also
            the longest wait for a free board and, up to 60 s, for a board to answer.
        number: runs averaged into one measurement (MetaSchedule's ``EvaluatorConfig``).
        repeat: measurements per candidate.
        min_repeat_ms: a measurement lasts at least this long (``number`` grows to fill it).
        max_workers: candidates timed at once (default: the boards registered under ``key``).

    Returns:
        A :class:`FarmRunner` (a MetaSchedule ``PyRunner``), to pass as ``runner=`` to
        ``meta_schedule.tune_tir`` / ``tune_tasks`` or edgecc's tuning.

    Raises:
        RPCError: the tracker is down or no board serves ``key``.
        UserInputError: a bad ``tracker`` address or a non-positive count.
    """
    from edgecc.errors import UserInputError

    address = parse_address(tracker)
    if timeout <= 0 or number < 1 or repeat < 1 or min_repeat_ms < 0:
        raise UserInputError(
            "the RPC runner needs timeout > 0, number >= 1, repeat >= 1 and min_repeat_ms >= 0"
        )
    boards = check_boards(address, key)
    workers = max_workers or boards
    log.info("RPC runner: %d workers for %d boards of key %s at %s", workers, boards, key, tracker)
    runner_class = _farm_runner_class()
    return runner_class(address, key, timeout, (number, repeat, min_repeat_ms), workers)


@contextlib.contextmanager
def runner_errors(runner: Any) -> Iterator[None]:
    """Around a tuning run with ``runner``: when it stopped the run (tracker down, no board
    left, every candidate of a batch lost, boards of another architecture), raise its
    :class:`RPCError` (exit 2, one line) instead of the ``RuntimeError`` MetaSchedule or TVM's
    FFI made of it, and also when the run finished without raising but the runner had stopped.
    Any other runner (None, ``LocalRunner``) and any other error pass through unchanged."""
    try:
        yield
    except Exception as err:
        stopped = getattr(runner, "stopped", None)
        if isinstance(stopped, RPCError) and stopped is not err:
            raise stopped from err
        raise
    stopped = getattr(runner, "stopped", None)
    if isinstance(stopped, RPCError):
        raise stopped


_CLASS: Any = None


def _farm_runner_class() -> Any:
    """:class:`FarmRunner`, defined on first use (it derives from TVM classes)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS

    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner
    from tvm.s_tir.meta_schedule.runner.rpc_runner import RPCRunnerFuture
    from tvm.s_tir.meta_schedule.runner.runner import PyRunner
    from tvm.support.popen_pool import PopenPoolExecutor

    @derived_object
    class FarmFuture(RPCRunnerFuture._cls):
        """MetaSchedule's future of one candidate, reporting its outcome to its batch."""

        def __init__(self, future, timeout_sec, batch: _Batch) -> None:
            super().__init__(future, timeout_sec)
            self.batch, self.reported = batch, False

        def result(self):
            result = super().result()
            if not self.reported:
                self.reported = True
                self.batch.report(result.error_msg)
            return result

    @derived_object
    class FarmRunner(RPCRunner._cls):  # the Python class behind MetaSchedule's RPCRunner
        """MetaSchedule's ``RPCRunner`` with a bounded wait for boards and for their answer, a
        pool timeout, and a farm check before each batch (see :mod:`edgecc.rpc.runner`)."""

        def __init__(self, address, key, timeout, evaluator, workers) -> None:
            PyRunner.__init__(self)  # RPCRunner.__init__ would start a pool without timeout
            self.address, self.board_key, self.timeout = address, key, timeout
            self.rpc_config = RPCConfig(
                tracker_host=address[0],
                tracker_port=address[1],
                tracker_key=key,
                session_timeout_sec=timeout,
            )
            number, repeat, min_repeat_ms = evaluator
            self.evaluator_config = EvaluatorConfig(
                number=number,
                repeat=repeat,
                min_repeat_ms=min_repeat_ms,
                enable_cpu_cache_flush=False,
            )
            self.cooldown_sec, self.alloc_repeat = 0.0, 1
            answer = answer_timeout(timeout)
            request = session_requester(wait=timeout, answer=answer)
            self.f_create_session = lambda config: request(
                config.tracker_host,
                config.tracker_port,
                config.tracker_key,
                config.session_timeout_sec,
                config.session_priority,
            )[0]
            self.f_upload_module = self.f_alloc_argument = None
            self.f_run_evaluator = self.f_cleanup = None
            self.max_workers = workers
            self.stopped: RPCError | None = None
            # a worker may wait `timeout` for a board and `answer` for its answer, then run
            # `timeout` on it; a board frozen mid-session is given up a margin later
            self.pool_timeout = 2 * timeout + answer + margin(timeout)
            self.pool = PopenPoolExecutor(max_workers=workers, timeout=self.pool_timeout)

        def check_machine(self, arch: str, target_name: str) -> None:
            """Fail in one line when a board of the key is not an ``arch`` machine (an rpi4
            tuning sent to x86 boards would fail every candidate); boards that do not say what
            they are (a plain TVM server) pass."""
            from edgecc.runtime import _MACHINES

            try:
                where, info = probe_board(self.address, self.board_key, self.timeout)
                machine = str(info.get("machine") or "")
                if machine and _MACHINES.get(machine.lower(), machine.lower()) != arch:
                    raise RPCError(
                        f"board {where} of key {self.board_key!r} is a {machine} machine, but "
                        f"{target_name} candidates are built for {arch}: use a key of {arch} "
                        "boards (`edgecc rpc status` lists the keys)"
                    )
            except RPCError as err:
                # raised inside edgecc's record pass, it reaches the caller as TVM's RuntimeError
                # (the FFI keeps only the message): runner_errors gets it back from here
                self.stopped = err
                raise

        def run(self, runner_inputs):
            if self.stopped is not None:
                raise self.stopped
            try:
                check_boards(self.address, self.board_key)
            except RPCError as err:
                self.stopped = err  # MetaSchedule's C++ loop re-raises it as a RuntimeError
                log.info("RPC runner stops: %s", err)
                raise
            batch = _Batch(self, len(runner_inputs))
            return [FarmFuture(f.future, f.timeout_sec, batch) for f in super().run(runner_inputs)]

    _CLASS = FarmRunner
    return FarmRunner


class _Batch:
    """The candidates of one :meth:`FarmRunner.run`: when every one of them was lost to a board
    (no answer, never free, killed at the pool timeout), the runner stops the tuning."""

    def __init__(self, runner: Any, size: int) -> None:
        self.runner, self.size = runner, size
        self.lost: list[str] = []
        self.done = 0

    def report(self, error: str | None) -> None:
        self.done += 1
        reason = _lost_reason(error)
        if reason is not None:
            self.lost.append(reason)
        everything_lost = self.size > 0 and len(self.lost) == self.size == self.done
        if everything_lost and self.runner.stopped is None:
            self.runner.stopped = RPCError(
                f"tuning stopped: no board of key {self.runner.board_key!r} measured any of the "
                f"last {self.size} candidate(s): {self.lost[-1]}"
            )
            log.info("RPC runner stops: %s", self.runner.stopped)


def _lost_reason(error: str | None) -> str | None:
    """The line of a runner error that says the board was lost (None: measured, or the
    candidate's own failure)."""
    if not error:
        return None
    for line in error.strip().splitlines():
        for marker in LOST:
            index = line.find(marker)
            if index >= 0:
                return line[index:].strip()
    return None
