"""Opt-in MetaSchedule tuning of CPU libraries, measured on this host: :func:`lower_tuned`.

Not part of :func:`edgecc.lower.lower`'s default pipeline (an experiment measured by
``scripts/benchmark.py --tune-trials N``). ``tvm.compile`` applies no schedules on CPU, so every
fused kernel runs as a serial, unvectorised loop nest; a few measured random schedules per kernel
recover most of the gap to ONNX Runtime (see ``docs/benchmark.md`` for the numbers).

How: the ONNX import and the Relax pipeline run as in :func:`edgecc.lower.lower` up to operator
fusion; each fused TIR function becomes one MetaSchedule task; each task gets ``trials_per_task``
schedules sampled from MetaSchedule's default LLVM design space (multi-level tiling, parallel
outer loops, vectorised inner loops, unrolling), built and timed here (``replay-trace``: no cost
model, no evolutionary search); the fastest schedule of each function replaces it; the pipeline
then finishes and the library is built and linked as usual. Candidates are built in this process
by default: MetaSchedule's own builder restarts its worker pool, and so imports TVM again, for
every batch, which made tuning take 1.7x as long here.

Two traps of TVM 0.27 handled here:

* ``import tvm.s_tir.tensor_intrin`` (done by every ``TuneContext`` and by the MetaSchedule
  builder in each of its worker processes, which it restarts for every batch) registers the
  tensor intrinsics of every backend, CUDA's alone taking over 30 s; here it took ~50 s per
  import, so 64 trials took minutes of imports. :func:`intrinsics_registrar` registers only the
  target architecture's intrinsics (0.4 s for x86), also in every builder worker.
* ``meta_schedule.relax_integration.compile_relax(database, ...)`` did not apply the records to
  the fused module here (the library stayed as slow as untuned); the best schedule of each
  function is looked up in the database and substituted directly.

Limits: CPU targets of this host's architecture only (candidates are timed here); the schedules
picked depend on timing noise, so a tuned library is not byte-for-byte reproducible (the untuned
build is). Tuning records stay in ``work_dir`` (``database_*.json``, per-task logs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from edgecc.errors import ToolchainError
from edgecc.lower.build import (  # the same import, export and link steps as lower()
    LoweredLibrary,
    Progress,
    _export,
    _linker,
    _sayer,
    import_relax,
)
from edgecc.targets import Target

log = logging.getLogger(__name__)

INTRINSIC_MODULES = {"x86_64": "x86", "aarch64": "arm_cpu"}


def intrinsics_registrar(arch: str = "x86_64") -> Callable[[], None]:
    """A function that registers only ``arch``'s tensor intrinsics (idempotent).

    ``tvm.s_tir.tensor_intrin``'s ``__init__`` imports every backend's intrinsics (~50 s here);
    the function puts a bare package module with the real ``__path__`` in ``sys.modules`` instead
    and imports only the needed submodule, so later ``import tvm.s_tir.tensor_intrin`` statements
    cost nothing. It is self-contained (a closure, which cloudpickle sends by value) because it
    also runs as the initializer of MetaSchedule's builder processes, which need not import the
    same edgecc.
    """
    submodule = INTRINSIC_MODULES[arch]

    def register() -> None:
        import importlib
        import os
        import sys
        import types

        import tvm.s_tir

        name = "tvm.s_tir.tensor_intrin"
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
            sys.modules[name] = package
        importlib.import_module(f"{name}.{submodule}")

    return register


def tuning_target(target: Target, num_cores: int | None = None):
    """``target``'s TVM target with ``num-cores`` (MetaSchedule's parallel rules need it)."""
    import tvm

    cores = num_cores or len(os.sched_getaffinity(0))
    return tvm.target.Target({**target.tvm_target, "num-cores": cores})


def lower_tuned(
    model: onnx.ModelProto,
    target: Target,
    input_shapes: dict[str, tuple[int, ...]],
    input_dtypes: dict[str, str],
    out_path: Path,
    trials_per_task: int = 8,
    work_dir: Path | None = None,
    seed: int = 0,
    builder: str = "inprocess",
    progress: Progress = None,
) -> LoweredLibrary:
    """Like :func:`edgecc.lower.lower`, with each fused kernel tuned by MetaSchedule here.

    Args:
        model: the ONNX model (after edgecc's passes); not modified.
        target: a CPU target of this host's architecture.
        input_shapes: static shape of every graph input.
        input_dtypes: dtype name of every graph input.
        out_path: the ``.so`` to write.
        trials_per_task: measured schedules per fused kernel (the tuning time is about linear in
            it: ~1 s per trial on 2 cores).
        work_dir: where MetaSchedule keeps its database and logs (default: a temporary folder,
            removed afterwards).
        seed: seed of the schedule sampling.
        builder: ``inprocess`` builds candidates one after the other in this process (resnetish,
            8 trials: 38 s of tuning); ``local`` uses MetaSchedule's worker pool (65 s: the pool
            is restarted, and TVM imported again, for every batch), which isolates a candidate
            that crashes LLVM and enforces a build timeout.
        progress: called with one line per step.

    Returns:
        The library; ``details["tuning"]`` holds the trials, the tuning seconds and how many
        kernels got a tuned schedule.

    Raises:
        ToolchainError: ``target`` is not a CPU target of this host's architecture.
    """
    from edgecc.runtime import host_arch

    if target.device != "cpu" or target.arch != host_arch():
        raise ToolchainError(
            f"tuning times candidates on this machine: {target.name} is not a "
            f"{host_arch()} CPU target"
        )
    if trials_per_task < 1 or builder not in ("inprocess", "local"):
        raise ValueError(
            f"need trials_per_task >= 1 and builder inprocess or local, got "
            f"{trials_per_task} and {builder!r}"
        )
    start = time.monotonic()
    say = _sayer(progress)
    linker = _linker(target)
    mod = import_relax(model, input_shapes, input_dtypes, say)

    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    tvm_target = tuning_target(target)
    with tvm_target:
        mod = tvm.transform.Sequential(
            [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                *cpu.library_dispatch_passes(tvm_target),
                *cpu.legalize_passes(tvm_target),
            ]
        )(mod)
    with _work_dir(work_dir) as work, meta_schedule_logging():
        mod, tuning = tune_functions(
            mod, tvm_target, target.arch, Path(work), trials_per_task, seed, builder, say
        )
    say("building TIR kernels with LLVM")
    with tvm_target:
        mod = tvm.transform.Sequential(
            cpu.dataflow_lower_passes(tvm_target) + cpu.finalize_passes(tvm_target)
        )(mod)
        executable = tvm.compile(mod, target=tvm_target, relax_pipeline=None)
    _export(executable, Path(out_path), linker, None)
    seconds = time.monotonic() - start
    details = {
        "tvm_target": str(tvm_target),
        "compiler": linker,
        "tuning": tuning,
        "relax_pipeline": "DecomposeOpsForInference + relax cpu pipeline, fused kernels "
        f"tuned by MetaSchedule ({trials_per_task} trials each)",
    }
    return LoweredLibrary(
        path=Path(out_path),
        cuda_code=None,
        compile_seconds=seconds,
        tvm_version=tvm.__version__,
        details=details,
        notes=["schedules picked by timing on the compiling host"],
    )


def tune_functions(
    mod, tvm_target, arch: str, work: Path, trials_per_task: int, seed: int, builder: str, say
) -> tuple[Any, dict[str, Any]]:
    """Tune every fused TIR function of ``mod``; return it with the best schedules applied."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    register = intrinsics_registrar(arch)
    register()
    start = time.monotonic()
    tasks = ms.relax_integration.extract_tasks(mod, tvm_target)
    say(f"tuning {len(tasks)} kernels, {trials_per_task} measured schedules each")
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, str(work), space="post-order-apply", strategy="replay-trace", seed=seed
    )
    usable, failed = _with_design_space(contexts, weights)
    database = ms.database.JSONDatabase(work_dir=str(work))
    if usable:
        ms.tune.tune_tasks(
            tasks=[c for c, _ in usable],
            task_weights=[w for _, w in usable],
            work_dir=str(work),
            max_trials_global=trials_per_task * len(usable),
            max_trials_per_task=trials_per_task,
            num_trials_per_iter=trials_per_task,
            cost_model="random",
            builder=_builder(builder, register),
            database=database,
        )
    tuned = 0
    for gvar, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        schedule = database.query_schedule(_task_module(func), tvm_target, workload_name="main")
        if schedule is not None:
            mod[gvar] = schedule.mod["main"].with_attr("global_symbol", gvar.name_hint)
            tuned += 1
    facts = {
        "trials_per_task": trials_per_task,
        "tasks_without_design_space": failed,
        "tasks": len(contexts),
        "kernels_tuned": tuned,
        "seconds": round(time.monotonic() - start, 1),
        "strategy": "replay-trace",
        "builder": builder,
    }
    log.info("tuning: %s", facts)
    return mod, facts


