"""Threads passed to the runner, and executed-instruction counts of emulated packages.

The qemu plugin is checked on a small aarch64 C program whose loop length is known (counts
must be exact and reproducible), and end to end through ``edgecc bench`` on an rpi4 package
(counts > 0, the two counting windows within 1%, no ratio to ONNX Runtime). No timing is
asserted anywhere.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import edgecc
from edgecc.cli import main
from edgecc.runtime import emulation
from edgecc.runtime.instructions import PROXY_NOTE, plugin_options, read_counts, summary_text
from tests.models import onnx_model, tensor
from tests.runtime.test_runtime import add_model

# A loop of N iterations between two of the runner's markers; the loop body is fixed asm.
LOOP_C = r"""
#include <stdlib.h>
#include <unistd.h>
static void mark(void) { lseek(-1, 0x656467656363LL, SEEK_SET); }
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    mark();
    for (long i = 0; i < n; i++) __asm__ volatile("nop\n\tnop\n\tnop" ::: "memory");
    mark();
    return 0;
}
"""


@pytest.fixture(scope="module")
def add_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "add.onnx"
    onnx.save(add_model(), str(path))
    return path


def _cli_json(capsys, *args) -> dict:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    return json.loads(cap.out)


def test_run_and_bench_pass_threads_to_the_runner(add_onnx, tmp_path, capsys):
    pkg = edgecc.compile(add_onnx, "x86", out=tmp_path / "pkg")
    cores = pkg.manifest["target"]["cores"]
    for threads in (1, 2):
        res = _cli_json(capsys, "--json", "run", pkg.path, "--threads", threads)
        assert res["threads"] == threads  # as the runner's TVM runtime reports it
    assert _cli_json(capsys, "--json", "run", pkg.path)["threads"] == cores
    res = _cli_json(
        capsys, "--json", "bench", pkg.path, "--repeat", "2", "--warmup", "0", "--threads", "1"
    )
    assert res["threads"] == 1 and res["edgecc"]["threads"] == 1 and "ratio" in res
    assert main(["run", str(pkg.path), "--threads", "0"]) == 2  # a user error


def test_plugin_is_built_once_into_the_cache(tmp_path, monkeypatch):
    if not shutil.which("gcc"):
        pytest.skip("no host gcc")
    monkeypatch.setenv("EDGECC_CACHE", str(tmp_path))
    lines: list[str] = []
    plugin = emulation.insn_plugin(lines.append)
    assert plugin.parent == tmp_path and plugin.is_file() and len(lines) == 1
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", str(plugin)], capture_output=True, text=True, check=True
    ).stdout
    assert "qemu_plugin_install" in symbols and "qemu_plugin_version" in symbols
    assert emulation.insn_plugin(lines.append) == plugin and len(lines) == 1  # cached


@pytest.fixture(scope="module")
def loop_program(tmp_path_factory) -> Path:
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if not cc or not shutil.which("qemu-aarch64"):
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64")
    work = tmp_path_factory.mktemp("loop")
    (work / "loop.c").write_text(LOOP_C)
    subprocess.run(
        [cc, "-O1", "-static", "-o", str(work / "loop"), str(work / "loop.c")], check=True
    )
    return work / "loop"


def _count_loop(program: Path, n: int, atomic: bool) -> tuple[int, list[int]]:
    count = program.with_name(f"count-{n}-{atomic}.txt")
    subprocess.run(
        ["qemu-aarch64", *plugin_options(count, atomic=atomic), str(program), str(n)], check=True
    )
    return read_counts(count)


@pytest.mark.emulation
def test_plugin_counts_exactly(loop_program):
    per_n = {}
    for n in (1000, 3000):
        total, marks = _count_loop(loop_program, n, atomic=False)
        assert len(marks) == 2 and 0 < marks[0] < marks[1] < total
        assert _count_loop(loop_program, n, atomic=True)[1] == marks  # both modes, reproducible
        per_n[n] = marks[1] - marks[0]
    # 3 nops + the loop's increment, compare and branch: a fixed count per iteration.
    per_iteration = (per_n[3000] - per_n[1000]) / 2000
    assert per_iteration == int(per_iteration) and 4 <= per_iteration <= 8
    assert per_n[1000] - 1000 * per_iteration < 50  # only the marker call's own instructions


def matmul_onnx(path: Path) -> Path:
    """y = relu(x @ w + b), 32x128 @ 128x64: ~0.3 M MACs, so an inference's instructions
    (millions) dwarf the runner's per-call overhead (~20 k, which varies by a few %)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["z"]),
        helper.make_node("Relu", ["z"], ["y"]),
    ]
    model = onnx_model(
        nodes,
        [tensor("x", [32, 128])],
        [tensor("y", [32, 64])],
        {
            "w": rng.standard_normal((128, 64)).astype(np.float32),
            "b": rng.standard_normal(64).astype(np.float32),
        },
    )
    onnx.save(model, str(path))
    return path


@pytest.mark.emulation
@pytest.mark.slow
def test_bench_counts_instructions_of_an_emulated_package(tmp_path, capsys):
    if not shutil.which("aarch64-linux-gnu-gcc"):
        pytest.skip("needs aarch64-linux-gnu-gcc")
    source = matmul_onnx(tmp_path / "mm.onnx")
    pkg = edgecc.compile(source, "rpi4", out=tmp_path / "pkg")
    res = _cli_json(capsys, "--json", "bench", pkg.path)
    assert res["emulated"] is True and "ratio" not in res and "onnxruntime" not in res
    counts = res["edgecc"]
    assert res["instructions_per_inference"] == counts["instructions_per_inference"] > 0
    first, second = counts["window_instructions_per_inference"]
    assert abs(first - second) <= 0.01 * first  # stable between the two counting windows
    assert counts["threads"] == 1 and counts["runs"] * counts["windows"] == 10
    assert counts["process_instructions"] > 11 * counts["instructions_per_inference"]
    # NEON fmla does 4 multiply-adds: at least one instruction per 4 MACs
    assert counts["instructions_per_inference"] > 32 * 128 * 64 // 4
    assert counts["qemu_cpu"] == "cortex-a72"
    assert res["note"] == PROXY_NOTE and "proxy" in PROXY_NOTE


def test_summary_states_the_count_and_that_it_is_a_proxy():
    counts = {
        "instructions_per_inference": 2_000_500.0,
        "window_instructions_per_inference": [2_000_000.0, 2_001_000.0],
        "target": "rpi4",
        "qemu_cpu": "cortex-a72",
        "threads": 1,
        "runs": 5,
        "windows": 2,
        "note": PROXY_NOTE,
    }
    first, second = summary_text(counts).splitlines()
    assert first.startswith("edgecc/TVM 2,000,500 instructions per inference (rpi4 under qemu")
    assert "mean of 10 inferences after a first" in first and "within 0.05%" in first
    assert second == PROXY_NOTE
