"""Where libraries run, how failures read, and the emulator cache's preparation (no network)."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgecc import runtime
from edgecc.errors import EXIT_TOOLCHAIN, EdgeccError, ToolchainError
from edgecc.runtime import RUNNER, run_library
from edgecc.runtime import emulation as emu
from edgecc.targets import get_target


def add_model() -> onnx.ModelProto:
    """y = a + 2 * b, a and b of different shapes so swapped inputs cannot broadcast silently."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [
        helper.make_node("Mul", ["b", "two"], ["b2"]),
        helper.make_node("Add", ["a", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [two],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def build_add_library(out: Path) -> Path:
    """Lower :func:`add_model` for the x86 host into ``out``."""
    from edgecc.lower import lower

    lower(
        add_model(),
        get_target("x86"),
        {"a": (2, 3), "b": (3,)},
        {"a": "float32", "b": "float32"},
        out,
    )
    return out


@pytest.fixture(scope="module")
def x86_library(tmp_path_factory) -> Path:
    return build_add_library(tmp_path_factory.mktemp("lib") / "add.so")


def test_x86_run_uses_inputs_in_order(x86_library):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, 10, 100], np.float32)
    out = run_library(x86_library, get_target("x86"), {"a": a, "b": b}, ["y"])
    np.testing.assert_array_equal(out["y"], a + 2 * b)  # exact: one add and one multiply


def test_output_count_mismatch_is_an_error(x86_library):
    feeds = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    with pytest.raises(EdgeccError, match="returned 1 outputs, expected 2 \\(y, z\\)"):
        run_library(x86_library, get_target("x86"), feeds, ["y", "z"])


def test_runner_failure_reports_its_last_stderr_line(tmp_path):
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"not a library")
    with pytest.raises(EdgeccError) as info:
        run_library(bogus, get_target("x86"), {"a": np.zeros(1, np.float32)}, ["y"])
    message = str(info.value)
    assert message.startswith("running bogus.so for x86 failed: ")
    assert "\n" not in message and len(message) > len("running bogus.so for x86 failed: ")


def test_cuda_target_without_device(monkeypatch):
    monkeypatch.setattr(runtime, "has_cuda_device", lambda: False)
    with pytest.raises(ToolchainError) as info:
        run_library(Path("m.so"), get_target("jetson-orin"), {}, ["y"])
    assert str(info.value) == (
        "package targets CUDA (jetson-orin); no CUDA device on this machine: copy it to the board"
    )
    assert info.value.exit_code == EXIT_TOOLCHAIN


def test_missing_qemu_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(ToolchainError, match="install the Debian package qemu-user"):
        run_library(Path("m.so"), get_target("rpi4"), {}, ["y"])


def test_runner_imports_only_tvm_numpy_and_the_standard_library():
    # run.py ships in every package: a board has Python, numpy and the TVM runtime, nothing else
    tree = ast.parse(RUNNER.read_text())
    modules = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    modules |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert modules == {"hashlib", "json", "math", "os", "sys", "numpy", "tvm"}


def fake_prepared(root: Path) -> None:
    (root / "sysroot" / emu.PYTHON).parent.mkdir(parents=True)
    (root / "sysroot" / emu.PYTHON).write_text("")
    (root / emu.MARKER).write_text(json.dumps({}))


def test_prepare_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECC_CACHE", str(tmp_path))
    fake_prepared(tmp_path / emu.CACHE_NAME)
    monkeypatch.setattr(emu, "_build", lambda *a: pytest.fail("rebuilt a prepared cache"))
    assert runtime.prepare_emulator() == tmp_path / emu.CACHE_NAME


def test_interrupted_prepare_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECC_CACHE", str(tmp_path))
    monkeypatch.setattr(emu, "qemu_binary", lambda: "/usr/bin/qemu-aarch64")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    calls: list[list[str]] = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd)
        if cmd[0] == "dpkg":
            (Path(cmd[-1]) / emu.PYTHON).parent.mkdir(parents=True, exist_ok=True)
            (Path(cmd[-1]) / emu.PYTHON).write_text("")
        if "download" in cmd and "pip" in cmd:
            raise ToolchainError("preparing the aarch64 emulator: pip failed: no network")
        if cmd[:1] == ["apt-get"] and "download" in cmd:
            (Path(cwd) / "python3.11-minimal_arm64.deb").write_text("")

    monkeypatch.setattr(emu, "_run", fake_run)
    lines: list[str] = []
    with pytest.raises(ToolchainError, match="pip failed: no network"):
        runtime.prepare_emulator(progress=lines.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{emu.CACHE_NAME}.lock"]
    assert any("-oAPT::Architecture=arm64" in c for c in calls[0])
    assert any("apt-get update" in line for line in lines)


def test_emulated_python_command(tmp_path, monkeypatch):
    fake_prepared(tmp_path)
    monkeypatch.setattr(emu, "qemu_binary", lambda: "/usr/bin/qemu-aarch64")
    monkeypatch.setenv("PYTHONHOME", "/somewhere")
    cmd, env = emu.emulated_python(tmp_path)
    assert cmd == [
        "/usr/bin/qemu-aarch64",
        "-L",
        str(tmp_path / "sysroot"),
        str(tmp_path / "sysroot" / emu.PYTHON),
    ]
    assert env["PYTHONPATH"] == str(tmp_path / "site") and "PYTHONHOME" not in env
