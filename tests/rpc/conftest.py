"""Fixtures of the RPC tests: a farm on 127.0.0.1 (tests/rpc/rpc_farm.py), started once per
session and stopped at the end, and one small model compiled for x86 and rpi4."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.rpc.rpc_farm import Farm, matmul_relu


@pytest.fixture(scope="session")
def farm(tmp_path_factory: pytest.TempPathFactory):
    """A tracker with an emulated ``rpi4`` board, an ``x86`` board and two ``pair`` boards (for
    the disconnection test), all on 127.0.0.1; started at once, waited for by key."""
    farm = Farm(tmp_path_factory.mktemp("farm"))
    try:
        farm.rpi4 = farm.server("rpi4", "--emulate")
        farm.x86 = farm.server("x86")
        farm.pair = [farm.server("pair"), farm.server("pair")]  # two boards, one key
        yield farm
    finally:
        farm.stop()


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same small model compiled for x86 and for rpi4."""
    import onnx

    from edgecc.api import compile as compile_model

    folder = tmp_path_factory.mktemp("rpc-packages")
    onnx.save(matmul_relu(), folder / "m.onnx")
    return {
        target: compile_model(folder / "m.onnx", target, out=folder / target).path
        for target in ("x86", "rpi4")
    }
