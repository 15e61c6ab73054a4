"""A package's library on a board over TVM RPC: :func:`run_package`, :func:`bench_package`.

One session per call: the tracker hands out a free board of the key (waiting while all are
busy, at most ``wait`` seconds), ``model.so`` is uploaded into the session's scratch folder on
the board and loaded there, the inputs are copied over the connection into the board's memory
(``VirtualMachine.set_input``), ``main`` runs on the board and the outputs are copied back.
Timing uses the VM's ``time_evaluator`` on the board (one call of ``main`` per sample, device
synchronised), so the connection's latency is not counted. The session is asked to end after
``timeout`` seconds (the server kills it then; ``$EDGECC_RPC_TIMEOUT``, default 300 s), and the
call gives up waiting for a silent board after that plus a margin, so a hung board costs one
error line, not a hung command. A board that froze without closing its sockets (still
registered with the tracker, its kernel still accepting connections) never answers TVM's
handshake, which has no timeout of its own: the handshake runs in a thread given at most
``min(timeout, 60 s)``.

Checks against the reference run on this machine, as for local runs (:meth:`Package.check`).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecc.errors import EdgeccError
from edgecc.rpc.farm import RPCError, as_rpc_error, check_boards, parse_address

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0  # seconds one run/bench session may last on the board
TIMEOUT_ENV = "EDGECC_RPC_TIMEOUT"  # overrides DEFAULT_TIMEOUT for run/bench (seconds)
MARGIN = 30.0  # at most this many extra seconds to wait for a board that stopped answering
ANSWER_TIMEOUT = 60.0  # at most this many seconds for a board to open a session
NO_ANSWER = "no answer from board"  # how a session that a board never opened is reported
NOT_FREE = "no board of key"  # ... and a wait for a free board that timed out
BOARD_INFO = "edgecc.rpc.board_info"  # registered by edgecc's server (edgecc/runtime/rpc_server)

__all__ = [
    "DEFAULT_TIMEOUT",
    "bench_package",
    "probe_board",
    "run_package",
    "run_remote",
    "session_requester",
]


def session_requester(wait: float, answer: float | None = None) -> Callable[..., tuple[Any, str]]:
    """A function ``(tracker_host, tracker_port, key, session_timeout, priority=1)`` that asks
    the tracker for a free board of ``key`` and returns ``(RPCSession, "host:port")``.

    It waits at most ``wait`` seconds for a free board (TVM's own request waits for ever) and at
    most ``answer`` seconds (default ``wait``) for the board to open the session: a board that
    froze without closing its sockets (still registered, its listening socket still accepting)
    would block TVM's handshake for ever. It raises ``RuntimeError`` with one readable line on any
    failure (:data:`NO_ANSWER`, :data:`NOT_FREE` begin those two). Self-contained (it imports only
    the standard library and tvm) because MetaSchedule's runner sends it by value to its worker
    processes.
    """
    answer_s = wait if answer is None else answer
    silent, busy = NO_ANSWER, NOT_FREE

    def request(host: str, port: int, key: str, session_timeout: float, priority: int = 1):
        import socket
        import struct
        import threading

        from tvm import rpc
        from tvm.rpc import base

        try:
            with socket.create_connection((host, port), timeout=5.0) as sock:
                sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
                if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                    raise RuntimeError(f"{host}:{port} is not a TVM RPC tracker")
                sock.settimeout(wait)
                base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", priority])
                reply = base.recvjson(sock)  # blocks until a board of the key is free
        except TimeoutError:
            raise RuntimeError(f"{busy} {key!r} became free within {wait:g} s") from None
        except OSError as err:
            raise RuntimeError(
                f"RPC tracker {host}:{port} is not reachable ({err.strerror or err})"
            ) from None
        if not (isinstance(reply, list) and reply[0] == base.TrackerCode.SUCCESS):
            raise RuntimeError(f"RPC tracker {host}:{port} refused the request: {reply!r}")
        url, board_port, matchkey = reply[1]
        where = f"{url}:{board_port}"
        box: dict[str, Any] = {}

        def connect() -> None:  # TVM's handshake has no timeout: bounded by a thread's join
            try:
                box["session"] = rpc.connect(url, board_port, matchkey, session_timeout)
            except Exception as err:  # noqa: BLE001  (TVM raises several kinds; one line out)
                box["error"] = err

        thread = threading.Thread(target=connect, name="edgecc-rpc-connect", daemon=True)
        thread.start()
        thread.join(answer_s)
        if thread.is_alive():  # the abandoned thread ends with the process (or the board)
            raise RuntimeError(
                f"{silent} {where} (key {key}) within {answer_s:g} s: it froze or its "
                "network is down"
            )
        if "error" in box:
            lines = str(box["error"]).strip().splitlines() or [type(box["error"]).__name__]
            raise RuntimeError(f"board {where} refused the session: {lines[-1]}") from None
        return box.pop("session"), where

    return request


def _bounded(fn: Callable[[], Any], seconds: float, what: str) -> Any:
    """``fn()`` in a daemon thread; RPCError if it has not returned after ``seconds``."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller's thread)
            box["error"] = err

    thread = threading.Thread(target=call, name="edgecc-rpc", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise RPCError(f"{what}: no answer within {seconds:g} s (the board froze?)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _flatten(value: Any, out: list[np.ndarray]) -> list[np.ndarray]:
    """The tensors of a (nested) VM result, depth-first, copied to this machine."""
    if hasattr(value, "numpy"):
        out.append(value.numpy())
    else:
        for item in value:
            _flatten(item, out)
    return out


def _board_info(sess: Any) -> dict[str, Any]:
    """What edgecc's server says about the board (empty for a plain TVM server)."""
    import json

    try:
        return json.loads(str(sess.get_function(BOARD_INFO)()))
    except Exception:  # noqa: BLE001  (a plain TVM RPC server has no such function)
        return {}


def _on_board(
    sess: Any,
    where: str,
    library: Path,
    device: str,
    inputs: Sequence[np.ndarray],
    repeat: int | None,
    warmup: int,
) -> dict[str, Any]:
    """Upload, load, run (and time) ``library`` in the session ``sess`` with board ``where``."""
    import tvm
    from tvm import relax

    from edgecc.runtime._runner import timing_stats

    info = _board_info(sess)
    sess.upload(str(library), library.name)
    dev = sess.device(device, 0)
    if not dev.exist:
        raise RPCError(f"board {where} has no {device} device for {library.name}")
    vm = relax.VirtualMachine(sess.load_module(library.name), dev)
    vm.set_input("main", *[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs])
    vm.invoke_stateful("main")
    result: dict[str, Any] = {
        "outputs": _flatten(vm.get_outputs("main"), []),
        "board": where,
        "info": info,
    }
    if repeat is not None:
        for _ in range(warmup):
            vm.invoke_stateful("main")
        timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=repeat)
        times = [float(t) * 1e3 for t in timer("main").results]
        threads = info.get("threads") or int(sess.get_function("runtime.NumThreads")())
        result["timing"] = timing_stats(times, warmup, threads, device)
    return result


def run_remote(
    library: Path,
    device: str,
    inputs: Sequence[np.ndarray],
    tracker: str,
    key: str,
    repeat: int | None = None,
    warmup: int = 0,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``library`` once on a board of ``key`` (and time it when ``repeat`` is given).

    Args:
        library: the shared library (built for the board's architecture).
        device: ``cpu`` or ``cuda`` (the board's device that runs it).
        inputs: the input arrays in the model's order.
        tracker: the tracker's ``HOST:PORT``.
        key: the boards' key (``rpi4``).
        repeat: timed runs after ``warmup`` untimed ones; None: no timing.
        warmup: untimed runs before the timed ones.
        timeout: seconds the session may last on the board, also the longest wait for a free
            board (and, up to :data:`ANSWER_TIMEOUT`, for the board to answer); None:
            :func:`default_timeout`.

    Returns:
        ``outputs`` (arrays in the model's order), ``board`` (``host:port``), ``info`` (what
        edgecc's server reports: ``machine``, ``threads``, ``emulated``...) and, with
        ``repeat``, ``timing`` (as :func:`edgecc.runtime.bench.benchmark_library`'s).

    Raises:
        RPCError: the tracker is down, no board serves ``key``, no board was free within
            ``timeout`` s, the board did not answer (a board that froze), or the board failed
            (the message ends with the board's error line).
    """
    timeout = default_timeout() if timeout is None else timeout
    address = parse_address(tracker)
    check_boards(address, key)
    sess, where = _open_session(address, key, timeout)
    log.info("key %s: board %s", key, where)
    held = [sess]
    del sess

    def work() -> dict[str, Any]:
        session = held.pop()
        error: EdgeccError | None = None
        try:
            return _on_board(session, where, library, device, inputs, repeat, warmup)
        except Exception as err:  # noqa: BLE001  (TVM's errors become one RPCError line)
            error = as_rpc_error(err, f"running {library.name} on board {where} ({key})")
        finally:
            # The connection closes when the last object of the session goes: until then the
            # board stays busy (the next request would wait for its session timeout).
            del session
            gc.collect()
        raise error

    # the board kills the session after `timeout`; a board that froze mid-session never does
    limit = timeout + margin(timeout)
    return _bounded(work, limit, f"running {library.name} on board {where} ({key})")


def _open_session(address: tuple[str, int], key: str, timeout: float) -> tuple[Any, str]:
    """A session on a free board of ``key``: ``(RPCSession, "host:port")``, the wait for a free
    board bounded by ``timeout`` and for its answer by :func:`answer_timeout`.

    Raises:
        RPCError: the tracker is down, no board was free, or the board did not answer.
    """
    request = session_requester(wait=timeout, answer=answer_timeout(timeout))
    try:
        return request(address[0], address[1], key, timeout)
    except RuntimeError as err:
        raise RPCError(str(err)) from None


def default_timeout() -> float:
    """Seconds a run/bench session may last on a board: ``$EDGECC_RPC_TIMEOUT``, else
    :data:`DEFAULT_TIMEOUT`.

    Raises:
        UserInputError: the variable is not a positive number.
    """
    from edgecc.errors import UserInputError

    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise UserInputError(f"{TIMEOUT_ENV}={text!r}: expected seconds > 0, e.g. 60")
    return value


def answer_timeout(timeout: float) -> float:
    """Seconds a board may take to open a session (TVM's handshake): ``timeout``, at most
    :data:`ANSWER_TIMEOUT` (a board that answers at all answers in well under a second)."""
    return min(timeout, ANSWER_TIMEOUT)


def margin(timeout: float) -> float:
    """Extra seconds, beyond a session's ``timeout``, before a silent board is given up:
    ``timeout`` itself, at most :data:`MARGIN`."""
    return min(MARGIN, timeout)


def probe_board(tracker: str | tuple[str, int], key: str, timeout: float) -> tuple[str, dict]:
    """Open a session on a free board of ``key`` only to ask what it is: ``(board, info)``,
    ``info`` as edgecc's server reports it (``machine``, ``threads``, ``emulated``...; empty for
    a plain TVM server). The wait for a free board and for its answer are bounded by
    ``timeout``.

    Raises:
        RPCError: the tracker is down, no board serves ``key`` or none answered.
    """
    address = tracker if isinstance(tracker, tuple) else parse_address(tracker)
    sess, where = _open_session(address, key, timeout)
    try:
        return where, _board_info(sess)
    finally:
        del sess  # the board is free again once the session object is gone
        gc.collect()


def _check_options(tracker: str | None, key: str | None, threads: int | None) -> None:
    from edgecc.errors import UserInputError

    if not tracker or not key:
        raise UserInputError(
            "--rpc-tracker and --rpc-key go together (e.g. --rpc-tracker 127.0.0.1:9190 "
            "--rpc-key rpi4)"
        )
    if threads is not None:
        raise UserInputError(
            "--threads does not reach a board: start its server with TVM_NUM_THREADS=N"
        )


def run_package(
    pkg: Any,
    feeds: dict[str, np.ndarray],
    tracker: str,
    key: str,
    timeout: float | None = None,
    facts: dict[str, Any] | None = None,
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Run an :class:`edgecc.package.Package` on ``feeds`` on a board; outputs by name.

    ``facts``, when given, receives ``board``, ``key``, ``threads`` and what the board reports
    (``board_info``). ``threads`` must be None: the board's server decides
    (``TVM_NUM_THREADS``); it is accepted so that callers can pass their option through.
    """
    _check_options(tracker, key, threads)
    pkg.verify_library()
    feeds = pkg.prepare_inputs(feeds)
    device = "cuda" if pkg.target().device == "cuda" else "cpu"
    result = run_remote(pkg.library, device, list(feeds.values()), tracker, key, timeout=timeout)
    names = pkg.output_names
    if len(result["outputs"]) != len(names):
        raise RPCError(
            f"{pkg.library.name} returned {len(result['outputs'])} outputs on board "
            f"{result['board']}, expected {len(names)} ({', '.join(names)})"
        )
    if facts is not None:
        facts.update(board=result["board"], key=key, threads=result["info"].get("threads"))
        facts["board_info"] = result["info"]
    return dict(zip(names, result["outputs"], strict=True))


def bench_package(
    pkg: Any,
    tracker: str,
    key: str,
    repeat: int = 50,
    warmup: int = 5,
    timeout: float | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time a package's library on a board on its probe input (``threads``: as for
    :func:`run_package`).

    Returns the board's timing (``median_ms``... as for local benchmarks) under ``edgecc``,
    ``board``, ``key``, ``board_info``, ``threads``, ``emulated`` (the board is edgecc's
    qemu stand-in: its times mean nothing) and ``check`` (the outputs of the first run checked
    against the package's reference, as ``run --check`` does). No ratio: ONNX Runtime does not
    run on the board.
    """
    from edgecc.errors import UserInputError

    _check_options(tracker, key, threads)
    if repeat < 1 or warmup < 0:
        raise UserInputError(f"bench needs repeat >= 1 and warmup >= 0 (got {repeat}, {warmup})")
    pkg.verify_library()
    feeds = pkg.probe_inputs()
    device = "cuda" if pkg.target().device == "cuda" else "cpu"
    result = run_remote(
        pkg.library, device, list(feeds.values()), tracker, key, repeat, warmup, timeout
    )
    timing = {**result["timing"], "target": pkg.target().name, "outputs": len(result["outputs"])}
    outputs = dict(zip(pkg.output_names, result["outputs"], strict=False))
    emulated = bool(result["info"].get("emulated"))
    return {
        "edgecc": timing,
        "board": result["board"],
        "key": key,
        "board_info": result["info"],
        "threads": timing["threads"],
        "emulated": emulated,
        "check": pkg.check(outputs, feeds),
        "ratio": None,
    }
