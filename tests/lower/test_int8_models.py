"""End to end: small ResNet- and MobileNetV2-style nets through ``fold-bn,qdq`` (random
calibration, as ``edgecc compile --passes fold-bn,qdq --calib random``) run as integer kernels,
within one quantization step of ONNX Runtime (optimisations off) on the same QDQ graph.

The step of a float output (the classifier's Gemm output stays float) is the one the package's
check rule uses: one int8 step of the output's range on the probe input. One step, not zero:
ORT sums dequantized floats, the kernels sum exact integers, so an intermediate activation can
round to the neighbouring level (see :mod:`edgecc.lower.int8.anchors`).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import edgecc
from edgecc.cli import cli
from tests.lower.int8_graphs import ort_run
from tests.models import make_model

pytestmark = pytest.mark.slow  # two CNN compiles (~20 s each on an idle machine)


@pytest.fixture(scope="module", params=["resnetish", "mobilenetv2ish"])
def package(request, tmp_path_factory):
    model = make_model(request.param)
    pkg = edgecc.compile(
        model,
        "x86",
        example_inputs=model.example_inputs(),
        passes="fold-bn,qdq",
        calib="random",
        out=tmp_path_factory.mktemp(request.param) / "pkg",
    )
    return model, pkg


def test_every_quantized_layer_is_integer(package):
    _, pkg = package
    execution = pkg.manifest["int8_execution"]
    layers = execution["layers"]
    assert len(layers) >= 5
    assert all(e["execution"] == "integer" for e in layers), execution
    assert all(e.get("kernel") for e in layers), layers  # each names its fused kernel
    assert execution["summary"].startswith(f"{len(layers)} of {len(layers)} quantized layers")
    counts = pkg.manifest["library"]["schedules"]["counts"]
    assert "none" not in counts, counts  # every kernel, integer ones too, got a rule
    # every integer conv gets the int8 conv rule, also the residual ones whose kernel starts
    # with the skip tensor's dequantization (they fell to the serial reduction fallback: 90 %
    # of ResNet-18's int8 time)
    convs = [e for e in layers if e["op"] == "Conv"]
    assert convs and {e["rule"] for e in convs} == {"int8-conv2d"}, [
        (e["kernel"], e["rule"]) for e in convs
    ]


def test_within_one_step_of_onnx_runtime(package):
    import tvm
    from tvm import relax

    model, pkg = package
    graph = onnx.load(str(pkg.path / "model.onnx"))
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(pkg.library)), tvm.cpu())
    rng = np.random.default_rng(7)
    (step,) = pkg.manifest["check"]["steps"].values()  # one output
    for _ in range(4):
        x = rng.standard_normal(model.example_shape).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x))
        got = (got.numpy() if hasattr(got, "numpy") else got[0].numpy()).astype(np.float64)
        (ref,) = ort_run(graph, {pkg.input_names[0]: x})
        assert np.abs(got - ref).max() <= step + 1e-6, np.abs(got - ref).max() / step
        assert np.argmax(got) == np.argmax(ref)


def test_run_check_passes(package):
    _, pkg = package
    res = pkg.check(pkg.run())
    assert res["passed"], res


def test_inspect_prints_each_layer(package):
    _, pkg = package
    out = CliRunner().invoke(cli, ["inspect", str(pkg.path)])
    assert out.exit_code == 0, out.output
    lines = [line for line in out.output.splitlines() if line.startswith("int8")]
    layers = pkg.manifest["int8_execution"]["layers"]
    assert len(lines) == 1 + len(layers)
    assert all("integer" in line for line in lines[1:])
