"""Time a compiled library where it runs: :func:`benchmark_library`.

The timing happens inside the runner process (:mod:`edgecc.runtime._runner` with ``--repeat``),
around the VM's ``main`` only: process start, library load and input transfer are not counted.
Absolute times drift between runs and machines, so compare them with peers measured in the same
run (``scripts/benchmark.py`` reports ratios to ONNX Runtime and PyTorch). Times measured under
qemu emulation (aarch64 libraries on an x86 host) say nothing about the board's speed; the
result says ``"emulated": true`` then.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgecc.errors import UserInputError
from edgecc.runtime import _call_runner, host_arch
from edgecc.targets import Target

__all__ = ["benchmark_library"]


def benchmark_library(
    library: Path,
    target: Target,
    inputs: Mapping[str, np.ndarray],
    repeat: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run ``library`` ``warmup`` times untimed, then ``repeat`` timed runs; return the timings.

    Args:
        library: the shared library (built by :func:`edgecc.lower.lower` for ``target``).
        target: the target it was built for (decides where and how it runs, as for
            :func:`edgecc.runtime.run_library`).
        inputs: input arrays, ordered as the model's inputs.
        repeat: number of timed runs (>= 1); each sample is one call of ``main``.
        warmup: untimed runs before the timed ones (>= 0), after one run that produces outputs.
        threads: TVM runtime threads (sets ``TVM_NUM_THREADS`` for the run); None leaves the
            environment as it is (TVM then uses ``TVM_NUM_THREADS``, ``OMP_NUM_THREADS`` or the
            physical core count).
        progress: called with one line per step (e.g. the emulator's first-use preparation).

    Returns:
        JSON-serialisable: ``median_ms``, ``q1_ms``, ``q3_ms``, ``iqr_ms``, ``min_ms``,
        ``max_ms``, ``mean_ms``, ``times_ms`` (every sample in order), ``repeat``, ``warmup``,
        ``threads`` (what the TVM runtime used), ``device`` (``cpu`` or ``cuda``), ``target``
        (the target's name), ``emulated`` (run under qemu: the times say nothing about the
        board) and ``outputs`` (number of output tensors).

    Raises:
        UserInputError: ``repeat`` < 1, ``warmup`` < 0 or ``threads`` < 1.
        ToolchainError: no way to run ``target`` here.
        EdgeccError: the run failed.
    """
    if repeat < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise UserInputError(
            f"benchmark needs repeat >= 1, warmup >= 0 and threads >= 1 "
            f"(got repeat={repeat}, warmup={warmup}, threads={threads})"
        )
    env = {"TVM_NUM_THREADS": str(threads)} if threads is not None else None
    with tempfile.TemporaryDirectory(prefix="edgecc-bench-") as work:
        timings_path = Path(work) / "timings.json"
        options = ["--repeat", str(repeat), "--warmup", str(warmup), "--timings", str(timings_path)]
        outputs = _call_runner(Path(library), target, inputs, Path(work), options, env, progress)
        timings: dict[str, Any] = json.loads(timings_path.read_text())
    timings.update(
        target=target.name,
        outputs=len(outputs),
        emulated=target.device != "cuda" and target.arch != host_arch(),
    )
    return timings
