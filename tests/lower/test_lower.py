"""Lowering small graphs for each target family; x86 libraries run and match ONNX Runtime.

Tolerances: float32 kernels against ONNX Runtime (optimisations off) agree to ~1e-6 on these
graphs; the tests allow atol 1e-5.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from lower_models import conv_net, feeds_for, make_model, shapes_of, two_in_two_out
from onnx import TensorProto, helper

from edgecc.errors import EXIT_TOOLCHAIN, ToolchainError
from edgecc.lower import LoweredLibrary, OperatorConversionError, lower
from edgecc.lower import cuda as lower_cuda
from edgecc.report.compare import run_onnx
from edgecc.runtime import run_library
from edgecc.targets import get_target

ATOL = 1e-5
EM_X86_64, EM_AARCH64 = 62, 183
HAS_CROSS = shutil.which("aarch64-linux-gnu-gcc") is not None
needs_cross = pytest.mark.skipif(not HAS_CROSS, reason="aarch64-linux-gnu-gcc not installed")


def lower_model(model: onnx.ModelProto, target: str, out: Path) -> LoweredLibrary:
    shapes, dtypes = shapes_of(model)
    return lower(model, get_target(target), shapes, dtypes, out)


def elf_machine(path: Path) -> int:
    """ELF e_machine of a 64-bit little-endian shared object (asserts the header)."""
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2 and head[5] == 1  # ELF64, little-endian
    assert int.from_bytes(head[16:18], "little") == 3  # ET_DYN
    return int.from_bytes(head[18:20], "little")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_matches_ort(model: onnx.ModelProto, lib: LoweredLibrary, target: str) -> float:
    feeds = feeds_for(model)
    names = [o.name for o in model.graph.output]
    got = run_library(lib.path, get_target(target), feeds, names)
    ref = run_onnx(model, feeds)
    assert list(got) == names
    worst = 0.0
    for name in names:
        assert got[name].shape == ref[name].shape and got[name].dtype == ref[name].dtype
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=ATOL)
        worst = max(worst, float(np.max(np.abs(got[name] - ref[name]))))
    return worst


def test_x86_conv_bn_matches_onnxruntime(tmp_path):
    lib = lower_model(conv_net(), "x86", tmp_path / "m.so")
    assert lib.path == tmp_path / "m.so" and lib.cuda_code is None
    assert elf_machine(lib.path) == EM_X86_64
    assert lib.tvm_version.startswith("0.27") and lib.compile_seconds > 0
    assert '"kind":"llvm"' in lib.details["tvm_target"]
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind
    assert_matches_ort(conv_net(), lib, "x86")


def test_x86_two_inputs_two_outputs_keep_their_order(tmp_path):
    model = two_in_two_out()
    assert_matches_ort(model, lower_model(model, "x86", tmp_path / "m.so"), "x86")


def test_x86_torch_export_without_optimizer(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 5))
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 1.5)
    net.eval()
    x = torch.randn(1, 3, 8, 8)
    model = torch.onnx.export(net, (x,), dynamo=True, optimize=False, input_names=["x"]).model_proto
    lib = lower(model, get_target("x86"), {"x": (1, 3, 8, 8)}, {"x": "float32"}, tmp_path / "t.so")
    got = run_library(lib.path, get_target("x86"), {"x": x.numpy()}, ["y"])["y"]
    np.testing.assert_allclose(got, net(x).detach().numpy(), rtol=0, atol=ATOL)


def test_constant_value_ints_is_accepted(tmp_path):
    """TVM's importer reads only ``Constant.value``; lower() rewrites ``value_ints``."""
    nodes = [helper.make_node("Constant", [], ["shape"], name="k", value_ints=[3, 2]),
             helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])])
    assert_matches_ort(model, lower_model(model, "x86", tmp_path / "m.so"), "x86")


