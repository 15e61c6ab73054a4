"""End to end: real architectures compiled through edgecc and TVM, compared with torch.

x86 packages run natively; the rpi4 package runs under qemu-user emulation; the Jetson package
is checked for its aarch64 host library and sm_87 device code (no GPU here). Compressed
pipelines compile for every target family and their x86 output matches ONNX Runtime running the
same transformed ONNX.

Tolerances: fp32 packages vs torch, max abs diff <= 1e-4 scaled by the output's magnitude
(``rtol=1e-4, atol=1e-4 * max|ref|``); compressed packages vs ONNX Runtime on the transformed
graph: max relative diff <= 1e-3 and cosine >= 0.9999 (int8 QDQ graphs execute as float
arithmetic in TVM, so rounding-boundary flips are possible but rare).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import edgecc
from edgecc.report.compare import compare_outputs
from tests.models import load_minilm, make_model

ARCHITECTURES = ["resnetish", "mobilenetv2ish", "tiny_transformer"]


def _assert_close_to_torch(outputs: dict[str, np.ndarray], expected: torch.Tensor) -> float:
    (got,) = outputs.values()
    ref = expected.detach().numpy()
    scale = float(np.max(np.abs(ref)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)
    return float(np.max(np.abs(got - ref)))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_x86_matches_torch(name: str, tmp_path: Path) -> None:
    model = make_model(name)
    (x,) = model.example_inputs()
    pkg = edgecc.compile(model, "x86", example_inputs=(x,), out=tmp_path / name)
    x_new = model.example_inputs(seed=7)[0]
    outputs = pkg.run({pkg.input_names[0]: x_new.numpy()})
    _assert_close_to_torch(outputs, model(x_new))


def test_minilm_x86_matches_torch(tmp_path: Path) -> None:
    model, inputs = load_minilm(seq_len=16)
    pkg = edgecc.compile(model, "x86", example_inputs=inputs, out=tmp_path / "minilm")
    feeds = {k: v.numpy() for k, v in inputs.items() if k in pkg.input_names}
    outputs = pkg.run(feeds)
    expected = model(**inputs).last_hidden_state.detach().numpy()
    got = outputs[pkg.output_names[0]]
    assert got.shape == expected.shape
    np.testing.assert_allclose(
        got, expected, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(expected)))
    )


@pytest.mark.emulation
def test_rpi4_runs_under_emulation_and_matches_torch(tmp_path: Path) -> None:
    model = make_model("resnetish")
    (x,) = model.example_inputs()
    pkg = edgecc.compile(model, "rpi4", example_inputs=(x,), out=tmp_path / "rpi4")
    assert pkg.library.read_bytes()[18:20] == (183).to_bytes(2, "little")  # EM_AARCH64
    outputs = pkg.run()  # the probe input recorded at compile time
    _assert_close_to_torch(outputs, model(torch.from_numpy(pkg.probe_inputs()[pkg.input_names[0]])))


def test_jetson_package_has_aarch64_host_and_sm87_code(tmp_path: Path) -> None:
    model = make_model("mobilenetv2ish")
    pkg = edgecc.compile(
        model, "jetson-orin", example_inputs=model.example_inputs(), out=tmp_path / "j"
    )
    blob = pkg.library.read_bytes()
    assert blob[18:20] == (183).to_bytes(2, "little")
    cuda = pkg.manifest["library"]["cuda_code"]
    assert cuda in ("ptx", "source")
    assert (b".target sm_87" in blob) if cuda == "ptx" else (b"__global__" in blob)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    x = np.random.default_rng(3).standard_normal((32, 3, 32, 32)).astype(np.float32)
    np.savez(path, x=x)
    return path


COMPRESSED = "fold-bn,prune(ratio=0.3),qdq(method=entropy)"


@pytest.mark.parametrize("target", ["x86", "rpi4", "jetson-orin"])
def test_compressed_cnn_compiles_for_every_family(
    target: str, calib_file: Path, tmp_path: Path
) -> None:
    model = make_model("resnetish")
    pkg = edgecc.compile(
        model,
        target,
        example_inputs=model.example_inputs(),
        passes=COMPRESSED,
        calib=str(calib_file),
        out=tmp_path / target,
    )
    report = pkg.report
    assert report["stats"]["final"]["macs"] <= 0.75 * report["stats"]["input"]["macs"]
    execution = pkg.manifest["int8_execution"]  # the report says how int8 executes
    if target == "jetson-orin":
        assert "float" in execution
    else:  # every quantized layer runs as an integer kernel on CPU targets
        assert execution["layers"], execution
        assert all(e["execution"] == "integer" for e in execution["layers"]), execution
    if target == "x86":
        outputs = pkg.run()
        res = pkg.check(outputs)
        assert res["passed"], res


@pytest.mark.parametrize("target", ["x86", "rpi4", "jetson-orin"])
def test_transformer_lowrank_dynamic_quant(target: str, tmp_path: Path) -> None:
    model = make_model("tiny_transformer")
    pkg = edgecc.compile(
        model,
        target,
        example_inputs=model.example_inputs(),
        passes="lowrank(energy=0.9),dynamic-quant",
        out=tmp_path / "t",
    )
    # int8 weights: the tiny net is 0.61x on disk (graph structure dominates its bytes)
    assert pkg.report["stats"]["final"]["bytes"] < 0.7 * pkg.report["stats"]["input"]["bytes"]
    if target == "x86":  # MatMuls run as dynamic int8: the package's dynamic-int8 rule
        assert pkg.manifest["check"]["kind"] == "dynamic-int8"
        res = pkg.check(pkg.run())
        assert res["passed"], res


def test_sparsify_and_lowrank_cnn_matches_ort(tmp_path: Path) -> None:
    model = make_model("mobilenetv2ish")
    pkg = edgecc.compile(
        model,
        "x86",
        example_inputs=model.example_inputs(),
        passes="fold-bn,sparsify(amount=0.5),lowrank(energy=0.9)",
        out=tmp_path / "s",
    )
    res = compare_outputs(pkg.run(), pkg.expected_outputs())
    assert res["max_rel_diff"] <= 1e-3 and res["cosine"] >= 0.9999, res
