"""The farm on 127.0.0.1: addresses, `edgecc rpc status`, `run`/`bench` of an x86 package on an
x86 board over RPC (checked against ONNX Runtime as `run --check` does), and a tracker that is
down or a key without boards (one line, exit 2, at once). No timing assertions."""

from __future__ import annotations

import ast
import json
import sys
import time

import numpy as np
import pytest

from edgecc.cli import main
from edgecc.errors import EXIT_USER, UserInputError
from edgecc.package import Package
from edgecc.report.compare import run_onnx
from edgecc.rpc import RPCError, key_status, make_runner, parse_address, run_package
from edgecc.runtime import RPC_SERVER
from tests.rpc.rpc_farm import LOCAL, free_port, matmul_relu


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("text", "address"),
    [("10.0.0.2:9190", ("10.0.0.2", 9190)), (":9191", (LOCAL, 9191)), ("9192", (LOCAL, 9192))],
)
def test_addresses(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["pi:", "pi:port", "pi:70000", "pi:0"])
def test_bad_addresses_are_user_errors(text):
    with pytest.raises(UserInputError, match="expected HOST:PORT"):
        parse_address(text)


def test_key_status_counts_servers_per_key():
    summary = {
        "queue_info": {"rpi4": {"free": 1, "pending": 0}, "gone": {"free": 0, "pending": 0}},
        "server_info": [
            {"key": "server:rpi4", "addr": ["10.0.0.3", 9091]},
            {"key": "server:rpi4", "addr": ["10.0.0.2", 9091]},
        ],
    }
    (status,) = key_status(summary)  # a key without servers or waiting requests is left out
    assert status.to_dict() == {
        "key": "rpi4",
        "total": 2,
        "free": 1,
        "pending": 0,
        "servers": ["10.0.0.2:9091", "10.0.0.3:9091"],
    }


def test_tracker_down_is_one_line_and_exit_2_at_once(capsys, packages):
    down = f"{LOCAL}:{free_port()}"
    for command in (["run", packages["x86"], "--check"], ["bench", packages["x86"]]):
        start = time.monotonic()
        code, out, err = cli(capsys, *command, "--rpc-tracker", down, "--rpc-key", "x86")
        assert time.monotonic() - start < 10  # not TVM's 60 s of connection retries
        assert code == EXIT_USER and out == ""
        assert err.count("\n") == 1 and f"RPC tracker {down} is not reachable" in err
    with pytest.raises(RPCError, match="not reachable"):
        make_runner(down, "x86")


def test_rpc_options_go_together(capsys, packages):
    code, _, err = cli(capsys, "run", packages["x86"], "--rpc-tracker", f"{LOCAL}:9190")
    assert code == EXIT_USER and "--rpc-tracker and --rpc-key go together" in err


def test_status_lists_the_boards(capsys, farm):
    farm.wait("x86")
    code, out, _ = cli(capsys, "--json", "rpc", "status", "--tracker", farm.tracker)
    assert code == 0
    keys = {k["key"]: k for k in json.loads(out)["keys"]}
    assert keys["x86"]["total"] == 1 and keys["x86"]["servers"][0].startswith(f"{LOCAL}:")
    code, out, _ = cli(capsys, "rpc", "status", "--tracker", farm.tracker)
    assert code == 0 and f"tracker {farm.tracker}:" in out
    assert any(line.split()[:2] == ["x86", "1"] for line in out.splitlines())


def test_key_without_boards_fails_at_once(capsys, farm, packages):
    code, _, err = cli(
        capsys, "run", packages["x86"], "--rpc-tracker", farm.tracker, "--rpc-key", "nothing"
    )
    assert code == EXIT_USER and "no board serves key 'nothing'" in err


def test_run_on_an_x86_board_matches_onnx_runtime(capsys, farm, packages, tmp_path):
    farm.wait("x86")
    code, out, err = cli(
        capsys,
        "--json",
        "run",
        packages["x86"],
        "--check",
        "-o",
        tmp_path / "y.npz",
        "--rpc-tracker",
        farm.tracker,
        "--rpc-key",
        "x86",
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["check"]["passed"] and data["board"].startswith(f"{LOCAL}:")
    x = Package(packages["x86"]).probe_inputs()["x"]
    with np.load(tmp_path / "y.npz") as y:  # tolerance: the fp32 check rule's
        np.testing.assert_allclose(y["y"], run_onnx(matmul_relu(), {"x": x})["y"], rtol=1e-5)


def test_bench_on_an_x86_board(capsys, farm, packages):
    farm.wait("x86")
    code, out, err = cli(
        capsys,
        "--json",
        "bench",
        packages["x86"],
        "--repeat",
        "5",
        "--warmup",
        "1",
        "--rpc-tracker",
        farm.tracker,
        "--rpc-key",
        "x86",
    )
    assert code == 0, err
    res = json.loads(out)
    assert len(res["edgecc"]["times_ms"]) == 5 and res["edgecc"]["warmup"] == 1
    assert res["check"]["passed"] and res["ratio"] is None
    assert res["board_info"]["machine"] == "x86_64" and res["emulated"] is False


def test_inputs_travel_to_the_board(farm, packages):
    farm.wait("x86")
    pkg = Package(packages["x86"])
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    facts: dict = {}
    out = run_package(pkg, {"x": x}, farm.tracker, "x86", timeout=60, facts=facts)
    np.testing.assert_allclose(out["y"], run_onnx(matmul_relu(), {"x": x})["y"], rtol=1e-5)
    assert facts["key"] == "x86" and facts["board_info"]["key"] == "x86"


def test_board_server_imports_only_tvm_and_the_standard_library():
    # rpc_server.py is copied to boards that have Python, numpy and the TVM runtime only
    tree = ast.parse(RPC_SERVER.read_text())
    modules = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    modules |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert modules <= set(sys.stdlib_module_names) | {"tvm", "tvm_ffi"}
    assert {"tvm", "tvm_ffi"} <= modules