def test_conversion_failure_names_the_operator(tmp_path):
    """Expand of a Shape output passes the coverage check but TVM 0.27 cannot import it."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Expand", ["s", "reps"], ["y"], name="expand")]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.INT64, [2, 2])],
                       [helper.make_tensor("reps", TensorProto.INT64, [2], [2, 2])])
    with pytest.raises(OperatorConversionError, match="cannot convert Expand \\(e.g. expand\\)"):
        lower_model(model, "x86", tmp_path / "m.so")
    assert not (tmp_path / "m.so").exists()


@pytest.mark.parametrize("target", ["x86", pytest.param("rpi4", marks=needs_cross),
                                    pytest.param("jetson-orin", marks=needs_cross)])
def test_reproducible(tmp_path, target):
    first = lower_model(conv_net(), target, tmp_path / "a" / "m.so")
    second = lower_model(conv_net(), target, tmp_path / "b" / "m.so")
    assert sha256(first.path) == sha256(second.path)


@needs_cross
def test_rpi4_is_an_aarch64_library(tmp_path):
    lib = lower_model(conv_net(), "rpi4", tmp_path / "m.so")
    assert elf_machine(lib.path) == EM_AARCH64 and lib.cuda_code is None
    assert lib.details["compiler"].endswith("aarch64-linux-gnu-gcc")
    assert '"mcpu":"cortex-a72"' in lib.details["tvm_target"]


@needs_cross
@pytest.mark.emulation
@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="qemu-user not installed")
def test_rpi4_runs_under_emulation(tmp_path):
    model = two_in_two_out()
    assert_matches_ort(model, lower_model(model, "rpi4", tmp_path / "m.so"), "rpi4")


@needs_cross
def test_jetson_orin_host_library_with_device_code(tmp_path):
    lib = lower_model(conv_net(), "jetson-orin", tmp_path / "m.so")
    data = lib.path.read_bytes()
    assert elf_machine(lib.path) == EM_AARCH64
    if lower_cuda.find_nvcc() is not None:
        assert lib.cuda_code == "ptx" and b".target sm_87" in data
        assert b"__global__" not in data  # the CUDA source was replaced, not added
        assert lib.details["cuda_modules"] == ["ptx"] and lib.details["ptx_isa"]
        assert any("JIT-compiles" in note for note in lib.notes)
    else:
        assert lib.cuda_code == "source" and b"__global__" in data


@needs_cross
def test_jetson_without_nvcc_embeds_cuda_source(tmp_path, monkeypatch):
    monkeypatch.setattr(lower_cuda, "find_nvcc", lambda: None)
    lib = lower_model(conv_net(), "jetson-orin", tmp_path / "m.so")
    data = lib.path.read_bytes()
    assert lib.cuda_code == "source" and b"__global__" in data and b".target sm_" not in data
    assert any("nvcc was not found" in note for note in lib.notes)


@needs_cross
def test_jetson_xavier_sm72(tmp_path):
    nvcc = lower_cuda.find_nvcc()
    if nvcc is not None and "sm_72" not in nvcc.archs:  # CUDA 13 dropped Volta
        with pytest.raises(ToolchainError) as info:
            lower_model(conv_net(), "jetson-xavier", tmp_path / "m.so")
        assert str(info.value).startswith(f"CUDA {nvcc.release}'s nvcc cannot build sm_72 "
                                          "(jetson-xavier)")
        assert info.value.exit_code == EXIT_TOOLCHAIN
        assert not (tmp_path / "m.so").exists()
    else:
        lib = lower_model(conv_net(), "jetson-xavier", tmp_path / "m.so")
        expected = b".target sm_72" if nvcc else b"__global__"
        assert expected in lib.path.read_bytes()


def test_missing_cross_compiler_is_a_toolchain_error(tmp_path, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which",
                        lambda name, *a, **k: None if "aarch64" in name else real_which(name))
    with pytest.raises(ToolchainError, match="aarch64-linux-gnu-gcc for rpi4 not found on PATH: "
                                             "install the Debian package gcc-aarch64-linux-gnu"):
        lower_model(conv_net(), "rpi4", tmp_path / "m.so")
    assert not (tmp_path / "m.so").exists()
