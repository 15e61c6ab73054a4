"""Run compiled libraries: natively on the host, or aarch64 CPU libraries under qemu emulation.

Every run goes through the standalone :mod:`edgecc.runtime._runner` script in a subprocess, so
edgecc itself never loads TVM here and the same script runs on the board (every package holds a
copy as ``run.py``). Where it runs:

* target arch == host arch, CPU: ``sys.executable _runner.py ...``;
* aarch64 CPU target on an x86-64 host: the cached aarch64 Python under ``qemu-aarch64``
  (:mod:`edgecc.runtime.emulation`, prepared on first use);
* CUDA targets: only on an aarch64 machine with a CUDA device (a Jetson), else a toolchain
  error saying to copy the package to the board.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecc.errors import EdgeccError, ToolchainError, UserInputError
from edgecc.targets import Target

log = logging.getLogger(__name__)

RUNNER = Path(__file__).with_name("_runner.py")
RPC_SERVER = Path(__file__).with_name("rpc_server.py")  # the board's RPC server (standalone)
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}

__all__ = ["RPC_SERVER", "RUNNER", "host_arch", "is_emulated", "prepare_emulator", "run_library"]


def host_arch() -> str:
    """This machine's architecture in edgecc's naming (``x86_64`` or ``aarch64``)."""
    machine = platform.machine().lower()
    return _MACHINES.get(machine, machine)


def prepare_emulator(progress: Callable[[str], None] | None = None) -> Path:
    """Prepare (once; idempotent) the cached aarch64 Python that runs aarch64 CPU libraries.

    See :func:`edgecc.runtime.emulation.prepare_emulator`; setup scripts call this (or
    ``python -m edgecc.runtime.emulation``) to warm the cache.
    """
    # Imported here so ``python -m edgecc.runtime.emulation`` does not find it pre-imported.
    from edgecc.runtime import emulation

    return emulation.prepare_emulator(progress)


def is_emulated(target: Target) -> bool:
    """True when ``target``'s CPU code runs here under qemu (an aarch64 target on x86-64)."""
    return target.device != "cuda" and target.arch != host_arch()


def has_cuda_device() -> bool:
    """True when a CUDA GPU is visible (desktop driver nodes or Jetson's nvhost GPU node)."""
    return Path("/dev/nvidia0").exists() or Path("/dev/nvhost-ctrl-gpu").exists()


def run_library(
    library: Path,
    target: Target,
    inputs: Mapping[str, np.ndarray],
    output_names: list[str],
    progress: Callable[[str], None] | None = None,
    threads: int | None = None,
    facts: dict[str, Any] | None = None,
    stacked: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``library`` (built by :func:`edgecc.lower.lower` for ``target``) once.

    Args:
        library: the shared library.
        target: the target it was built for (decides where and how it runs).
        inputs: input arrays, ordered as the model's inputs.
        output_names: names for the outputs, in the model's output order.
        progress: called with one line per step (e.g. the emulator's first-use preparation).
        threads: TVM runtime threads (``TVM_NUM_THREADS`` of the runner); None leaves the
            environment as it is (TVM then uses ``TVM_NUM_THREADS``, ``OMP_NUM_THREADS`` or the
            physical core count).
        facts: when given, updated with what the runner used (``threads``, ``device``).
        stacked: ``inputs`` hold ``K`` input sets along an extra axis 0; the library runs once
            per set in one process and every output comes back stacked the same way.

    Returns:
        ``{output name: array}`` in ``output_names`` order.

    Raises:
        ToolchainError: no way to run ``target`` here (no CUDA device, no qemu-aarch64).
        EdgeccError: the run failed (the message ends with the runner's last stderr line).
    """
    if threads is not None and threads < 1:
        raise UserInputError(f"threads must be >= 1 (got {threads})")
    with tempfile.TemporaryDirectory(prefix="edgecc-run-") as work:
        info = Path(work) / "info.json"
        outputs = _call_runner(
            library,
            target,
            inputs,
            Path(work),
            ["--info", str(info), *(["--stacked"] if stacked else [])],
            thread_env(threads),
            progress=progress,
        )
        if facts is not None:
            facts.update(json.loads(info.read_text()))
    if len(outputs) != len(output_names):
        raise EdgeccError(
            f"{Path(library).name} returned {len(outputs)} outputs, expected "
            f"{len(output_names)} ({', '.join(output_names)})"
        )
    return dict(zip(output_names, outputs, strict=True))


def thread_env(threads: int | None) -> dict[str, str] | None:
    """The runner environment entries that give the TVM runtime ``threads`` threads."""
    return None if threads is None else {"TVM_NUM_THREADS": str(threads)}


def _call_runner(
    library: Path,
    target: Target,
    inputs: Mapping[str, np.ndarray],
    work: Path,
    options: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    emulator_options: Sequence[str] = (),
) -> list[np.ndarray]:
    """Run :data:`RUNNER` on ``library`` in the scratch folder ``work``; return its outputs.

    ``options`` are appended to the runner's arguments (e.g. its timing flags); ``env`` entries
    are added to the environment it runs in; ``emulator_options`` go right after
    ``qemu-aarch64`` (e.g. ``-plugin``), for emulated targets only.
    """
    command, base_env = _launcher(target, progress)
    if emulator_options:
        if base_env is None:  # not the qemu launcher
            raise EdgeccError(f"{target.name} does not run under emulation on this host")
        command = [command[0], *emulator_options, *command[1:]]
    if env:
        base_env = {**(os.environ if base_env is None else base_env), **env}
    device = "cuda" if target.device == "cuda" else "cpu"
    feeds, results = work / "inputs.npz", work / "outputs.npz"
    np.savez(feeds, **{name: np.ascontiguousarray(a) for name, a in inputs.items()})
    cmd = [
        *command,
        str(RUNNER),
        "--library",
        str(Path(library).resolve()),
        "--input",
        str(feeds),
        "--output",
        str(results),
        "--device",
        device,
        *options,
    ]
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=base_env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise EdgeccError(f"running {Path(library).name} for {target.name} failed: {lines[-1]}")
    with np.load(results, allow_pickle=False) as data:
        return [data[k] for k in data.files]  # in the model's output order


def _launcher(
    target: Target, progress: Callable[[str], None] | None
) -> tuple[list[str], dict[str, str] | None]:
    """The interpreter command (and environment) that can load ``target``'s libraries here."""
    here = host_arch()
    if target.device == "cuda":
        if here != target.arch or not has_cuda_device():
            raise ToolchainError(
                f"package targets CUDA ({target.name}); no CUDA device on this "
                "machine: copy it to the board"
            )
        return [sys.executable], None
    if target.arch == here:
        return [sys.executable], None
    if target.arch == "aarch64":
        from edgecc.runtime import emulation

        return emulation.emulated_python(prepare_emulator(progress))
    raise ToolchainError(f"cannot run {target.arch} code for {target.name} on this {here} host")
