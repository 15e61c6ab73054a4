"""Executed instructions per inference of an emulated (aarch64) library: :func:`count_instructions`.

Time measured under qemu says nothing about a board, so for emulated packages edgecc counts the
guest instructions one inference executes instead. qemu runs the runner with edgecc's TCG plugin
(``qemu_insn_plugin.c``, built by :func:`edgecc.runtime.emulation.insn_plugin`), which adds up
the instructions of every executed translation block; qemu emulates the target's CPU model where
it has it (``-cpu cortex-a72`` for rpi4). The runner runs ``main`` once (the output
run, which also warms up), then ``runs`` more times between two marker calls the plugin records
(see :mod:`edgecc.runtime._runner`)::

    instructions per inference = (count at marker 2 - count at marker 1) / runs

which is the count after ``1 + runs`` inferences minus the count after 1, divided by ``runs``,
taken in one process, so Python's start and TVM's import (about 15 G instructions here) never
enter it.

Limits: instruction counts are a proxy for speed, not a board time. They ignore caches, memory
bandwidth, pipeline stalls and the cost differences between instructions (a NEON FMA and a scalar
add count the same), and qemu's ``-cpu max`` features are not the Cortex-A72's. They compare
kernels that do the same work (a scheduled vs an unscheduled build, edgecc vs another runtime
under the same qemu). With several threads every thread's instructions count, including the
thread pool's spin-waiting, which depends on the host's scheduling: count with 1 thread (the
default here) for reproducible figures.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgecc.errors import EdgeccError, UserInputError
from edgecc.runtime import _call_runner, is_emulated, thread_env
from edgecc.targets import Target

__all__ = ["PROXY_NOTE", "count_instructions", "plugin_options", "read_counts", "summary_text"]

PROXY_NOTE = (
    "instruction counts are a proxy: executed aarch64 instructions under qemu, not a board "
    "time (caches, memory and instruction costs are ignored)"
)
# lseek's syscall number per guest architecture: the runner's marker call.
LSEEK_SYSCALL = {"aarch64": 62}
# CPU models qemu-aarch64 7.2 emulates (``qemu-aarch64 -cpu help``); others run as ``max``.
QEMU_CPUS = ("cortex-a35", "cortex-a53", "cortex-a57", "cortex-a72", "cortex-a76", "neoverse-n1")


def qemu_cpu(target: Target) -> str:
    """The qemu CPU model for ``target``: its ``mcpu`` when qemu has it (rpi4: ``cortex-a72``,
    so the guest sees the board's features, e.g. no SVE or dot product), else ``max``."""
    mcpu = target.tvm_target.get("mcpu") if isinstance(target.tvm_target, dict) else None
    return mcpu if mcpu in QEMU_CPUS else "max"


def plugin_options(
    count_file: Path, arch: str = "aarch64", atomic: bool = False, progress: Any = None
) -> list[str]:
    """The ``qemu-<arch>`` options that load the counting plugin, writing to ``count_file``.

    Args:
        count_file: where the plugin writes its counts at exit (see :func:`read_counts`).
        arch: the guest architecture (decides the marker's syscall number).
        atomic: add counts atomically (needed for exact counts with several guest threads).
        progress: called with one line if the plugin has to be compiled first.
    """
    from edgecc.runtime.emulation import insn_plugin

    args = [str(insn_plugin(progress)), f"out={count_file}", f"marksys={LSEEK_SYSCALL[arch]}"]
    if atomic:
        args.append("atomic=on")
    return ["-plugin", ",".join(args)]


def read_counts(count_file: Path) -> tuple[int, list[int]]:
    """The plugin's output: the process's total instruction count and the count at each marker."""
    try:
        values = [int(line) for line in Path(count_file).read_text().split()]
    except (OSError, ValueError) as err:
        raise EdgeccError(f"the qemu instruction-counting plugin wrote no counts: {err}") from err
    if not values:
        raise EdgeccError("the qemu instruction-counting plugin wrote no counts")
    return values[0], values[1:]


def per_inference(marks: list[int], runs: int, windows: int = 1) -> list[float]:
    """Instructions per inference in each window of ``runs`` inferences between markers."""
    if len(marks) != windows + 1:
        raise EdgeccError(
            f"expected {windows + 1} counting markers from the runner, got {len(marks)}"
        )
    return [(after - before) / runs for before, after in zip(marks, marks[1:], strict=False)]


def count_instructions(
    library: Path,
    target: Target,
    inputs: Mapping[str, np.ndarray],
    runs: int = 10,
    threads: int | None = 1,
    windows: int = 1,
    progress: Callable[[str], None] | None = None,
    collect: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Executed guest instructions per inference of an emulated ``library`` (see the module doc).

    Args:
        library: an aarch64 CPU library built by :func:`edgecc.lower.lower` for ``target``.
        target: its target; must run under emulation on this host.
        inputs: input arrays, ordered as the model's inputs.
        runs: inferences counted after the first one (>= 1).
        threads: TVM runtime threads; 1 (default) gives reproducible counts, more count the
            thread pool's waiting too; None leaves the environment's choice.
        windows: count ``windows`` consecutive windows of ``runs`` inferences (>= 1); their
            spread shows how stable the count is.
        progress: called with one line per step (emulator or plugin preparation).
        collect: when given, the output arrays of the first inference are appended to it.

    Returns:
        JSON-serialisable: ``instructions_per_inference`` (over all windows),
        ``window_instructions_per_inference`` (one value per window), ``runs``, ``windows``,
        ``threads`` (what the TVM runtime used), ``process_instructions`` (the whole process:
        start, import, all runs), ``target``, ``qemu_cpu`` (the emulated CPU model),
        ``emulated`` (true), ``outputs`` (number of output tensors) and ``note``
        (:data:`PROXY_NOTE`).

    Raises:
        UserInputError: ``runs`` < 1, ``threads`` < 1, or ``target`` is not emulated here.
        ToolchainError: qemu, the emulator or the host C compiler is missing.
        EdgeccError: the run failed.
    """
    if runs < 1 or windows < 1 or (threads is not None and threads < 1):
        raise UserInputError(
            f"counting needs runs, windows and threads >= 1 (got {runs}, {windows}, {threads})"
        )
    if not is_emulated(target):
        raise UserInputError(
            f"instruction counts need an emulated target; {target.name} runs natively here"
        )
    with tempfile.TemporaryDirectory(prefix="edgecc-count-") as tmp:
        work = Path(tmp)
        count_file, info_file = work / "count.txt", work / "info.json"
        qemu = ["-cpu", qemu_cpu(target)]
        qemu += plugin_options(count_file, target.arch, atomic=threads != 1, progress=progress)
        options = ["--count-runs", str(runs), "--count-windows", str(windows)]
        options += ["--info", str(info_file)]
        outputs = _call_runner(
            Path(library), target, inputs, work, options, thread_env(threads), progress, qemu
        )
        total, marks = read_counts(count_file)
        if collect is not None:
            collect.extend(outputs)
        info = json.loads(info_file.read_text())
    per_window = per_inference(marks, runs, windows)
    return {
        "instructions_per_inference": sum(per_window) / windows,
        "window_instructions_per_inference": per_window,
        "runs": runs,
        "windows": windows,
        "threads": info["threads"],
        "process_instructions": total,
        "target": target.name,
        "qemu_cpu": qemu_cpu(target),
        "emulated": True,
        "outputs": len(outputs),
        "note": PROXY_NOTE,
    }


def summary_text(counts: dict[str, Any]) -> str:
    """Two lines for a person: the count of :func:`count_instructions` and the proxy note."""
    windows = counts["window_instructions_per_inference"]
    spread = 100 * (max(windows) - min(windows)) / max(min(windows), 1)
    return (
        f"edgecc/TVM {counts['instructions_per_inference']:,.0f} instructions per inference "
        f"({counts['target']} under qemu -cpu {counts['qemu_cpu']}, {counts['threads']} "
        f"thread(s), mean of {counts['runs'] * counts['windows']} inferences after a first; "
        f"{counts['windows']} windows of {counts['runs']} within {spread:.2f}%)\n{counts['note']}"
    )
