"""``edgecc rpc tracker|server|status``: a farm of boards over TVM's RPC (see :mod:`edgecc.rpc`).

``tracker`` runs TVM's tracker here; ``server`` runs edgecc's standalone board server
(:mod:`edgecc.runtime.rpc_server`, the script to copy to a board) with this machine's Python,
or with the cached aarch64 Python under qemu (``--emulate``: a stand-in Raspberry Pi whose times
mean nothing); ``status`` lists the boards the tracker knows. Both services listen on
127.0.0.1 unless told otherwise: TVM's RPC runs whatever code a client sends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import click

from edgecc.cli import _emit, _examples, _global_flags, _progress
from edgecc.errors import ToolchainError, UserInputError
from edgecc.rpc.farm import DEFAULT_PORT, key_status, parse_address, tracker_summary

PORT_SEARCH = 10  # ports tried from --port on, as TVM's own tracker does (9190-9199)


@click.group(
    "rpc",
    epilog=_examples(
        "edgecc rpc tracker --host 0.0.0.0 --port 9190",
        "edgecc rpc server --tracker 192.168.1.10:9190 --key rpi4",
        "edgecc rpc status --tracker 192.168.1.10:9190",
    ),
)
def rpc_group() -> None:
    """Boards over TVM RPC: a tracker, a server per board, and their status."""


@rpc_group.command(
    "tracker", epilog=_examples("edgecc rpc tracker", "edgecc rpc tracker --host 0.0.0.0")
)
@_global_flags
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0: every interface, for boards on the network).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help=f"First port to try (the next {PORT_SEARCH - 1} if taken).",
)
def tracker_cmd(host: str, port: int) -> None:
    """Run TVM's RPC tracker here until Ctrl-C; prints the address it listens on."""
    import logging

    from tvm.rpc import tracker

    quiet = not logging.getLogger().isEnabledFor(logging.INFO)
    try:  # in this process (TVM's Tracker class would start another Python and import TVM again)
        state = tracker.PopenTrackerServerState(
            host, port, min(port + PORT_SEARCH, 65536), silent=quiet
        )
    except (OSError, ValueError) as err:
        raise UserInputError(f"cannot start the RPC tracker on {host}:{port}: {err}") from err
    try:
        click.echo(f"rpc tracker listening on {host}:{state.port} (Ctrl-C stops it)")
        sys.stdout.flush()
        while state.thread.is_alive():
            state.thread.join(0.5)  # in slices, so that Ctrl-C is seen
    finally:
        _stop_tracker(host, state.port, state.stop_key)
        state.thread.join(5.0)


def _stop_tracker(host: str, port: int, stop_key: str) -> None:
    """Ask the tracker's event loop to stop (TVM's STOP request with its secret key)."""
    import socket
    import struct

    from tvm.rpc import base

    target = "127.0.0.1" if host in ("0.0.0.0", "") else host
    try:
        with socket.create_connection((target, port), timeout=5.0) as sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            base.recvall(sock, 4)
            base.sendjson(sock, [base.TrackerCode.STOP, stop_key])
            base.recvjson(sock)
    except OSError:
        pass  # already stopped


