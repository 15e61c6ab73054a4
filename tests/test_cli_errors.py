"""The CLI's error mapping and flags: every user error type exits 2 (or its class's code) with one
line; file-system errors on the user's paths are user errors; multi-line messages print their
first line (all with --debug); global flags after the command; help examples; folder modes."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import onnx
import pytest
from onnx import TensorProto, helper

import edgecc.api
from edgecc.cli import main
from edgecc.errors import (
    EXIT_INTERNAL,
    EXIT_UNSUPPORTED,
    EXIT_USER,
    UnsupportedOperatorError,
    UserInputError,
)
from edgecc.lower.build import _sayer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def relu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("m") / "relu.onnx"
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def package(relu: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("p") / "pkg"
    assert main(["-q", "compile", str(relu), "-o", str(out)]) == 0
    return out


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


class PassOptionError(UserInputError):
    """What a pass's option validation may raise (a subclass of a user error)."""


@pytest.mark.parametrize(
    "error,code,text",
    [
        (UserInputError("bad option ratio='abc' of pass prune"), EXIT_USER, "ratio='abc'"),
        (PassOptionError("prune: ratio must be a number, got 'abc'"), EXIT_USER, "'abc'"),
        (click.BadParameter("ratio must be a number"), EXIT_USER, "ratio must be"),
        (PermissionError(errno.EACCES, "Permission denied", "/ro/d"), EXIT_USER, "/ro/d"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/x.npz"), EXIT_USER, "Read-only"),
        (
            UnsupportedOperatorError("pass 3 qdq: unsupported operators: Foo"),
            EXIT_UNSUPPORTED,
            "Foo",
        ),
        (ValueError("a bug"), EXIT_INTERNAL, "internal error: ValueError: a bug"),
    ],
)
def test_error_types_map_to_their_exit_code_with_one_line(
    error: BaseException,
    code: int,
    text: str,
    relu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(edgecc.api, "compile", failing)
    got = main(["compile", str(relu), "-o", str(tmp_path / "o")])
    line = one_line(capsys.readouterr().err)
    assert got == code and text in line, line


def test_multi_line_message_prints_its_first_line(
    relu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    message = "ONNX Runtime cannot run m.onnx: Conv: channels differ\n  at node c1\n  more detail"

    def failing(*args, **kwargs):
        raise UserInputError(message)

    monkeypatch.setattr(edgecc.api, "compile", failing)
    assert main(["compile", str(relu), "-o", str(tmp_path / "o")]) == EXIT_USER
    line = one_line(capsys.readouterr().err)
    assert (
        line.startswith("edgecc: error: ONNX Runtime cannot run") and "(more with --debug)" in line
    )
    assert main(["--debug", "compile", str(relu), "-o", str(tmp_path / "o")]) == EXIT_USER
    err = capsys.readouterr().err
    assert "at node c1" in err and "more detail" in err and "Traceback" in err


def test_unsupported_operator_error_keeps_its_list() -> None:
    err = UnsupportedOperatorError([("Foo", 2, ["a", "b"])])
    assert err.unsupported == [("Foo", 2, ["a", "b"])] and "Foo x2" in str(err)


@pytest.mark.parametrize(
    "args,text",
    [
        (["--seed", "-1"], "--seed"),
        (["--dump-dir", "{file}"], "is a file"),
        (["--dump-dir", "{file}/sub"], "is not a folder"),
    ],
)
def test_bad_seed_and_dump_dir(
    args: list[str], text: str, relu: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = [a.replace("{file}", str(blocker)) for a in args]
    code = main(["compile", str(relu), "-o", str(tmp_path / "o"), *args])
    line = one_line(capsys.readouterr().err)
    assert code == EXIT_USER and text in line, line
    assert not (tmp_path / "o").exists() and blocker.read_text() == "x"


def _unprivileged() -> list[str] | None:
    """A command prefix that makes permission bits apply (root ignores them), or None."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    probe = subprocess.run(
        [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "true"], capture_output=True
    )
    return (
        [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]
        if not probe.returncode
        else None
    )


def test_read_only_places_are_user_errors(relu: Path, package: Path, tmp_path: Path) -> None:
    """``run -o``, ``compile -o`` and ``--dump-dir`` into a read-only folder: exit 2, one line."""
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("running as root without setpriv: permission bits cannot be tested")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cases = [
        ["-q", "run", str(package), "-o", str(ro / "y.npz")],
        ["-q", "compile", str(relu), "-o", str(ro / "pkg")],
        ["-q", "compile", str(relu), "-o", str(tmp_path / "pkg"), "--dump-dir", str(ro / "d")],
    ]
    try:
        for args in cases:
            proc = subprocess.run(
                [*prefix, sys.executable, "-m", "edgecc", *args],
                capture_output=True,
                text=True,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
                timeout=300,
            )
            line = one_line(proc.stderr)
            assert proc.returncode == EXIT_USER, proc.stderr
            assert line.startswith("edgecc: error:") and str(ro) in line, line
        assert list(ro.iterdir()) == [] and not (tmp_path / "pkg").exists()
    finally:
        ro.chmod(0o755)


def test_global_flags_after_the_command(
    relu: Path, package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compile", str(relu), "-q", "-o", str(tmp_path / "p")]) == 0
    assert capsys.readouterr().err == ""  # -q after the command silences the progress lines
    assert main(["inspect", str(package), "--json"]) == 0
    assert capsys.readouterr().out.lstrip().startswith("{")
    assert main(["compile", str(tmp_path / "missing.onnx"), "--debug"]) == EXIT_USER
    assert "Traceback" in capsys.readouterr().err


def test_every_help_has_an_example_and_compile_lists_targets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from edgecc.targets import all_targets

    for command in ([], ["compile"], ["run"], ["bench"], ["inspect"], ["targets"], ["passes"]):
        assert main([*command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "Example" in out and "  edgecc " in out, command
        if command == ["compile"]:
            flat = " ".join(out.split())
            assert all(t.name in flat for t in all_targets())


def test_progress_lines_are_not_logged_twice(caplog: pytest.LogCaptureFixture) -> None:
    shown: list[str] = []
    with caplog.at_level(logging.INFO, logger="edgecc.lower.build"):
        _sayer(shown.append)("linking model.so")
        _sayer(None)("importing ONNX")
    assert shown == ["linking model.so"]  # shown by the caller ...
    assert [r.getMessage() for r in caplog.records] == ["importing ONNX"]  # ... not logged too


def test_package_and_parents_follow_the_umask(relu: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert main(["-q", "compile", str(relu), "-o", str(tmp_path / "a" / "pkg")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "pkg").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "a" / "pkg" / "manifest.json").stat().st_mode & 0o777 == 0o644
