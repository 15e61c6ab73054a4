"""The aarch64 path as it runs on a Raspberry Pi: an rpi4 package uploaded over RPC to the
emulated board (``edgecc rpc server --emulate``: the aarch64 Python and TVM runtime under
qemu-user, key ``rpi4``), loaded, run on the probe input and timed there. Its times mean
nothing; the outputs are checked against ONNX Runtime (the package's fp32 rule)."""

from __future__ import annotations

import json

import numpy as np

from edgecc.cli import main
from edgecc.package import Package
from edgecc.report.compare import run_onnx
from tests.rpc.rpc_farm import matmul_relu


def test_rpi4_package_runs_and_is_timed_on_the_emulated_board(capsys, farm, packages):
    farm.wait("rpi4")
    args = ["--rpc-tracker", farm.tracker, "--rpc-key", "rpi4"]
    code = main(["--json", "run", str(packages["rpi4"]), "--check", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["check"]["passed"]

    code = main(["--json", "bench", str(packages["rpi4"]), "--repeat", "3", "--warmup", "1", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert res["board_info"]["machine"] == "aarch64" and res["emulated"] is True
    assert len(res["edgecc"]["times_ms"]) == 3 and res["check"]["passed"]


def test_x86_package_is_refused_by_the_aarch64_board(capsys, farm, packages):
    farm.wait("rpi4")
    code = main(["run", str(packages["x86"]), "--rpc-tracker", farm.tracker, "--rpc-key", "rpi4"])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("edgecc: error: running model.so on board ")
    assert err.count("\n") == 1


def test_rpi4_outputs_match_onnx_runtime(farm, packages):
    from edgecc.rpc import run_package

    farm.wait("rpi4")
    pkg = Package(packages["rpi4"])
    x = np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)
    out = run_package(pkg, {"x": x}, farm.tracker, "rpi4", timeout=120)
    np.testing.assert_allclose(out["y"], run_onnx(matmul_relu(), {"x": x})["y"], rtol=1e-5)