def _with_design_space(contexts: list, weights: list) -> tuple[list, list[str]]:
    """Pairs (context, weight) whose design space MetaSchedule can generate, and the names of the
    others: on all-MiniLM-L6-v2 one fused matmul + where + add kernel fails in
    ``reverse-compute-at`` and would abort the whole tuning run; such kernels stay untuned."""
    usable, failed = [], []
    for context, weight in zip(contexts, weights, strict=True):
        try:
            context.generate_design_space()
        except Exception as err:  # noqa: BLE001  (TVM raises several error types here)
            log.warning(
                "no design space for %s, left untuned: %s",
                context.task_name,
                str(err).strip().splitlines()[0] if str(err).strip() else err,
            )
            failed.append(context.task_name)
        else:
            usable.append((context, weight))
    return usable, failed


def _builder(kind: str, register: Callable[[], None]):
    """MetaSchedule's builder of candidates: ``inprocess`` (serial, here) or ``local`` (a pool of
    worker processes, which MetaSchedule restarts for every batch: ~4 s of imports each time)."""
    from tvm.s_tir import meta_schedule as ms

    if kind == "local":
        return ms.builder.LocalBuilder(initializer=register)
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    path = default_export(default_build(item.mod, item.target, None))
                    results.append(ms.builder.BuilderResult(path, None))
                except Exception as err:  # noqa: BLE001  (a failed candidate, not a failure)
                    results.append(ms.builder.BuilderResult(None, str(err)))
            return results

    return InProcessBuilder()


