"""SIGINT/SIGTERM and kills: ``edgecc: interrupted``, exit 130, the earlier package kept; a signal
after the rename does not lie (exit 0, new package); folders of killed compiles are removed.

In-process cases simulate what TVM's C++ code does with a ``KeyboardInterrupt`` (swallow it, or
turn it into a ``RuntimeError``); the subprocess cases send real signals at several moments of a
real compile (each waits for a progress line, then signals; bounded by timeouts).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgecc.lower
import edgecc.package
from edgecc import interrupt
from edgecc.cli import main
from edgecc.errors import EXIT_INTERRUPTED

ROOT = Path(__file__).resolve().parents[1]


def conv_model() -> onnx.ModelProto:
    """Two 3x3 convolutions and a Gemm: a second or two of TVM work (several kernels)."""
    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return helper.make_tensor(
            name, TensorProto.FLOAT, shape, rng.standard_normal(shape).ravel()
        )

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [
            init("w1", (8, 3, 3, 3)),
            init("b1", (8,)),
            init("w2", (8, 8, 3, 3)),
            init("b2", (8,)),
            init("w3", (10, 8)),
            init("b3", (10,)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def digest(pkg: Path) -> str:
    """One hash of every file of a package (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(pkg.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model file and a package compiled from it (copied per test as the 'old' package)."""
    root = tmp_path_factory.mktemp("built")
    onnx.save(conv_model(), str(root / "m.onnx"))
    assert main(["-q", "compile", str(root / "m.onnx"), "-o", str(root / "pkg")]) == 0
    return root / "m.onnx", root / "pkg"


@pytest.fixture
def old_package(built: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path, str]:
    model, pkg = built
    out = tmp_path / "out" / "pkg"
    shutil.copytree(pkg, out)
    (out / "report.json").write_text('{"marker": "the old package"}\n')  # tells old from new
    return model, out, digest(out)


def assert_interrupted(code: int, err: str, out: Path, before: str) -> None:
    assert code == EXIT_INTERRUPTED, err
    assert err.strip().splitlines()[-1] == "edgecc: interrupted", err
    assert "Traceback" not in err and "internal error" not in err, err
    assert digest(out) == before  # the earlier package is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no staging left


def _lower_then(effect: str):
    real = edgecc.lower.lower

    def fake(*args, **kwargs):
        result = real(*args, **kwargs)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler raises here
        except KeyboardInterrupt:
            if effect == "runtime-error":
                raise RuntimeError("TVM: something went wrong in C++") from None
            # "swallow": like TVM's C++ code, go on as if nothing happened
        return result

    return fake


@pytest.mark.parametrize("effect", ["swallow", "runtime-error"])
def test_signal_tvm_swallows_or_converts_still_interrupts(
    effect: str,
    old_package: tuple[Path, Path, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, out, before = old_package
    monkeypatch.setattr(edgecc.lower, "lower", _lower_then(effect))
    code = main(["compile", str(model), "-o", str(out)])
    assert_interrupted(code, capsys.readouterr().err, out, before)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_signal_after_the_rename_reports_success(
    old_package: tuple[Path, Path, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, out, before = old_package
    real = edgecc.package._publish

    def publish_then_signal(staging: Path, target: Path) -> None:
        real(staging, target)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the commit section

    monkeypatch.setattr(edgecc.package, "_publish", publish_then_signal)
    code = main(["compile", str(model), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err  # the new package is in place: exit 0 says so
    assert "after the output was written" in err
    assert digest(out) != before and "marker" not in (out / "report.json").read_text()


def test_stale_staging_and_link_folders_of_dead_pids_are_removed(
    built: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = built
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)  # a process that has exited
    alive = os.getppid()
    out = tmp_path / "pkg"
    stale = [tmp_path / f".pkg.staging-{pid}-abc", tmp_path / f".pkg.old-{pid}-def"]
    kept = [tmp_path / f".pkg.staging-{alive}-ghi", tmp_path / f".other.staging-{pid}-x"]
    tmp_root = tmp_path / "tmp"
    link_stale, link_kept = tmp_root / f"edgecc-link-{pid}-q", tmp_root / f"edgecc-link-{alive}-r"
    for d in [*stale, *kept, link_stale, link_kept]:
        (d / "sub").mkdir(parents=True)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_root))
    assert main(["-q", "compile", str(model), "-o", str(out)]) == 0
    assert not any(d.exists() for d in [*stale, link_stale])
    assert all(d.exists() for d in [*kept, link_kept])  # a live process's, another output's


def test_package_folder_honours_umask(built: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = built
    old = os.umask(0o027)
    try:
        assert main(["-q", "compile", str(model), "-o", str(tmp_path / "pkg")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "pkg").stat().st_mode & 0o777 == 0o750  # not mkdtemp's 0700


# --- real signals sent to a real compile -------------------------------------------------------


def _spawn(args: list[str], tmp: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp))
    tmp.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "edgecc", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _catches_sigterm(pid: int) -> bool:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("SigCgt:"):
            return bool(int(row.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _signal_at(proc: subprocess.Popen[str], line: str | None, sig: int, delay: float) -> str:
    """Wait for the progress ``line`` (or ``delay`` seconds from the start), send ``sig``,
    return all of stderr."""
    assert proc.stderr is not None
    seen = []
    if line is None:  # once edgecc's __main__ catches SIGTERM (Python's own start is not ours)
        deadline = time.monotonic() + 30
        while not _catches_sigterm(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
    else:
        for got in proc.stderr:
            seen.append(got)
            if line in got:
                break
        time.sleep(delay)
    proc.send_signal(sig)
    try:
        rest = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return "".join(seen) + rest


@pytest.mark.slow  # a real compile per case: ~8 s each on an idle machine, 20 s on a busy one
@pytest.mark.parametrize(
    "line,sig,delay",
    [
        (None, signal.SIGINT, 0.0),  # while Python imports edgecc.cli, click, ...
        ("importing ONNX into TVM Relax", signal.SIGINT, 0.0),
        ("running the llvm Relax pipeline", signal.SIGTERM, 0.2),
        ("building TIR kernels", signal.SIGINT, 0.3),
        ("linking", signal.SIGTERM, 0.0),
    ],
    ids=["imports", "onnx-import", "relax-pipeline", "llvm-build", "link"],
)
def test_real_signal_keeps_the_old_package(
    line: str | None,
    sig: int,
    delay: float,
    old_package: tuple[Path, Path, str],
    tmp_path: Path,
) -> None:
    model, out, before = old_package
    tmp = tmp_path / "tmp"
    proc = _spawn(["compile", str(model), "-o", str(out)], tmp)
    err = _signal_at(proc, line, sig, delay)
    assert_interrupted(proc.returncode, err, out, before)
    assert not list(tmp.glob("edgecc-*"))  # no edgecc-link-* left in the temp dir


@pytest.mark.slow
def test_sigkill_leftovers_are_removed_by_the_next_compile(
    old_package: tuple[Path, Path, str], tmp_path: Path
) -> None:
    model, out, before = old_package
    tmp = tmp_path / "tmp"
    proc = _spawn(["compile", str(model), "-o", str(out)], tmp)
    _signal_at(proc, "building TIR kernels", signal.SIGKILL, 0.3)
    assert digest(out) == before
    assert [p for p in out.parent.iterdir() if ".staging-" in p.name]  # what a kill leaves
    proc = _spawn(["-q", "compile", str(model), "-o", str(out)], tmp)
    assert proc.wait(timeout=120) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    assert not list(tmp.glob("edgecc-*"))
    assert digest(out) != before


def test_watchdog_ends_a_compile_stuck_where_python_never_runs(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    """A stand-in for C++ code that keeps swallowing the interrupt: the watchdog thread removes
    the staging folder and exits 130 after the grace period."""
    model, _ = built
    out = tmp_path / "pkg"
    code = (
        "import sys, time\n"
        "import edgecc.lower\n"
        "def stuck(*a, **k):\n"
        "    print('edgecc: stuck', file=sys.stderr, flush=True)\n"
        "    while True:\n"
        "        try:\n"
        "            time.sleep(0.1)\n"
        "        except KeyboardInterrupt:\n"
        "            pass\n"
        "edgecc.lower.lower = stuck\n"
        "from edgecc.cli import main\n"
        f"sys.exit(main(['compile', {str(model)!r}, '-o', {str(out)!r}]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    err = _signal_at(proc, "edgecc: stuck", signal.SIGTERM, 0.0)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.strip().splitlines()[-1] == "edgecc: interrupted"
    assert not list(tmp_path.iterdir())  # staging removed, no package


def test_remove_stale_ignores_unrelated_names(tmp_path: Path) -> None:
    (tmp_path / ".pkg.staging-notapid-x").mkdir()
    (tmp_path / "pkg").mkdir()
    assert interrupt.remove_stale(tmp_path, r"\.pkg\.staging-(?P<pid>\d+)-.+") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pkg.staging-notapid-x", "pkg"]
