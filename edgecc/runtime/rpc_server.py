"""A TVM RPC server for a board, registered with a tracker: what ``edgecc rpc server`` runs.

Needs only Python 3, numpy and the TVM runtime (no edgecc), so it runs on the board as it is::

    python3 rpc_server.py --tracker 192.168.1.10:9190 --key rpi4
    python3 rpc_server.py --tracker HOST:PORT --key rpi4 [--host ADDR] [--port 9090]
                          [--custom-addr ADDR] [--emulated]

It is TVM's own server (``tvm.rpc.server``): it registers with the tracker under ``--key``,
and for each client session forks a process that receives a library, loads it and runs what
the client asks in a scratch folder, killing the session when it outlasts the client's
``session_timeout``. Two additions:

* the listening address defaults to this machine's address on the route to the tracker
  (``127.0.0.1`` for a local tracker), never every interface: TVM's RPC runs any code a
  client sends, so it must only be reachable on a trusted network; ``--host 0.0.0.0`` opts in;
* TVM's serving loop stops for good when a session process dies abnormally (a candidate that
  crashed the board's session) or the tracker stays away for a minute; this script runs the
  loop in a forked child and starts a new one then, which registers anew with the tracker.

It prints one line when listening (``rpc server: key K on HOST:PORT, tracker T``) and
registers ``edgecc.rpc.board_info`` (machine, threads, TVM version, ``--emulated``), which
edgecc's client reads. Threads: the TVM runtime reads ``TVM_NUM_THREADS`` when the server
starts. Exit status 2 on bad arguments or a port range that is all taken.
"""

import argparse
import errno
import json
import logging
import platform
import socket
import sys
import time

log = logging.getLogger("edgecc.rpc_server")
PORT_RANGE = 100  # ports tried from --port on


def parse(argv):
    """The options; exits 2 with usage on bad ones."""
    parser = argparse.ArgumentParser(prog="rpc_server.py", description=__doc__.splitlines()[0])
    parser.add_argument("--tracker", required=True, help="the tracker's HOST:PORT")
    parser.add_argument("--key", required=True, help="the key clients ask for, e.g. rpi4")
    parser.add_argument("--host", default=None, help="address to listen on [route to tracker]")
    parser.add_argument("--port", type=int, default=9090, help="first port to try [9090]")
    parser.add_argument("--custom-addr", default=None, help="address reported to the tracker")
    parser.add_argument("--emulated", action="store_true", help="say the board is emulated")
    args = parser.parse_args(argv)
    host, _, port = args.tracker.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--tracker {args.tracker!r}: expected HOST:PORT")
    args.tracker_addr = (host.strip("[]"), int(port))
    return args


def route_address(tracker):
    """This machine's address on the route to ``tracker`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(tracker)
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def bind(host, first_port):
    """A listening socket on the first free port from ``first_port``; its port."""
    for port in range(first_port, first_port + PORT_RANGE):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE:
                continue
            raise
        sock.listen(1)
        return sock, port
    raise OSError(errno.EADDRINUSE, f"ports {first_port}-{first_port + PORT_RANGE - 1} are taken")


def register_board_info(key, emulated):
    """Register ``edgecc.rpc.board_info``: a JSON text describing this board."""
    import tvm
    import tvm_ffi

    def board_info():
        return json.dumps(
            {
                "key": key,
                "machine": platform.machine(),
                "hostname": socket.gethostname(),
                "python": platform.python_version(),
                "tvm": tvm.__version__,
                "threads": int(tvm.runtime.num_threads()),
                "emulated": emulated,
            }
        )

    tvm_ffi.register_global_func("edgecc.rpc.board_info", board_info, override=True)


def serve_once(sock, port, args):
    """TVM's serving loop (in a forked child: its tracker connection dies with it)."""
    from tvm.rpc import server as rpc_server

    try:
        rpc_server._listen_loop(  # TVM 0.27's loop (its Server class runs it in a thread)
            sock, port, args.key, args.tracker_addr, None, args.custom_addr
        )
    except RuntimeError as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        log.warning("serving stopped: %s", lines[-1])
        sys.exit(1)


def serve(sock, port, args):
    """Run :func:`serve_once` in a child process, and again whenever it ends.

    TVM's loop ends for good when a session process dies abnormally (a candidate crashed it)
    or the tracker stays unreachable for a minute; a fresh child drops the old tracker
    registration and registers anew, on the same listening socket.
    """
    import multiprocessing

    context = multiprocessing.get_context("fork")  # no new interpreter (none under qemu-user)
    while True:
        child = context.Process(target=serve_once, args=(sock, port, args), daemon=False)
        child.start()
        try:
            child.join()
        except BaseException:
            child.terminate()
            child.join(5)
            raise
        log.warning("serving again (the serving process exited with %s)", child.exitcode)
        time.sleep(0.5)


def main(argv):
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="rpc server: %(message)s")
    host = args.host or route_address(args.tracker_addr)
    try:
        sock, port = bind(host, args.port)
    except OSError as err:
        reason = err.strerror or err
        print(f"rpc_server.py: error: cannot listen on {host}: {reason}", file=sys.stderr)
        return 2
    register_board_info(args.key, args.emulated)
    from tvm.rpc import server as rpc_server

    rpc_server.logger.setLevel(logging.WARNING)  # one line per session is TVM's INFO level
    tracker = f"{args.tracker_addr[0]}:{args.tracker_addr[1]}"
    print(f"rpc server: key {args.key} on {host}:{port}, tracker {tracker}", flush=True)
    serve(sock, port, args)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
