"""lower_tuned: a tuned library computes the same as ONNX Runtime; refusals; intrinsics stay light.

No timing assertions: whether tuning pays is measured by ``scripts/benchmark.py --tune-trials``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgecc.errors import ToolchainError
from edgecc.lower.tune import intrinsics_registrar, lower_tuned
from edgecc.report.compare import run_onnx
from edgecc.runtime import run_library
from edgecc.targets import get_target


def matmul_relu_model():
    """y = relu(x @ W + b), 8x32 @ 32x16: one fused kernel with a reduction to schedule."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [32, 16], rng.standard_normal((32, 16)).ravel())
    b = helper.make_tensor("b", TensorProto.FLOAT, [16], rng.standard_normal(16))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["z"]),
             helper.make_node("Relu", ["z"], ["y"])]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 16])],
                              [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.slow
@pytest.mark.parametrize("builder", ["inprocess", "local"])
def test_tuned_library_matches_onnx_runtime(tmp_path, builder):
    model = matmul_relu_model()
    lib = lower_tuned(model, get_target("x86"), {"x": (8, 32)}, {"x": "float32"},
                      tmp_path / "m.so", trials_per_task=2, work_dir=tmp_path / "tuning",
                      builder=builder)
    assert lib.details["tuning"]["builder"] == builder
    assert lib.details["tuning"]["kernels_tuned"] >= 1
    assert lib.details["tuning"]["trials_per_task"] == 2
    assert (tmp_path / "tuning" / "database_tuning_record.json").stat().st_size > 0
    x = np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32)
    out = run_library(lib.path, get_target("x86"), {"x": x}, ["y"])["y"]
    np.testing.assert_allclose(out, run_onnx(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_refuses_targets_it_cannot_time_here(tmp_path):
    with pytest.raises(ToolchainError, match="rpi4 is not a x86_64 CPU target"):
        lower_tuned(matmul_relu_model(), get_target("rpi4"), {"x": (8, 32)}, {"x": "float32"},
                    tmp_path / "m.so")


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="need trials_per_task >= 1 and builder"):
        lower_tuned(matmul_relu_model(), get_target("x86"), {"x": (8, 32)}, {"x": "float32"},
                    tmp_path / "m.so", trials_per_task=0)


def test_registrar_imports_only_the_target_intrinsics():
    code = ("import sys\nfrom edgecc.lower.tune import intrinsics_registrar\n"
            "intrinsics_registrar('x86_64')()\nimport tvm.s_tir.tensor_intrin\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('tvm.s_tir.tensor_intrin.'))\n"
            "print(','.join(loaded))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])  # this checkout's edgecc
    assert proc.returncode == 0, proc.stderr
    assert "tvm.s_tir.tensor_intrin.x86" in proc.stdout.strip().split(",")
    assert "tvm.s_tir.tensor_intrin.cuda" not in proc.stdout
    assert callable(intrinsics_registrar("aarch64"))