def _task_module(func):
    """The one-function module MetaSchedule keyed the task by (as ``extract_tasks`` builds it)."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    return _normalize_mod(func)


META_SCHEDULE_LOGGER = "tvm.s_tir.meta_schedule"


@contextlib.contextmanager
def meta_schedule_logging():
    """Leave Python's logging as it was around a MetaSchedule run.

    MetaSchedule's ``create_loggers`` (run by every ``extracted_tasks_to_tune_contexts``) attaches
    a console handler and file handlers in the work dir to ``tvm.s_tir.meta_schedule`` and one
    logger per task, and lists the handlers already on that logger by name: a handler left there
    (by an earlier tuning, whose work dir may be gone, or any unnamed one) made the next run fail
    with ``AttributeError: 'NoneType' object has no attribute 'format'``. Here the logger starts
    without handlers, and afterwards every handler MetaSchedule added is closed and removed and
    the logger's handlers, level and propagation are restored.
    """
    manager = logging.Logger.manager
    top = logging.getLogger(META_SCHEDULE_LOGGER)
    saved = (top.handlers[:], top.level, top.propagate, top.disabled)
    for handler in saved[0]:
        top.removeHandler(handler)
    try:
        yield
    finally:
        for name, logger in list(manager.loggerDict.items()):
            if isinstance(logger, logging.Logger) and (
                name == META_SCHEDULE_LOGGER or name.startswith(META_SCHEDULE_LOGGER + ".")
            ):
                for handler in logger.handlers[:]:
                    logger.removeHandler(handler)
                    handler.close()
        for handler in saved[0]:
            top.addHandler(handler)
        top.setLevel(saved[1])
        top.propagate, top.disabled = saved[2], saved[3]


def _work_dir(path: Path | None):
    """A context giving ``path`` (created) or a temporary folder removed on exit."""
    if path is None:
        return tempfile.TemporaryDirectory(prefix="edgecc-tune-")
    Path(path).mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(str(path))
