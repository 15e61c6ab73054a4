"""benchmark_library and the runner's timing flags: the fields are there and consistent.

No timing assertions (speed lives in scripts/benchmark.py): only counts, orderings of the
statistics of one sample set, and that timing leaves the runner's outputs alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecc.errors import UserInputError
from edgecc.runtime import RUNNER
from edgecc.runtime.bench import benchmark_library
from edgecc.targets import get_target
from tests.runtime.test_runtime import build_add_library

FEEDS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 10, 100], np.float32)}


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    return build_add_library(tmp_path_factory.mktemp("lib") / "add.so")


def test_benchmark_fields(library):
    result = benchmark_library(library, get_target("x86"), FEEDS, repeat=7, warmup=2, threads=1)
    assert result["repeat"] == 7 and result["warmup"] == 2 and len(result["times_ms"]) == 7
    assert result["threads"] == 1 and result["device"] == "cpu" and result["target"] == "x86"
    assert result["emulated"] is False and result["outputs"] == 1
    times = result["times_ms"]
    assert all(t >= 0 for t in times)
    assert result["min_ms"] == min(times) and result["max_ms"] == max(times)
    assert result["min_ms"] <= result["q1_ms"] <= result["median_ms"] <= result["q3_ms"]
    assert result["q3_ms"] <= result["max_ms"]
    assert result["iqr_ms"] == pytest.approx(result["q3_ms"] - result["q1_ms"])
    assert result["median_ms"] == pytest.approx(float(np.median(times)))
    json.dumps(result)  # serialisable as returned


def test_threads_default_comes_from_the_environment(library, monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    result = benchmark_library(library, get_target("x86"), FEEDS, repeat=1, warmup=0)
    assert result["threads"] == 2 and len(result["times_ms"]) == 1


@pytest.mark.parametrize("kwargs", [{"repeat": 0}, {"warmup": -1}, {"threads": 0}])
def test_bad_counts_are_refused(library, kwargs):
    with pytest.raises(UserInputError, match="benchmark needs repeat >= 1"):
        benchmark_library(library, get_target("x86"), FEEDS, **kwargs)


def run_runner(library: Path, work: Path, *options: str) -> subprocess.CompletedProcess:
    np.savez(work / "in.npz", **FEEDS)
    return subprocess.run(
        [
            sys.executable,
            str(RUNNER),
            "--library",
            str(library),
            "--input",
            str(work / "in.npz"),
            "--output",
            str(work / "out.npz"),
            *options,
        ],
        capture_output=True,
        text=True,
    )


def test_timing_flags_keep_the_outputs(library, tmp_path):
    proc = run_runner(
        library, tmp_path, "--device", "cpu", "--repeat", "3", "--timings", str(tmp_path / "t.json")
    )
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "out.npz") as data:
        np.testing.assert_array_equal(data["out0"], FEEDS["a"] + 2 * FEEDS["b"])
    timings = json.loads((tmp_path / "t.json").read_text())
    assert timings["warmup"] == 0 and len(timings["times_ms"]) == 3


@pytest.mark.parametrize(
    "options, message",
    [
        (["--timings", "t.json"], "--warmup and --timings need --repeat"),
        (["--repeat", "x", "--timings", "t.json"], "--repeat needs a value"),
        (["--repeat", "0", "--timings", "t.json"], "--repeat must be >= 1"),
    ],
)
def test_runner_refuses_bad_timing_flags(library, tmp_path, options, message):
    proc = run_runner(library, tmp_path, *options)
    assert proc.returncode != 0 and message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out.npz").exists()
