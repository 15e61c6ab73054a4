"""Tuning for the Raspberry Pi 4 over RPC, end to end, on the emulated board (``rpi4``: the
aarch64 Python and TVM runtime under qemu-user, tests/rpc/rpc_farm.py).

`edgecc tune --target rpi4 --rpc-tracker --rpc-key rpi4` builds the candidates of a one-kernel
model for aarch64 (shared libraries linked by aarch64-linux-gnu-gcc: the board has no
compiler), times them on the board and commits them to the records; `edgecc compile --target
rpi4 --tuning-records` builds the package from them; `edgecc run --check` runs it on the board
against ONNX Runtime. Without a tracker, tuning rpi4 is refused in one line. Emulated times mean
nothing; no timing is asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgecc.cli import main
from tests.rpc.rpc_farm import matmul_relu

ELF_AARCH64 = 183  # e_machine of an aarch64 ELF file
ELF_SHARED = 3  # e_type of a shared object


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def elf_kind(path: Path) -> tuple[int, int]:
    """(e_type, e_machine) of a little-endian ELF file."""
    head = Path(path).read_bytes()[:20]
    assert head[:4] == b"\x7fELF", path
    return int.from_bytes(head[16:18], "little"), int.from_bytes(head[18:20], "little")


def test_rpi4_candidates_are_aarch64_shared_libraries():
    """The candidate builder for rpi4 over RPC links a shared library for aarch64 (no tar of
    object files, which the board would have to link itself)."""
    import shutil

    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from edgecc.lower.tune import intrinsics_registrar, tuning_target
    from edgecc.lower.tune_remote import candidate_builder
    from edgecc.targets import get_target

    a = te.placeholder((8, 8), name="a")
    b = te.compute((8, 8), lambda i, j: a[i, j] * 2.0, name="b")
    func = te.create_prim_func([a, b]).with_attr("global_symbol", "main")
    rpi4 = get_target("rpi4")
    register = intrinsics_registrar(rpi4.arch)
    builder = candidate_builder(rpi4, "inprocess", register, runner=object())
    assert builder != "inprocess"
    candidate = ms.builder.BuilderInput(tvm.IRModule({"main": func}), tuning_target(rpi4))
    (built,) = builder.build([candidate])
    try:
        assert built.error_msg is None, built.error_msg
        assert built.artifact_path.endswith(".so")
        assert elf_kind(built.artifact_path) == (ELF_SHARED, ELF_AARCH64)
    finally:
        shutil.rmtree(Path(built.artifact_path).parent, ignore_errors=True)
    # timed locally, an x86 build keeps MetaSchedule's own (tar) export
    assert candidate_builder(get_target("x86"), "inprocess", register, runner=None) == "inprocess"


def test_an_rpi4_tuning_refuses_x86_boards(farm):
    """Before tuning, one board of the key says what it is (edgecc's board_info)."""
    from edgecc.rpc import RPCError, make_runner

    farm.wait("x86")
    runner = make_runner(farm.tracker, "x86", timeout=20)
    runner.check_machine("x86_64", "x86")
    with pytest.raises(RPCError, match=r"of key 'x86' is a x86_64 machine, but rpi4 candidates"):
        runner.check_machine("aarch64", "rpi4")


def test_tuning_rpi4_without_a_board_is_refused_in_one_line(capsys, tmp_path):
    import onnx

    onnx.save(matmul_relu(), tmp_path / "m.onnx")
    args = ["tune", tmp_path / "m.onnx", "--target", "rpi4", "--trials", "2"]
    code, _, err = cli(capsys, *args, "--records", tmp_path / "r")
    assert code == 5 and len(err.strip().splitlines()) == 1, err
    assert "cannot be timed on this machine" in err and "--rpc-tracker" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.emulation
@pytest.mark.slow  # two compiles and three candidates under qemu: > 20 s even when idle
def test_tune_rpi4_on_the_board_then_compile_and_run_with_the_records(capsys, farm, tmp_path):
    import onnx

    from edgecc.lower.tune import records_digest

    farm.wait("rpi4")
    model, records = tmp_path / "m.onnx", tmp_path / "records"
    onnx.save(matmul_relu(), model)
    board = ["--rpc-tracker", farm.tracker, "--rpc-key", "rpi4"]
    code, out, err = cli(
        capsys, "--json", "-q", "tune", model, "--target", "rpi4", "--trials", "2",
        "--records", records, *board, "--rpc-timeout", "60",
    )  # fmt: skip
    assert code == 0, err
    facts = json.loads(out)["tuning"]
    assert facts["kernels_tuned"] == ["fused_matmul_relu1"], facts
    assert facts["baselines_measured"] == 1 and facts["measured"] == 2
    lines = (records / "database_tuning_record.json").read_text().splitlines()
    entries = [json.loads(line)[1] for line in lines]  # [trace, run_secs, target, args]
    assert len(entries) == 3  # the rule's baseline and two candidates, all timed on the board
    assert all(e[1] and 0 < float(e[1][0]) < 1e9 for e in entries)
    assert all(e[2]["mtriple"] == "aarch64-linux-gnu" for e in entries)

    code, out, err = cli(
        capsys, "--json", "-q", "compile", model, "--target", "rpi4",
        "--tuning-records", records, "-o", tmp_path / "pkg",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    tuning = manifest["library"]["tuning"]
    assert tuning["kernels_tuned"] == ["fused_matmul_relu1"] and tuning["kernels_rules"] == []
    assert tuning["records_sha256"] == records_digest(records) and "measured" not in tuning
    assert elf_kind(tmp_path / "pkg" / "model.so") == (ELF_SHARED, ELF_AARCH64)

    code, out, err = cli(capsys, "--json", "run", tmp_path / "pkg", "--check", *board)
    assert code == 0, err
    assert json.loads(out)["check"]["passed"]