@rpc_group.command(
    "server",
    epilog=_examples(
        "edgecc rpc server --tracker 192.168.1.10:9190 --key rpi4",
        "edgecc rpc server --tracker 127.0.0.1:9190 --key rpi4 --emulate",
        "python3 rpc_server.py --tracker 192.168.1.10:9190 --key rpi4   # on the board",
    ),
)
@_global_flags
@click.option("--tracker", required=True, metavar="HOST:PORT", help="The tracker to join.")
@click.option("--key", required=True, help="The key clients ask for (e.g. rpi4).")
@click.option("--host", default=None, help="Address to listen on [the route to the tracker's].")
@click.option("--port", type=click.IntRange(1, 65535), default=9090, help="First port to try.")
@click.option("--custom-addr", default=None, help="Address the tracker gives clients (NAT).")
@click.option(
    "--emulate",
    is_flag=True,
    help="Serve with the cached aarch64 Python under qemu-aarch64: a stand-in Raspberry Pi "
    "(its times mean nothing).",
)
def server_cmd(
    tracker: str, key: str, host: str | None, port: int, custom_addr: str | None, emulate: bool
) -> None:
    """Run a board's RPC server (the standalone edgecc/runtime/rpc_server.py) until Ctrl-C."""
    from edgecc.runtime import RPC_SERVER

    parse_address(tracker, "--tracker")
    command, env = [sys.executable], None
    if emulate:
        from edgecc.runtime import prepare_emulator
        from edgecc.runtime.emulation import emulated_python

        command, env = emulated_python(prepare_emulator(_progress))
    args = [str(RPC_SERVER), "--tracker", tracker, "--key", key, "--port", str(port)]
    args += ["--host", host] if host else []
    args += ["--custom-addr", custom_addr] if custom_addr else []
    args += ["--emulated"] if emulate else []
    code = _serve([*command, *args], env)
    if code not in (0, 130, -signal.SIGTERM, -signal.SIGINT):
        raise ToolchainError(f"the RPC server stopped with exit status {code}")


def _serve(command: list[str], env: dict[str, str] | None) -> int:
    """Run ``command`` in its own process group; on any exit of ours, stop the whole group
    (the server forks one process per session)."""
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@rpc_group.command(
    "status",
    epilog=_examples(
        "edgecc rpc status --tracker 127.0.0.1:9190", "edgecc --json rpc status --tracker :9190"
    ),
)
@_global_flags
@click.option("--tracker", required=True, metavar="HOST:PORT", help="The tracker to ask.")
def status_cmd(tracker: str) -> None:
    """List the boards registered with a tracker: per key, total, free and pending requests."""
    address = parse_address(tracker, "--tracker")
    keys = key_status(tracker_summary(address))
    data: dict[str, Any] = {"tracker": f"{address[0]}:{address[1]}"}
    data["keys"] = [k.to_dict() for k in keys]
    boards = sum(k.total for k in keys)
    lines = [f"tracker {data['tracker']}: {boards} board{'s' * (boards != 1)}"]
    if keys:
        width = max(3, *(len(k.key) for k in keys))
        lines.append(f"{'key'.ljust(width)}  total  free  pending  servers")
        lines += [
            f"{k.key.ljust(width)}  {k.total:5d}  {k.free:4d}  {k.pending:7d}  "
            + (", ".join(k.servers) or "-")
            for k in keys
        ]
    _emit(data, "\n".join(lines))


def bench_on_board(
    pkg: Any, tracker: str | None, key: str | None, repeat: int, warmup: int, threads: int | None
) -> None:
    """``edgecc bench --rpc-tracker ... --rpc-key ...``: time on a board, check its outputs,
    print; exit 4 when the outputs fail the package's check."""
    from edgecc.cli import _check_lines
    from edgecc.errors import EXIT_CHECK_FAILED
    from edgecc.package import WARN_COSINE
    from edgecc.rpc import bench_package

    res = bench_package(pkg, tracker, key, repeat, warmup, threads=threads)
    e, info = res["edgecc"], res["board_info"]
    where = f"board {res['board']} (key {key}" + (
        f", {info['machine']}" if info.get("machine") else ""
    )
    text = (
        f"edgecc/TVM {e['median_ms']:.3f} ms (IQR {e['q1_ms']:.3f}-{e['q3_ms']:.3f}) on {where}), "
        f"{e['threads']} threads, {e['repeat']} runs after {e['warmup']} warm-up"
        + (
            "\nemulated board (qemu): these times say nothing about a real board"
            if res["emulated"]
            else ""
        )
    )
    lines = [text, *_check_lines(res["check"], WARN_COSINE)]
    _emit(res, "\n".join(lines))
    if not res["check"]["passed"]:
        sys.exit(EXIT_CHECK_FAILED)
