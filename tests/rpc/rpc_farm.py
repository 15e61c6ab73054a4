"""Helpers of the RPC tests (fixtures in conftest.py): a farm on 127.0.0.1.

``edgecc rpc tracker``, an x86 ``edgecc rpc server`` (key ``x86``) and an aarch64 one under
qemu-user (``--emulate``, key ``rpi4``), started on free ports and stopped at the end (SIGTERM,
then SIGKILL of every descendant).

Every socket is on 127.0.0.1; every wait has a deadline. The qemu server takes the longest to
start (TVM's import under emulation), so it starts first and the tests that need it come last.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from onnx import TensorProto, helper

from edgecc.rpc import wait_for_boards

ROOT = Path(__file__).resolve().parents[2]
LOCAL = "127.0.0.1"
START_TIMEOUT = 240.0  # seconds for a service to come up (qemu on a loaded 2-core machine)


def free_port() -> int:
    """A port nothing listens on at 127.0.0.1 now (the services search upwards from it)."""
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        return sock.getsockname()[1]


class Service:
    """``python -m edgecc ARGS`` in its own process group, output in ``log``."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgecc", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first match of ``pattern`` in the output; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log.read_text())
            if found:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"{self.log.name} exited {self.proc.returncode}: {self.output()}")
            time.sleep(0.2)
        pytest.fail(f"{self.log.name}: no {pattern!r} within {timeout} s: {self.output()}")

    def output(self) -> str:
        return self.log.read_text()[-2000:]

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the service and everything it started, at once (a board losing power)."""
        _kill([*self.descendants(), self.proc])
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (the command stops its server), then SIGKILL whatever is left."""
        if self.proc.poll() is not None:
            return
        children = self.descendants()
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        _kill([*children, self.proc])
        self.proc.wait(10)


def _kill(processes: list[psutil.Process | subprocess.Popen]) -> None:
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            proc.kill()


class Farm:
    """The tracker's address and the services; starts more servers on demand."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.services: list[Service] = []
        self.tracker_service = self.start(["rpc", "tracker", "--port", str(free_port())], "tracker")
        port = self.tracker_service.wait_line(r"listening on 127\.0\.0\.1:(\d+)")[1]
        self.tracker = f"{LOCAL}:{port}"
        self.address = (LOCAL, int(port))

    def start(self, args: list[str], name: str) -> Service:
        service = Service(args, self.folder / f"{name}-{len(self.services)}.log")
        self.services.append(service)
        return service

    def server(self, key: str, *extra: str) -> Service:
        """Start ``edgecc rpc server`` for ``key`` (not waiting for it to register)."""
        args = ["rpc", "server", "--tracker", self.tracker, "--key", key]
        return self.start([*args, "--port", str(free_port()), *extra], key)

    def wait(self, key: str, count: int = 1) -> None:
        wait_for_boards(self.address, key, count, timeout=START_TIMEOUT)

    def stop(self) -> None:
        """Stop every service, even when stopping one of them fails."""
        errors = []
        for service in reversed(self.services):
            try:
                service.stop()
            except Exception as err:  # noqa: BLE001  (the others must still be stopped)
                errors.append(err)
        if errors:
            raise errors[0]


def matmul_relu() -> helper.ModelProto:
    """y = relu(x @ W), 4x16 @ 16x8: one small fused kernel."""
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Relu", ["z"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor("w", TensorProto.FLOAT, [16, 8], w.ravel())],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class FrozenBoard:
    """A board that froze without closing its sockets: registered with the tracker under
    ``key`` as TVM's RPC server registers (``UPDATE_INFO``, then ``PUT``), it accepts the
    connections clients open but never reads or answers them (like a SIGSTOPped server, whose
    kernel still accepts into the listening backlog). A thread in the test process; ``close``
    drops its tracker connection (the tracker forgets it) and its sockets."""

    def __init__(self, address: tuple[str, int], key: str):
        from tvm.rpc import base

        self.listener = socket.socket()
        self.listener.bind((LOCAL, 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.tracker = socket.create_connection(address, timeout=10)
        self.tracker.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        assert struct.unpack("<i", base.recvall(self.tracker, 4))[0] == base.RPC_TRACKER_MAGIC
        info = {"key": f"server:{key}", "addr": [LOCAL, self.port]}
        for request in (
            [base.TrackerCode.UPDATE_INFO, info],
            [base.TrackerCode.PUT, key, [self.port, f"{key}:frozen"], LOCAL],
        ):
            base.sendjson(self.tracker, request)
            assert base.recvjson(self.tracker) == base.TrackerCode.SUCCESS
        threading.Thread(target=self._accept, name="frozen-board", daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed
            while True:
                self.accepted.append(self.listener.accept()[0])

    def close(self) -> None:
        for sock in (*self.accepted, self.listener, self.tracker):
            with contextlib.suppress(OSError):
                sock.close()
