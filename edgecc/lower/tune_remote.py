"""Tuning candidates built for a board and timed there over RPC (``edgecc tune --rpc-tracker``).

:mod:`edgecc.lower.tune` times each candidate with a MetaSchedule runner. Timed on this host
(``LocalRunner``), only targets of its architecture can be tuned; timed on boards (an RPC runner,
:func:`edgecc.rpc.make_runner`), any CPU target can, but the candidates must then be built for
the board:

* **Builder** (:func:`candidate_builder`). TVM's LLVM code generator builds each candidate for the
  target's triple (``aarch64-linux-gnu`` for ``rpi4``) as for a package, and the candidate is
  exported as a *shared library* linked here by the target's linker (the cross compiler
  ``aarch64-linux-gnu-gcc``; the host's ``cc`` for x86), so the board only ``dlopen``\\ s it.
  MetaSchedule's default export is a tar of object files that the board's RPC server links with
  its own ``g++``, which a Pi with only Python and the TVM runtime does not have (tried: the
  emulated rpi4 server fails every candidate with "Command line: /usr/bin/g++ ..."). The
  builder is the caller's choice of ``inprocess`` (serial, in this process) or ``local``
  (MetaSchedule's pool of worker processes, ``f_export`` = the same shared-library export).
  Timed locally on a host target, the default tar export is kept (the host links it itself).
* **Boards of the target's architecture** (:func:`check_boards_fit`): one board of the key
  is asked what it is before tuning; an x86 board for an rpi4 tuning fails in one line
  instead of failing every candidate.
* **Farm faults** (:func:`edgecc.rpc.runner_errors`). A runner that stopped the tuning (the
  tracker went down, no board left under the key, or every candidate of a batch was lost to
  boards that do not answer: :class:`edgecc.rpc.runner.FarmRunner`) ends the record pass with
  its one-line :class:`edgecc.rpc.RPCError` (exit 2), whether MetaSchedule's C++ loop turned it
  into a ``RuntimeError`` or the loop finished with the runner stopped. The records measured
  before stay in the database: MetaSchedule commits each batch as it completes (one JSON line
  per record), and a lost candidate is committed without run time, never chosen as a best
  record. The record pass runs inside TVM's pass infrastructure, whose FFI turns any Python
  exception into a ``RuntimeError`` with its message: :func:`edgecc.lower.lower` gets the
  RPCError back from the runner's ``stopped`` around the pipeline, so every caller sees it.

Limits: the board's times are what the records keep, so records tuned on one board model apply
to builds for the same target; the board needs the TVM runtime's random fill
(``tvm.contrib.random.random_fill_for_measure``, in the PyPI wheel) for the candidates' inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from edgecc.targets import Target

log = logging.getLogger(__name__)

ARTIFACT = "tvm_tmp_mod.so"  # a candidate's file name (the RPC runner uploads it by this name)

__all__ = [
    "ARTIFACT",
    "candidate_builder",
    "check_boards_fit",
    "needs_shared_library",
    "so_export",
]


def needs_shared_library(target: Target, runner: Any) -> bool:
    """Whether candidates must be exported as shared libraries linked here: they are timed on
    boards (``runner`` given) or the target is not this host's architecture."""
    from edgecc.runtime import host_arch

    return runner is not None or target.arch != host_arch()


def so_export(linker: str) -> Callable[[Any], str]:
    """A MetaSchedule ``f_export``: the built candidate as a shared library linked by
    ``linker`` (e.g. ``aarch64-linux-gnu-gcc``) in a new temporary folder; returns its path.

    Self-contained (it imports only inside), because MetaSchedule's ``local`` builder sends it
    by value to its worker processes.
    """

    name = ARTIFACT

    def export(mod: Any) -> str:
        import os
        import tempfile

        from tvm.support import cc

        path = os.path.join(tempfile.mkdtemp(prefix="edgecc-candidate-"), name)
        mod.export_library(path, fcompile=cc.cross_compiler(linker))
        return path

    return export


def candidate_builder(target: Target, kind: Any, register: Callable[[], None], runner: Any) -> Any:
    """The builder of ``target``'s candidates for :func:`edgecc.lower.tune.records_pass`.

    Args:
        target: the edgecc target tuned.
        kind: the tuning's builder: ``inprocess``, ``local`` or a MetaSchedule ``Builder``.
        register: the target's intrinsics registrar (run in every builder worker).
        runner: the tuning's runner (None: this host's ``LocalRunner``).

    Returns:
        ``kind`` unchanged for a caller's ``Builder`` or a host target timed locally; else a
        builder exporting shared libraries linked by the target's linker (see the module
        docstring).

    Raises:
        ToolchainError: the target's cross compiler is not installed.
    """
    if not isinstance(kind, str) or not needs_shared_library(target, runner):
        return kind
    from edgecc.lower.build import _linker
    from edgecc.lower.tune import _builder

    linker = _linker(target)
    log.info("tuning candidates for %s are linked by %s into shared libraries", target.name, linker)
    return _builder(kind, register, export=so_export(linker))


def check_boards_fit(target: Target, runner: Any) -> None:
    """Before tuning on boards: fail in one line (:class:`edgecc.rpc.RPCError`) when the
    runner's boards are not of ``target``'s architecture (an rpi4 tuning sent to the key of x86
    boards). Asks one free board (``FarmRunner.check_machine``); other runners pass."""
    check = getattr(runner, "check_machine", None)
    if check is not None:
        check(target.arch, target.name)
