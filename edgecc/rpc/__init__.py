"""Boards over TVM's RPC: the tracker, the board's server, remote run/bench and tuning's runner.

The farm is TVM's own: ``edgecc rpc tracker`` runs TVM's tracker on the desk machine; each
board runs ``edgecc rpc server`` (the standalone script :mod:`edgecc.runtime.rpc_server`, which
needs only Python, numpy and the TVM runtime, so it is copied to the board as it is) and
registers with the tracker under a key (``rpi4``). Then:

* :func:`run_package` / :func:`bench_package` (``edgecc run|bench --rpc-tracker H:P --rpc-key
  K``) upload a package's library to a free board, run and time it there;
* :func:`make_runner` gives MetaSchedule a runner timing candidates on every board of the key
  (``edgecc tune --rpc-tracker ... --rpc-key ...``);
* :func:`tracker_summary` / :func:`key_status` list the boards (``edgecc rpc status``).

Errors a user can act on (tracker down, no board under the key, a board that dropped the
session) are :class:`RPCError`, one line, exit code 2.

Exception to "only ``edgecc.lower`` imports tvm": the client side of RPC is TVM's
``tvm.rpc``, so this package imports ``tvm`` too, always inside functions (``import
edgecc.rpc`` stays cheap, and the tracker protocol's framing comes from ``tvm.rpc.base``).
"""

from edgecc.rpc.farm import (
    DEFAULT_PORT,
    KeyStatus,
    RPCError,
    check_boards,
    count_boards,
    key_status,
    parse_address,
    tracker_summary,
    wait_for_boards,
)
from edgecc.rpc.runner import make_runner, runner_errors
from edgecc.rpc.session import DEFAULT_TIMEOUT, bench_package, run_package, run_remote

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "KeyStatus",
    "RPCError",
    "bench_package",
    "check_boards",
    "count_boards",
    "key_status",
    "make_runner",
    "parse_address",
    "run_package",
    "run_remote",
    "runner_errors",
    "tracker_summary",
    "wait_for_boards",
]
