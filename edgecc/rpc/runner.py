"""MetaSchedule's RPC runner for a farm of boards: :func:`make_runner`.

MetaSchedule's ``RPCRunner`` times each candidate in a worker process: it asks the tracker for
a board of the key, uploads the candidate's library, fills its arguments with random data on
the board and runs ``time_evaluator`` there. :class:`FarmRunner` is that runner (same
``RPCConfig``, ``EvaluatorConfig`` and worker function) with one worker per board registered
under the key, so candidates are timed on every board in parallel, and with these faults
bounded:

* a **candidate that hangs** the board: the session is opened with ``session_timeout_sec``, so
  the server kills it then and the candidate's result is an error (no ``run_secs``); the worker
  pool also kills a worker silent for longer than that plus the wait for a board plus
  :data:`MARGIN` (a board that froze without closing its connection);
* a candidate that **crashes** the board's session process, or a **board that disconnects**
  mid-run: the connection breaks, that candidate's result is an error, and the next candidates
  go to the boards still registered (TVM's tracker drops a server whose connection closed;
  edgecc's server starts serving again after a crashed session);
* a worker waits at most ``timeout`` seconds for a free board (TVM's request waits for ever);
* **no board left, or the tracker down**: :meth:`FarmRunner.run` checks the farm before each
  batch and raises :class:`edgecc.rpc.farm.RPCError` (one line), which stops the tuning;
  MetaSchedule's C++ loop hands it on as a ``RuntimeError``, which :func:`runner_errors` turns
  back into the RPCError.

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
from edgecc.rpc.session import session_requester

log = logging.getLogger(__name__)

MARGIN = 30.0  # seconds beyond the session timeout before a silent worker is killed

__all__ = ["MARGIN", "make_runner", "runner_errors"]


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
            the longest wait for a free board.
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
    left), raise its :class:`RPCError` (exit 2, one line) instead of the ``RuntimeError``
    MetaSchedule turned it into. Any other runner passes through unchanged."""
    try:
        yield
    except Exception as err:
        stopped = getattr(runner, "stopped", None)
        if isinstance(stopped, RPCError):
            raise stopped from err
        raise


_CLASS: Any = None


def _farm_runner_class() -> Any:
    """:class:`FarmRunner`, defined on first use (it derives from TVM classes)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS

    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner
    from tvm.s_tir.meta_schedule.runner.runner import PyRunner
    from tvm.support.popen_pool import PopenPoolExecutor

    @derived_object
    class FarmRunner(RPCRunner._cls):  # the Python class behind MetaSchedule's RPCRunner
        """MetaSchedule's ``RPCRunner`` with a bounded wait for boards, a pool timeout, and a
        farm check before each batch (see :mod:`edgecc.rpc.runner`)."""

        def __init__(self, address, key, timeout, evaluator, workers) -> None:
            PyRunner.__init__(self)  # RPCRunner.__init__ would start a pool without timeout
            self.address, self.board_key = address, key
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
            request = session_requester(wait=timeout)
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
            # a worker may wait `timeout` for a board, then run `timeout` on it
            self.pool = PopenPoolExecutor(max_workers=workers, timeout=2 * timeout + MARGIN)

        def run(self, runner_inputs):
            try:
                check_boards(self.address, self.board_key)
            except RPCError as err:
                self.stopped = err  # MetaSchedule's C++ loop re-raises it as a RuntimeError
                log.info("RPC runner stops: %s", err)
                raise
            return super().run(runner_inputs)

    _CLASS = FarmRunner
    return FarmRunner
