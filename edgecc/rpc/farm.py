"""The tracker's view of the farm: addresses, which boards serve which key, waiting for boards.

A TVM RPC tracker (``edgecc rpc tracker``) keeps one entry per RPC server (``edgecc rpc
server`` on a board) under the server's key (``rpi4``); a client asks it for a free server of a
key and gets that server's address. The queries here speak the tracker's own protocol (TVM's
``tvm.rpc.base`` framing: a magic number, then length-prefixed JSON) over a socket with a
timeout, so a tracker that is down or hung costs at most ``timeout`` seconds and one
:class:`RPCError` line instead of TVM's 60 s of retries.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from edgecc.errors import EdgeccError, UserInputError

DEFAULT_PORT = 9190
CONNECT_TIMEOUT = 5.0  # seconds to reach the tracker before giving up

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_PORT",
    "KeyStatus",
    "RPCError",
    "check_boards",
    "count_boards",
    "key_status",
    "parse_address",
    "tracker_summary",
    "wait_for_boards",
]


class RPCError(UserInputError):
    """The tracker is down or unreachable, no board serves the key, or a board dropped or
    refused the session (exit 2: start the tracker or server, or fix ``--rpc-tracker`` /
    ``--rpc-key``)."""


def parse_address(text: str, option: str = "--rpc-tracker") -> tuple[str, int]:
    """``HOST:PORT`` (``PORT`` alone means ``127.0.0.1:PORT``) as ``(host, port)``."""
    host, sep, port = str(text).strip().rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise UserInputError(f"bad {option} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, number


def _text(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def tracker_summary(address: tuple[str, int], timeout: float = CONNECT_TIMEOUT) -> dict[str, Any]:
    """The tracker's summary: ``queue_info`` (per key: ``free``, ``pending``) and
    ``server_info`` (per server: ``key`` ``server:KEY``, ``addr`` ``[host, port]``).

    Raises:
        RPCError: nothing listens at ``address``, it does not answer within ``timeout``
            seconds, or it is not a TVM RPC tracker.
    """
    from tvm.rpc import base  # TVM's tracker framing (pure Python; imports tvm)

    where = _text(address)
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                raise RPCError(f"{where} is not a TVM RPC tracker")
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            reply = base.recvjson(sock)
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else err.strerror or str(err)
        raise RPCError(
            f"RPC tracker {where} is not reachable ({reason}): start it with "
            f"`edgecc rpc tracker --port {address[1]}` or fix --rpc-tracker"
        ) from err
    if not (isinstance(reply, list) and reply and reply[0] == base.TrackerCode.SUCCESS):
        raise RPCError(f"RPC tracker {where} refused the summary request: {reply!r}")
    return reply[1]


@dataclass
class KeyStatus:
    """The boards of one key: how many, how many free, requests waiting, their addresses."""

    key: str
    total: int = 0
    free: int = 0
    pending: int = 0
    servers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "total": self.total,
            "free": self.free,
            "pending": self.pending,
            "servers": self.servers,
        }


def key_status(summary: dict[str, Any]) -> list[KeyStatus]:
    """Per key (sorted): the boards registered and the tracker's queue counts."""
    keys: dict[str, KeyStatus] = {}
    for server in summary.get("server_info", []):
        key = str(server.get("key", "")).split(":", 1)[-1]
        status = keys.setdefault(key, KeyStatus(key))
        status.total += 1
        status.servers.append(":".join(map(str, server.get("addr", ["?", "?"]))))
    for key, queue in summary.get("queue_info", {}).items():
        if key in keys or queue.get("pending"):
            status = keys.setdefault(key, KeyStatus(key))
            status.free, status.pending = int(queue.get("free", 0)), int(queue.get("pending", 0))
    for status in keys.values():
        status.servers.sort()
    return [keys[k] for k in sorted(keys)]


def count_boards(address: tuple[str, int], key: str, timeout: float = CONNECT_TIMEOUT) -> int:
    """How many servers are registered under ``key`` (0 if none); RPCError if no tracker."""
    for status in key_status(tracker_summary(address, timeout)):
        if status.key == key:
            return status.total
    return 0


def check_boards(address: tuple[str, int], key: str, timeout: float = CONNECT_TIMEOUT) -> int:
    """The number of boards under ``key``; RPCError when the tracker is down or there is none."""
    count = count_boards(address, key, timeout)
    if count == 0:
        raise RPCError(
            f"no board serves key {key!r} at RPC tracker {_text(address)}: start "
            f"`edgecc rpc server --tracker {_text(address)} --key {key}` on the board "
            "(`edgecc rpc status` lists the keys)"
        )
    return count


def wait_for_boards(
    address: tuple[str, int], key: str, count: int = 1, timeout: float = 60.0
) -> int:
    """Wait until at least ``count`` boards serve ``key``; return how many do.

    Raises:
        RPCError: the tracker is unreachable, or fewer boards registered within ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = count_boards(address, key)
        if found >= count:
            return found
        if time.monotonic() > deadline:
            raise RPCError(
                f"{found} of {count} boards registered under key {key!r} at "
                f"{_text(address)} after {timeout:g} s"
            )
        time.sleep(0.2)


def describe(err: BaseException) -> str:
    """A TVM error's last meaningful line (TVM's messages carry tracebacks and hints)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    skip = ("note: run with", "File ", "Traceback")
    useful = [line for line in lines if not line.startswith(skip)]
    return (useful or lines or [type(err).__name__])[-1]


def as_rpc_error(err: BaseException, what: str) -> EdgeccError:
    """``err`` (raised by TVM during ``what``) as one RPCError line; edgecc errors unchanged."""
    if isinstance(err, EdgeccError):
        return err
    return RPCError(f"{what}: {describe(err)}")
