"""The CLI end to end on the bundled example, and every bad-input path.

Each bad input must give one line on stderr (no traceback), its documented exit code, and leave
nothing at the output path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgecc.cli import main
from edgecc.errors import EXIT_CHECK_FAILED, EXIT_TOOLCHAIN, EXIT_UNSUPPORTED, EXIT_USER

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tinycnn" / "model.pt"
SHAPE = "x:1x3x32x32"


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _assert_user_error(code: int, err: str, expected_code: int, pattern: str) -> None:
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.startswith("edgecc: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert pattern.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def x86_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "tinycnn"
    assert (
        main(
            [
                "-q",
                "compile",
                str(EXAMPLE),
                "--target",
                "x86",
                "--input-shape",
                SHAPE,
                "-o",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_compile_summary_and_files(x86_package: Path) -> None:
    # bench.json is written later by `edgecc bench` on this shared package, not by compile.
    names = sorted(p.name for p in x86_package.iterdir() if p.name != "bench.json")
    assert names == [
        "manifest.json",
        "model.onnx",
        "model.so",
        "reference.npz",
        "report.json",
        "run.py",
    ]
    manifest = json.loads((x86_package / "manifest.json").read_text())
    assert manifest["target"]["name"] == "x86"
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert manifest["source"]["format"] == "torchscript"
    assert (
        len(manifest["library"]["sha256"]) == 64
        and manifest["versions"]["apache-tvm"] == "0.27.0.post1"
    )


def test_run_check_passes_and_writes_outputs(
    x86_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, out, err = _cli(
        capsys,
        "--json",
        "run",
        x86_package,
        "--input",
        tmp_path / "x.npy",
        "--output",
        tmp_path / "y.npz",
        "--check",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["check"]["passed"] is True
    assert result["check"]["vs_expected"]["max_rel_diff"] <= 1e-3
    expected = torch.jit.load(str(EXAMPLE))(torch.from_numpy(x)).detach().numpy()
    with np.load(tmp_path / "y.npz") as y:
        (got,) = [y[k] for k in y.files]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # TVM vs torch


def test_run_check_failure_exit_code(
    x86_package: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from edgecc.package import Package

    real = Package.run
    monkeypatch.setattr(
        Package, "run", lambda self, *a, **k: {n: v + 1.0 for n, v in real(self, *a, **k).items()}
    )
    code, out, _ = _cli(capsys, "run", x86_package, "--check")
    assert code == EXIT_CHECK_FAILED
    assert "check FAILED" in out


def test_inspect_and_targets_and_passes(
    x86_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(capsys, "inspect", x86_package)
    assert code == 0 and "target    x86" in out and "pipeline" in out
    code, out, _ = _cli(capsys, "--json", "targets")
    names = {t["name"] for t in json.loads(out)["targets"]}
    assert {
        "x86",
        "x86-avx2",
        "x86-avx512",
        "rpi4",
        "arm64",
        "jetson-orin",
        "jetson-orin-nano",
        "jetson-xavier",
    } <= names
    code, out, _ = _cli(capsys, "passes")
    assert code == 0 and "fold-constants" in out


# --- bad input -------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model = Small().eval()
    paths = {
        "corrupt": tmp_path / "corrupt.pt",
        "pickle": tmp_path / "pickled.pt",
        "state_dict": tmp_path / "weights.pt",
        "truncated_onnx": tmp_path / "truncated.onnx",
        "custom_op": tmp_path / "custom.onnx",
    }
    paths["corrupt"].write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save(model, paths["pickle"])
    torch.save(model.state_dict(), paths["state_dict"])
    buf = torch.jit.trace(model, torch.randn(1, 3, 8, 8))
    torch.jit.save(buf, str(tmp_path / "ok.pt"))
    g = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("FancyOp", ["r"], ["y"], domain="com.example"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    )
    m.ir_version = 10
    onnx.save(m, str(paths["custom_op"]))
    ok_onnx = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    paths["truncated_onnx"].write_bytes(ok_onnx.SerializeToString()[:-7])
    paths["ok"] = tmp_path / "ok.pt"
    return paths


@pytest.mark.parametrize(
    "case,extra,code,pattern",
    [
        ("missing", [], EXIT_USER, "does not exist"),
        ("corrupt", ["--input-shape", "x:1x3x8x8"], EXIT_USER, "corrupt.pt"),
        ("truncated_onnx", [], EXIT_USER, "truncated.onnx"),
        ("pickle", ["--input-shape", "x:1x3x8x8"], EXIT_USER, "--trust-code"),
        ("state_dict", ["--input-shape", "x:1x3x8x8"], EXIT_USER, "state_dict"),
        ("ok", [], EXIT_USER, "--input-shape"),
        (
            "ok",
            ["--target", "pdp11", "--input-shape", "x:1x3x8x8"],
            EXIT_USER,
            "valid targets: x86-avx2",
        ),
        ("ok", ["--input-shape", "x:1xthree"], EXIT_USER, "x:1xthree"),
        (
            "ok",
            ["--input-shape", "x:1x3x8x8", "--passes", "no-such-pass"],
            EXIT_USER,
            "unknown pass",
        ),
        ("custom_op", [], EXIT_UNSUPPORTED, "FancyOp"),
    ],
)
def test_bad_input(
    case: str,
    extra: list[str],
    code: int,
    pattern: str,
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = files.get(case, tmp_path / "missing.pt")
    out = tmp_path / "out" / "pkg"
    got, _, err = _cli(capsys, "compile", src, "-o", out, *extra)
    _assert_user_error(got, err, code, pattern)
    assert not (tmp_path / "out").exists()  # nothing left behind, not even the parent we made
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_trusted_pickle_compiles(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _cli(
        capsys,
        "-q",
        "compile",
        files["pickle"],
        "--trust-pickle",
        "--input-shape",
        "x:1x3x8x8",
        "-o",
        tmp_path / "pkg",
    )
    assert code == 0, err
    assert (
        json.loads((tmp_path / "pkg" / "manifest.json").read_text())["source"]["format"] == "pickle"
    )


def test_unwritable_output(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = _cli(
        capsys, "compile", files["ok"], "--input-shape", "x:1x3x8x8", "-o", blocker / "pkg"
    )
    _assert_user_error(code, err, EXIT_USER, "cannot write")
    assert blocker.read_text() == "not a folder"


def test_debug_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "--debug", "compile", tmp_path / "missing.pt", "-o", tmp_path / "o")
    assert code == EXIT_USER and "Traceback" in err


def test_existing_non_package_output_is_not_replaced(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    code, _, err = _cli(
        capsys, "compile", files["ok"], "--input-shape", "x:1x3x8x8", "-o", precious
    )
    _assert_user_error(code, err, EXIT_USER, "not an edgecc package")
    assert (precious / "thesis.tex").read_text() == "keep me"


def test_probe_file_is_the_reference_input(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = np.random.default_rng(5).random((4, 3, 8, 8)).astype(np.float32)  # a small dataset
    np.save(tmp_path / "probe.npy", data)
    code, _, err = _cli(
        capsys,
        "-q",
        "compile",
        files["ok"],
        "--input-shape",
        "x:1x3x8x8",
        "--probe",
        tmp_path / "probe.npy",
        "-o",
        tmp_path / "pkg",
    )
    assert code == 0, err
    with np.load(tmp_path / "pkg" / "reference.npz") as ref:
        np.testing.assert_array_equal(ref["input:x"], data[:1])
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((1, 3, 9, 9), np.float32))
    code, _, err = _cli(
        capsys,
        "compile",
        files["ok"],
        "--input-shape",
        "x:1x3x8x8",
        "--probe",
        bad,
        "-o",
        tmp_path / "pkg2",
    )
    _assert_user_error(code, err, EXIT_USER, "probe array 'x' has shape [1, 3, 9, 9]")
    assert not (tmp_path / "pkg2").exists()


def test_dump_files_load_and_rows_agree_with_graphs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgecc.report.metrics import graph_stats

    dumps = tmp_path / "dumps"
    code, _, err = _cli(
        capsys,
        "-q",
        "compile",
        EXAMPLE,
        "--input-shape",
        SHAPE,
        "--passes",
        "fold-bn,prune(ratio=0.3)",
        "--dump-dir",
        dumps,
        "--time-passes",
        "-o",
        tmp_path / "pkg",
    )
    assert code == 0, err
    rows = json.loads((dumps / "summary.json").read_text())
    steps = [
        "000_input",
        "001_fold-constants",
        "002_expand-rnn",
        "003_qlinear-to-qdq",
        "004_remove-identity",
        "005_eliminate-dead",
        "006_fold-bn",
        "007_prune",
    ]
    assert [r["step"] for r in rows] == steps
    assert (dumps / "summary.tsv").read_text().splitlines()[0].startswith("step\tpass")
    for row in rows:
        model = onnx.load(str(dumps / f"{row['step']}.onnx"))
        onnx.checker.check_model(model)
        stats = graph_stats(model)
        assert (row["nodes"], row["params"], row["macs"]) == (
            len(model.graph.node),
            stats["params"],
            stats["macs"],
        )
        assert (dumps / f"{row['step']}.txt").read_text().count("\n") > row["nodes"]
    by_step = {r["step"]: r for r in rows}
    assert by_step["006_fold-bn"]["cosine"] > 0.999999  # exact
    assert by_step["007_prune"]["macs"] < 0.75 * by_step["006_fold-bn"]["macs"]
    report = json.loads((tmp_path / "pkg" / "report.json").read_text())
    assert [r["step"] for r in report["passes"]] == steps


def test_missing_cross_compiler_fails_before_any_work(
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    import edgecc.frontend

    real_which = shutil.which
    monkeypatch.setattr(
        shutil,
        "which",
        lambda name, *a, **k: None if "aarch64" in name else real_which(name, *a, **k),
    )
    monkeypatch.setattr(edgecc.frontend, "load_model", lambda *a, **k: pytest.fail("loaded"))
    code, _, err = _cli(
        capsys,
        "compile",
        files["ok"],
        "--input-shape",
        "x:1x3x8x8",
        "-t",
        "rpi4",
        "-o",
        tmp_path / "out" / "pkg",
    )
    _assert_user_error(code, err, EXIT_TOOLCHAIN, "gcc-aarch64-linux-gnu")
    assert not (tmp_path / "out").exists()


def test_bench_reports_a_ratio_to_onnxruntime(
    x86_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _cli(capsys, "--json", "bench", x86_package, "--repeat", "3", "--warmup", "1")
    assert code == 0, err
    res = json.loads(out)
    assert res["edgecc"]["repeat"] == 3 and len(res["edgecc"]["times_ms"]) == 3
    assert res["ratio"] == pytest.approx(
        res["edgecc"]["median_ms"] / res["onnxruntime"]["median_ms"]
    )
    assert res["edgecc"]["emulated"] is False
