"""Trusting a package: validation on load, the library's sha256, the shipped runner (natively
and under aarch64 emulation exactly as a board runs it), agreement with the source model and
``--min-cosine``, NaN outputs, the summary's sizes and notes, and ``bench`` under emulation.

Models are small ONNX MLPs built here, so each compile takes seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.cli import main
from edgecc.errors import EXIT_CHECK_FAILED, EXIT_USER

RUN_PY = "run.py"


def mlp(path: Path) -> Path:
    """x[1, 64] -> Gemm 64x64 -> Relu -> Gemm 64x8 -> y, seeded weights."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(64, 64)).astype("f") / 8, "w1"),
        numpy_helper.from_array(rng.normal(size=64).astype("f") / 8, "b1"),
        numpy_helper.from_array(rng.normal(size=(64, 8)).astype("f") / 8, "w2"),
        numpy_helper.from_array(rng.normal(size=8).astype("f") / 8, "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_error(err: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("edgecc: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlp(tmp_path_factory.mktemp("model") / "mlp.onnx")


@pytest.fixture(scope="module")
def package(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "mlp"
    assert main(["-q", "compile", str(model_file), "-o", str(out)]) == 0
    return out


@pytest.fixture
def copy(package: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(package, dest)
    return dest


def run_py(pkg: Path, *args: str, python: list[str] | None = None, env=None, cwd=None):
    """The package's runner, started as a user would (from the package folder by default)."""
    return subprocess.run(
        [*(python or [sys.executable]), RUN_PY, *args],
        cwd=cwd or pkg,
        capture_output=True,
        text=True,
        env=env,
    )


# --- the shipped runner ----------------------------------------------------------------------


def test_every_package_ships_the_runner(package: Path) -> None:
    from edgecc.runtime import RUNNER

    assert (package / RUN_PY).read_bytes() == RUNNER.read_bytes()
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["check"] == {"kind": "fp32", "max_rel_diff": 1e-3, "min_cosine": 0.9999}


def test_runner_natively_checks_against_the_reference(package: Path, tmp_path: Path) -> None:
    proc = run_py(package, "--check", "--repeat", "2", "--output", str(tmp_path / "y.npz"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["check"]["passed"] and report["check"]["rule"]["kind"] == "fp32"
    assert report["check"]["vs_expected"]["max_rel_diff"] <= 1e-3
    assert report["check"]["vs_reference"]["cosine"] >= 0.9999
    assert report["outputs"] == {"y": {"shape": [1, 8], "dtype": "float32"}}
    assert len(report["timing"]["times_ms"]) == 2
    with np.load(package / "reference.npz") as ref, np.load(tmp_path / "y.npz") as y:
        assert y.files == ["y"]  # named by the manifest
        np.testing.assert_allclose(y["y"], ref["expected:y"], rtol=1e-4, atol=1e-5)  # vs ORT
    import edgecc

    # a different input runs, but --check refuses it (reference.npz holds the probe's outputs)
    np.savez(tmp_path / "x.npz", x=np.ones((1, 64), np.float32))
    proc = run_py(package, "--input", str(tmp_path / "x.npz"), "--output", str(tmp_path / "o.npz"))
    assert proc.returncode == 0, proc.stderr
    got = edgecc.load(package).run({"x": np.ones((1, 64), np.float32)})["y"]
    np.testing.assert_array_equal(y_of(tmp_path / "o.npz"), got)
    proc = run_py(package, "--input", str(tmp_path / "x.npz"), "--check")
    assert proc.returncode == EXIT_USER and "probe input" in proc.stderr


def y_of(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return data["y"]


def test_runner_fails_a_modified_library_and_bad_outputs(copy: Path) -> None:
    ref = dict(np.load(copy / "reference.npz"))
    ref["expected:y"] = ref["expected:y"] + 1.0  # as if the library computed something else
    np.savez(copy / "reference.npz", **ref)
    proc = run_py(copy, "--check")
    assert proc.returncode == EXIT_CHECK_FAILED and "check FAILED" in proc.stderr
    with open(copy / "model.so", "ab") as f:
        f.write(b"\0")
    proc = run_py(copy, "--check")
    assert proc.returncode == EXIT_USER and "sha256" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.emulation
def test_runner_under_aarch64_emulation_as_on_the_board(model_file: Path, tmp_path: Path) -> None:
    from edgecc.runtime import emulation, prepare_emulator

    out = tmp_path / "rpi4"
    assert main(["-q", "compile", str(model_file), "-t", "rpi4", "-o", str(out)]) == 0
    assert (out / "model.so").read_bytes()[18:20] == (183).to_bytes(2, "little")  # EM_AARCH64
    python, env = emulation.emulated_python(prepare_emulator())
    proc = run_py(out, "--check", "--repeat", "1", python=python, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["check"]["passed"] and report["device"] == "cpu"
    assert report["check"]["vs_expected"]["max_rel_diff"] <= 1e-3


# --- damaged packages ------------------------------------------------------------------------


def _damage(pkg: Path, case: str) -> None:
    if case == "manifest-empty":
        (pkg / "manifest.json").write_text("{}")
    elif case == "manifest-list":
        (pkg / "manifest.json").write_text("[1, 2]")
    elif case == "manifest-garbage":
        (pkg / "manifest.json").write_text("{not json")
    elif case == "report-list":
        (pkg / "report.json").write_text("[]")
    elif case == "reference-corrupt":
        (pkg / "reference.npz").write_bytes(b"PK\x03\x04 broken")
    else:  # "missing:<file>"
        (pkg / case.split(":")[1]).unlink()


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("manifest-empty", "damaged manifest: 'library' is missing"),
        ("manifest-list", "damaged manifest: a JSON list, not an object"),
        ("manifest-garbage", "corrupt manifest"),
        ("report-list", "damaged report"),
        ("missing:reference.npz", "reference.npz is missing"),
        ("missing:model.onnx", "model.onnx is missing"),
        ("missing:model.so", "model.so is missing"),
        ("missing:manifest.json", "is not an edgecc package"),
    ],
)
def test_damaged_package_is_one_line_exit_2(
    copy: Path, case: str, pattern: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _damage(copy, case)
    for command in ("run", "inspect"):
        code, _, err = _cli(capsys, command, copy)
        assert code == EXIT_USER, (command, err)
        _one_error(err, pattern)


def test_corrupt_reference_is_one_line_exit_2(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _damage(copy, "reference-corrupt")
    code, _, err = _cli(capsys, "run", copy, "--check")
    assert code == EXIT_USER
    _one_error(err, "cannot read")


def test_modified_library_is_refused_before_loading(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with open(copy / "model.so", "ab") as f:
        f.write(b"\0")
    code, _, err = _cli(capsys, "run", copy)
    assert code == EXIT_USER
    _one_error(err, "does not match the manifest's")


# --- NaN outputs, agreement with the source, --min-cosine ------------------------------------


def test_nan_outputs_fail_the_check(
    package: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgecc.package import Package

    monkeypatch.setattr(
        Package, "run", lambda self, *a, **k: {"y": np.full((1, 8), np.nan, np.float32)}
    )
    code, out, _ = _cli(capsys, "run", package, "--check")
    assert code == EXIT_CHECK_FAILED
    assert "check FAILED" in out and "8 NaN/Inf values" in out


def test_lossy_compile_warns_and_min_cosine_gates(
    model_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    lossy = "lowrank(ratio=0.1)"
    out = tmp_path / "gated"
    code, _, err = _cli(
        capsys, "compile", model_file, "--passes", lossy, "--min-cosine", "0.99", "-o", out
    )
    assert code == EXIT_CHECK_FAILED
    _one_error(err, "is below --min-cosine 0.99")
    assert not out.exists()

    out = tmp_path / "lossy"
    caplog.clear()
    code, stdout, err = _cli(capsys, "compile", model_file, "--passes", lossy, "-o", out)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "is below 0.99" in warnings[0], warnings
    cos = json.loads((out / "report.json").read_text())["graph_vs_reference"]["cosine"]
    assert cos < 0.99 and f"cosine {cos:.6f}" in stdout

    code, stdout, _ = _cli(capsys, "run", out, "--check")  # the library matches its graph
    assert code == 0 and "check PASSED" in stdout
    assert "warning: cosine below 0.99 against the source model" in stdout
    code, stdout, _ = _cli(capsys, "--json", "run", out, "--check", "--min-cosine", "0.99")
    assert code == EXIT_CHECK_FAILED
    assert json.loads(stdout)["check"]["vs_reference"]["cosine"] == pytest.approx(cos, abs=1e-5)
    code, _, err = _cli(capsys, "run", out, "--min-cosine", "0.99")
    assert code == EXIT_USER
    _one_error(err, "--min-cosine needs --check")
    proc = run_py(out, "--check", "--min-cosine", "0.99")
    assert proc.returncode == EXIT_CHECK_FAILED and "float reference" in proc.stderr


def test_api_min_cosine(model_file: Path, tmp_path: Path) -> None:
    import edgecc
    from edgecc.errors import CheckFailedError

    with pytest.raises(CheckFailedError, match="below --min-cosine 0.99"):
        edgecc.compile(model_file, passes="lowrank(ratio=0.1)", min_cosine=0.99, out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


# --- summary, inspect, bench -----------------------------------------------------------------


def test_summary_and_inspect_sizes_int8_line_and_notes(
    model_file: Path, copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(capsys, "inspect", copy)
    size = (copy / "model.so").stat().st_size
    assert code == 0 and f"model.so {size}" in out and "model.onnx" in out
    assert "int8 " not in out  # no QDQ in this package
    assert "fp32 rule" in out
    code, out, err = _cli(
        capsys, "compile", model_file, "--passes", "qdq", "--calib", "random", "-o", tmp_path / "q"
    )
    assert code == 0, err
    assert f"model.so {(tmp_path / 'q' / 'model.so').stat().st_size}" in out
    code, out, _ = _cli(capsys, "inspect", tmp_path / "q")
    assert "int8      " in out and "quantized rule" in out
    code, out, _ = _cli(capsys, "run", tmp_path / "q", "--check")
    assert code == 0 and "(quantized rule)" in out and "quantization steps" in out


def test_jetson_caveat_at_compile_and_in_inspect(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "j"
    code, stdout, err = _cli(capsys, "compile", model_file, "-t", "jetson-orin", "-o", out)
    assert code == 0, err
    notes = json.loads((out / "manifest.json").read_text())["library"]["notes"]
    assert notes and any("CUDA" in n for n in notes)
    for note in notes:
        assert f"note: {note}" in stdout
    code, stdout, _ = _cli(capsys, "inspect", out)
    for note in notes:
        assert f"note      {note}" in stdout


def test_bench_under_emulation_prints_no_ratio(
    package: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import edgecc.runtime.bench as bench

    real = bench.benchmark_library
    monkeypatch.setattr(
        bench, "benchmark_library", lambda *a, **k: {**real(*a, **k), "emulated": True}
    )
    code, out, _ = _cli(capsys, "bench", package, "--repeat", "2", "--warmup", "0")
    assert code == 0 and "no ratio" in out and "edgecc/ORT" not in out
    code, out, _ = _cli(capsys, "--json", "bench", package, "--repeat", "2", "--warmup", "0")
    assert json.loads(out)["ratio"] is None
