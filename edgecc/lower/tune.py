"""MetaSchedule tuning on top of edgecc's schedule rules, with reusable records.

:class:`Tuning` tells :func:`edgecc.lower.lower` to use a record folder (a MetaSchedule
``JSONDatabase``: ``database_workload.json``, ``database_tuning_record.json``) and optionally to
tune first. The pass :func:`records_pass` runs where the rules run (after fusion, before
:func:`edgecc.lower.schedules.apply_schedules`), on every fused TIR kernel:

1. **Tune** (``trials`` > 0). Each kernel is one MetaSchedule task, keyed by its anchor block
   (``module_equality="anchor-block"``: the conv/matmul block, whatever epilogue was fused), so a
   kernel of another model with the same convolution shares the records. A kernel whose workload
   already holds ``trials + 1`` records is skipped (a second model starts from the first one's
   records and measures only its new kernels); one with fewer gets the missing trials.
2. **The rules are the baseline.** For a workload without records, the schedule edgecc's rules
   give the kernel (or, if no rule matches, TVM's default code) is built, timed by the runner and
   committed first, with its trace (a kernel whose rule schedule cannot be timed, e.g. a runner
   timeout, is not tuned: it keeps its rule). The best record of a workload is the fastest of
   the rule's schedule and the candidates, so a tuned kernel is never slower than the rule's, up
   to timing noise (the LocalRunner takes the mean of 3 runs of >= 100 ms each: differences of a
   few percent between two measurements of one schedule are noise).
   **Rule variants first.** The first candidates (:func:`variant_share`: 12 of 16 trials, all of
   2) are the rule's own schedule with other values of its knobs
   (:mod:`edgecc.lower.schedules.variants`: micro-kernel register budget, vector width
   multiple, matmul parallel granularity, conv loop order), in a deterministic order, schedules
   equal to one already measured dropped: the rules' neighbours, each a complete schedule
   with packed weights. Kernels whose rule has no knobs (elementwise, pooling, reductions) get
   none. **Then evolutionary search** for the remaining trials: MetaSchedule's own design space
   (``post-order-apply`` with the default LLVM rules: multi-level tiling,
   parallel/vectorise/unroll), candidates ranked by an XGBoost cost model trained on the
   kernel's measurements (``evolutionary``, population 128, 2 generations). The rules are
   deterministic (no sampled decisions), so a ``ScheduleFn`` of a rule plus mutators would have
   nothing to mutate: the variants enumerate its decisions instead.
3. **Apply.** A kernel whose workload has records gets the fastest one that applies to it: the
   trace replayed on the kernel; for a kernel equal to the stored one but for block names, the
   stored kernel scheduled by it; else the anchor block's trace (``schedule_using_anchor_trace``).
   Under anchor-block equality a workload's records can come from kernels with another epilogue
   whose traces do not replay (seen on ResNet-34 after ResNet-18: ``inst->outputs.size() <=
   outputs.size()`` in the anchor replay); the next record is tried, and when none applies the
   rules schedule the kernel and a tuning run treats the kernel as new (baseline + ``trials``,
   committed to the same workload). Kernels without a record get the rules as usual.

``trials`` counts measured candidates per kernel, variants and search together (the rule's
baseline is measured on top, once per workload). Records written by interrupted runs stay
usable: JSONDatabase appends one line per record, and :func:`open_records` drops a truncated or
malformed line (with a warning, rewriting the file by temp + rename) before TVM parses the
files.

Reproducibility: a build that applies records is byte-for-byte reproducible given the same
record files (their sha256 goes into the manifest); the default per-target cache
(``$EDGECC_CACHE/tuning/<target>``, default ``~/.cache/edgecc/tuning/<target>``) changes with
every tuning, and timing noise makes two tunings pick different schedules.

Two traps of TVM 0.27 handled here:

* ``import tvm.s_tir.tensor_intrin`` (done by every ``TuneContext`` and by the MetaSchedule
  builder in each of its worker processes) registers the tensor intrinsics of every backend,
  CUDA's alone taking over 30 s; :func:`intrinsics_registrar` registers only the target
  architecture's intrinsics (0.4 s for x86), also in every builder worker.
* ``Database.query_schedule`` replays the best trace on the *stored* workload, which under
  anchor-block equality may be another model's kernel (another epilogue): records are looked up
  with ``query_tuning_record`` and replayed on the kernel itself here.

Limits: CPU targets only. Without a ``runner``, candidates are timed on this host, so only
targets of its architecture can be tuned (an RPC runner times them on boards, and
:mod:`edgecc.lower.tune_remote` builds them for the board; applying records works for any CPU
target). Tuning replaces the rules of a kernel only; layout choices (the
rules' channels-last rewrite, packed weights) are made before, as in an untuned build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from edgecc import interrupt
from edgecc.lower.build import LoweredLibrary, Progress, lower
from edgecc.targets import Target

log = logging.getLogger(__name__)

MODULE_EQUALITY = "anchor-block"
WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
RULE_BASELINE = "rule"  # how a kernel's baseline record is named in the facts


def default_records_dir(target: Target) -> Path:
    """The per-target record cache: ``$EDGECC_CACHE/tuning/<target>`` (default
    ``~/.cache/edgecc/tuning/<target>``)."""
    from edgecc.runtime.emulation import cache_root

    return cache_root() / "tuning" / target.name


@dataclass
class Tuning:
    """How :func:`edgecc.lower.lower` uses tuning records.

    Attributes:
        records: the record folder (a MetaSchedule JSONDatabase; created when missing).
        trials: measured MetaSchedule candidates per kernel before applying (0: apply only).
        explicit: the records were named by the user (False: the default cache, which may
            change between builds); recorded in the manifest.
        seed: seed of the candidate sampling.
        builder: ``"inprocess"`` (serial, this process), ``"local"`` (MetaSchedule's worker
            pool), or a MetaSchedule ``Builder``.
        runner: a MetaSchedule ``Runner`` (e.g. an RPC runner timing on boards); None: a
            ``LocalRunner`` on this host.
        progress_bar: show a tqdm bar per kernel (stderr, tty only).
    """

    records: Path
    trials: int = 0
    explicit: bool = True
    seed: int = 0
    builder: Any = "inprocess"
    runner: Any = None
    progress_bar: bool = True
    facts: dict[str, Any] = field(default_factory=dict)


def lower_tuned(
    model: onnx.ModelProto,
    target: Target,
    input_shapes: dict[str, tuple[int, ...]],
    input_dtypes: dict[str, str],
    out_path: Path,
    trials_per_task: int = 8,
    work_dir: Path | None = None,
    seed: int = 0,
    builder: Any = "inprocess",
    progress: Progress = None,
    runner: Any = None,
) -> LoweredLibrary:
    """:func:`edgecc.lower.lower` with every kernel tuned (``trials_per_task`` candidates each, on
    top of the rules) into ``work_dir`` (default: a temporary folder, removed afterwards).

    Returns:
        The library; ``details["tuning"]`` holds the facts of :func:`records_pass`.

    Raises:
        ToolchainError: no runner was given and ``target`` is not a CPU target of this host.
        ValueError: ``trials_per_task`` < 1.
    """
    if trials_per_task < 1:
        raise ValueError(f"need trials_per_task >= 1, got {trials_per_task}")
    with _work_dir(work_dir) as work:
        tuning = Tuning(
            Path(work), trials_per_task, explicit=work_dir is not None, seed=seed,
            builder=builder, runner=runner,
        )  # fmt: skip
        return lower(
            model, target, input_shapes, input_dtypes, Path(out_path), progress, tuning=tuning
        )


def check_tunable(target: Target, tuning: Tuning) -> None:
    """Fail fast when ``tuning`` cannot work for ``target``.

    Raises:
        ToolchainError: not a CPU target, or candidates would be timed on a host of another
            architecture (no runner given).
        ValueError: negative trials or an unknown builder name.
    """
    from edgecc.errors import ToolchainError
    from edgecc.runtime import host_arch

    if target.device != "cpu":
        raise ToolchainError(f"tuning records apply to CPU targets only, not {target.name}")
    if tuning.trials > 0 and tuning.runner is None and target.arch != host_arch():
        raise ToolchainError(
            f"cannot tune {target.name} here: {target.name} is not a {host_arch()} CPU target, "
            f"so its candidates cannot be timed on this machine; time them on {target.arch} "
            "boards with `edgecc tune --rpc-tracker HOST:PORT --rpc-key KEY`"
        )
    if tuning.trials < 0 or (isinstance(tuning.builder, str) and tuning.builder not in BUILDERS):
        raise ValueError(
            f"need trials >= 0 and builder one of {', '.join(BUILDERS)}, got "
            f"{tuning.trials} and {tuning.builder!r}"
        )


BUILDERS = ("inprocess", "local")


def reproducibility_note(tuning: Tuning) -> str:
    """The manifest/summary note of a build that used records (see the module docstring)."""
    kept = f"tuning records from {tuning.records}"
    if tuning.trials > 0:
        return (
            f"{kept}, tuned in this build by timing ({tuning.trials} trials per kernel): not "
            "byte-for-byte reproducible; rebuild with these records and no tuning to reproduce it"
        )
    if not tuning.explicit:
        return (
            f"{kept} (the default cache, which later tunings change): not byte-for-byte "
            "reproducible unless the same records are given explicitly (--tuning-records DIR)"
        )
    return f"{kept}: reproducible given the same record files (records_sha256 in the manifest)"


def records_pass(tuning: Tuning, target: Target, rules: list, coverage: Any, say: Callable):
    """A module pass: tune (if ``tuning.trials``) and apply records to every unscheduled kernel.

    Kernels that get a record are marked scheduled (the rules then skip them) and recorded in
    ``coverage`` as ``tuning-record``; ``tuning.facts`` receives the facts for the manifest.
    ``rules`` are edgecc's rules (:func:`edgecc.lower.schedules.rules_for`), used for baselines.
    """
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="EdgeccTuningRecords")
    def _apply(mod, _ctx):
        from tvm import relax

        # as apply_schedules does: weights may be re-laid out by a schedule (RewriteLayout)
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
        kernels = _kernels(mod)
        tvm_target = tuning_target(target)
        start = time.monotonic()
        register = intrinsics_registrar(target.arch)
        register()
        database = open_records(tuning.records)
        facts: dict[str, Any] = {
            "records": str(tuning.records),
            "explicit": tuning.explicit,
            "trials_per_kernel": tuning.trials,
        }
        if tuning.trials > 0:
            from edgecc.lower import tune_remote
            from edgecc.rpc import runner_errors

            tuning.builder = tune_remote.candidate_builder(
                target, tuning.builder, register, tuning.runner
            )
            with meta_schedule_logging(), runner_errors(tuning.runner):
                tune_remote.check_boards_fit(target, tuning.runner)
                facts.update(_tune(kernels, database, tvm_target, rules, tuning, register, say))
        applied, failed = {}, []
        for name, (gvar, func) in kernels.items():
            scheduled = _apply_record(database, func, gvar.name_hint, tvm_target)
            if scheduled is None:
                continue
            if scheduled is False:
                failed.append(name)
                continue
            applied[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
            coverage.kernels[name] = "tuning-record"
        for gvar, func in applied.items():
            mod[gvar] = func
        tuned = sorted(g.name_hint for g in applied)
        facts.update(
            {
                "kernels_tuned": tuned,
                "kernels_rules": sorted(set(kernels) - set(tuned)),
                "records_not_applicable": failed,
                "records_sha256": records_digest(tuning.records),
                "seconds": round(time.monotonic() - start, 1),
            }
        )
        tuning.facts.update(facts)
        log.info("tuning records: %d kernels from %s", len(tuned), tuning.records)
        return mod

    return _apply


def _kernels(mod) -> dict[str, tuple[Any, Any]]:
    """Unscheduled TIR functions of ``mod`` by name."""
    from tvm import tirx

    out = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)) == 1:
            continue
        out[gvar.name_hint] = (gvar, func)
    return dict(sorted(out.items()))


def _tune(kernels, database, tvm_target, rules, tuning: Tuning, register, say) -> dict[str, Any]:
    """Baseline and tune every kernel in turn (see the module docstring); return the facts."""
    from tvm.s_tir import meta_schedule as ms

    builder = _builder(tuning.builder, register)
    runner = tuning.runner if tuning.runner is not None else ms.runner.LocalRunner()
    work = Path(tuning.records) / "logs"
    measured = baselines = skipped = 0
    no_space: list[str] = []
    no_baseline: list[str] = []
    kernel_facts: dict[str, dict[str, Any]] = {}
    say(f"tuning {len(kernels)} kernels, {tuning.trials} trials each, records in {tuning.records}")
    for index, (name, (_gvar, func)) in enumerate(kernels.items(), 1):
        interrupt.check()
        task = _task_module(func)
        have = _record_count(database, task, tuning.trials + 1)
        if have and _apply_record(database, func, name, tvm_target) is False:
            have = 0  # another kernel's records (same anchor block) that do not apply here
        best = _best_seconds(database, task) if have else None
        rule_ms = None
        if have == 0:
            rule_name, sch = _rule_schedule(func, tvm_target, rules)
            seconds = _measure(sch, task, tvm_target, builder, runner) if sch else None
            if seconds is not None:
                _commit(database, task, sch, seconds, tvm_target)
                baselines += 1
                have, best, rule_ms = 1, seconds, seconds * 1e3
                kernel_facts.setdefault(name, {})["baseline"] = rule_name or "tvm-default"
            elif rule_name is not None:  # tuning could only pick a schedule slower than it
                say(f"kernel {index}/{len(kernels)} {name}: the rule's schedule could not be "
                    "timed, the kernel keeps its rule")  # fmt: skip
                no_baseline.append(name)
                continue
        wanted = max(0, tuning.trials + 1 - have)
        if wanted == 0:
            skipped += 1
            say(f"kernel {index}/{len(kernels)} {name}: records reused ({have})")
            continue
        bar = _Bar(f"{index}/{len(kernels)} {name}", wanted, best, tuning.progress_bar)
        try:
            variants = _rule_variants(
                database, func, task, tvm_target, rules, min(wanted, variant_share(tuning.trials))
            )
            for sch in variants:
                interrupt.check()
                seconds = _measure(sch, task, tvm_target, builder, runner)
                if seconds is not None:
                    _commit(database, task, sch, seconds, tvm_target)
                bar.update([seconds])
            kernel_facts.setdefault(name, {})["rule_variants"] = len(variants)
            wanted -= len(variants)
            if wanted > 0:
                context = _search_context(ms, task, tvm_target, name, tuning.seed + index, work)
                if _with_design_space([context], [1.0])[0]:
                    _tune_one(ms, context, wanted, builder, runner, database, bar, work)
                else:
                    no_space.append(name)
        except Exception as err:  # noqa: BLE001  (a kernel's failure leaves the others' records)
            if interrupt.received() is not None or getattr(runner, "stopped", None) is not None:
                raise  # Ctrl-C, or a farm that stopped the tuning (edgecc.rpc.runner_errors)
            log.warning("tuning %s failed, its rule stays: %s", name, str(err).strip()[:300])
        finally:
            bar.close()
        measured += bar.count
        after = _best_seconds(database, task)
        kernel_facts.setdefault(name, {}).update(
            {"trials": bar.count, "best_ms": _ms(after), "rule_ms": rule_ms}
        )
        say(
            f"kernel {index}/{len(kernels)} {name}: {bar.count} trials, best "
            f"{_ms(after)} ms" + (f" (rule {rule_ms:.4g} ms)" if rule_ms is not None else "")
        )
    return {
        "measured": measured,
        "baselines_measured": baselines,
        "kernels_reused": skipped,
        "kernels_without_design_space": no_space,
        "kernels_without_baseline": no_baseline,
        "strategy": STRATEGY,
        "per_kernel": kernel_facts,
    }


STRATEGY = (
    "rule schedule as measured baseline, then rule variants, then evolutionary search with "
    "an XGBoost cost model on post-order-apply"
)


def variant_share(trials: int) -> int:
    """How many of a kernel's ``trials`` go to rule variants (the rest to the search): all but
    a quarter, so the search gets a batch of 4 out of 16 trials."""
    return trials - trials // 4


def _rule_variants(database, func, task, tvm_target, rules: list, limit: int) -> list:
    """Up to ``limit`` schedules of ``task`` by the rule that schedules ``func``, built from
    :func:`edgecc.lower.schedules.variants.param_variants` of the rule's params, in that order;
    schedules equal to one seen (the rule's, another variant's, a record's trace) are dropped."""
    import tvm_ffi
    from tvm import s_tir

    from edgecc.lower.schedules import rules_for
    from edgecc.lower.schedules.variants import param_variants

    if limit <= 0:
        return []
    rule = None
    with tvm_target:
        for candidate in rules:
            try:
                if candidate.apply(task["main"], tvm_target, False) is not None:
                    rule = candidate
                    break
            except Exception:  # noqa: BLE001  (as apply_schedules: a rule bug is a decline)
                continue
    if rule is None or not rule.knobs:
        return []
    seen_traces = set()
    if database.has_workload(task):
        records = database.get_top_k(database.commit_workload(task), MAX_RECORDS_TRIED)
        seen_traces = {str(r.trace) for r in records}
    seen = set()
    out = []
    with tvm_target:
        for params in [rule.params, *param_variants(rule.params, rule.knobs)]:
            variant = next(r for r in rules_for(params) if r.name == rule.name)
            try:
                sch = variant.apply(task["main"], tvm_target, False)
                if sch is None:
                    continue
                replay = s_tir.Schedule(task)  # the trace must replay on the stored workload
                sch.trace.apply_to_schedule(replay, remove_postproc=False)
            except Exception:  # noqa: BLE001  (a variant the primitives refuse: skip it)
                log.debug("variant %s of %s failed", params, rule.name, exc_info=True)
                continue
            key = tvm_ffi.structural_hash(replay.mod)
            if key in seen or str(replay.trace) in seen_traces:
                seen.add(key)
                continue
            seen.add(key)
            if params is not rule.params:
                out.append(replay)
            if len(out) >= limit:
                break
    return out


def _search_context(ms, task, tvm_target, name: str, seed: int, work: Path):
    """The TuneContext of the search after the variants: MetaSchedule's design space
    (``post-order-apply``, default LLVM rules) explored by evolutionary search. Its first
    population is sampled from that space only (``init_measured_ratio=0``): the rules' records
    (packed weights) failed to replay there (``parallel_for_dynamic ... initial_indices_orig``)
    and aborted the search. Population and generations
    are a quarter and a half of MetaSchedule's defaults: with 4 candidates per kernel, the
    default 512 x 4 generations spent more time predicting than measuring."""
    return ms.TuneContext(
        mod=task,
        target=tvm_target,
        space_generator="post-order-apply",
        search_strategy=ms.search_strategy.EvolutionarySearch(
            population_size=128,
            init_measured_ratio=0.0,
            init_min_unmeasured=32,
            genetic_num_iters=2,
        ),
        task_name=name,
        rand_state=seed,
        num_threads="physical",
        logger=_task_logger(work, name),
    )


def _tune_one(ms, context, wanted: int, builder, runner, database, bar, work: Path) -> None:
    """MetaSchedule's search on one task: ``wanted`` candidates, in batches of up to 4 (the bar
    and Ctrl-C act between batches, after each batch's records are committed), ranked by
    XGBoost trained on the measured records."""
    ms.tune.tune_tasks(
        tasks=[context],
        task_weights=[1.0],
        work_dir=str(work),
        max_trials_global=wanted,
        max_trials_per_task=wanted,
        num_trials_per_iter=min(wanted, 4),
        builder=builder,
        runner=runner,
        database=database,
        cost_model="xgb",
        measure_callbacks=[
            *ms.measure_callback.MeasureCallback.create("default"),
            _progress_callback(bar),
        ],
        task_scheduler="round-robin",
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 4)


def _record_count(database, task, limit: int) -> int:
    if not database.has_workload(task):
        return 0
    return len(database.get_top_k(database.commit_workload(task), limit))


def _best_seconds(database, task) -> float | None:
    if not database.has_workload(task):
        return None
    top = database.get_top_k(database.commit_workload(task), 1)
    return _mean(top[0].run_secs) if top else None


def _mean(run_secs) -> float | None:
    values = [float(v) for v in (run_secs or [])]
    return sum(values) / len(values) if values else None


def _rule_schedule(func, tvm_target, rules: list) -> tuple[str | None, Any]:
    """The schedule of ``func`` the rules give (the first that matches), or an empty one (TVM's
    default code), on the task's one-function module."""
    from tvm import s_tir

    task = _task_module(func)
    with tvm_target:
        for rule in rules:
            try:
                sch = rule.apply(task["main"], tvm_target, False)
            except Exception:  # noqa: BLE001  (as apply_schedules: a rule bug is a decline)
                log.debug("rule %s failed", rule.name, exc_info=True)
                continue
            if sch is not None:
                replay = s_tir.Schedule(task)  # the trace must replay on the stored workload
                try:
                    sch.trace.apply_to_schedule(replay, remove_postproc=False)
                except Exception as err:  # noqa: BLE001  (TVM raises several error types)
                    log.warning("rule %s's trace does not replay, no baseline: %s", rule.name, err)
                    return rule.name, None
                return rule.name, replay
    return None, s_tir.Schedule(task)


def _measure(sch, task, tvm_target, builder, runner) -> float | None:
    """Build and time one schedule with the tuning's builder and runner (seconds, or None)."""
    from tvm.s_tir import meta_schedule as ms

    (built,) = builder.build([ms.builder.BuilderInput(sch.mod, tvm_target)])
    if built.error_msg:
        log.warning("the rule's schedule did not build: %s", built.error_msg.splitlines()[0])
        return None
    try:
        args = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args)])
        result = future.result()
    finally:
        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
    if result.error_msg:
        log.warning(
            "the rule's schedule did not run: %s", result.error_msg.strip().splitlines()[-1]
        )
        return None
    return _mean(result.run_secs)


def _commit(database, task, sch, seconds: float, tvm_target) -> None:
    from tvm.s_tir import meta_schedule as ms

    workload = database.commit_workload(task)
    args = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
    database.commit_tuning_record(
        ms.database.TuningRecord(sch.trace, workload, [seconds], tvm_target, args)
    )


MAX_RECORDS_TRIED = 64  # records of a workload tried, fastest first, until one applies


def _apply_record(database, func, name: str, tvm_target):
    """``func`` scheduled by the fastest of its workload's records that applies to it; None
    without records, False when none applies (the rules then schedule the kernel).

    Under anchor-block equality a workload's records may come from kernels with another
    epilogue, whose traces need not replay here; the next record is then tried."""
    task = _task_module(func)
    if not database.has_workload(task):
        return None
    records = database.get_top_k(database.commit_workload(task), MAX_RECORDS_TRIED)
    if not records:
        return None
    errors = []
    for record in records:
        try:
            return _replay(record, task, tvm_target).with_attr("global_symbol", name)
        except Exception as err:  # noqa: BLE001  (TVM raises several error types here)
            errors.append(str(err).strip().splitlines()[0] if str(err).strip() else repr(err))
    log.warning("no tuning record applies to %s, rules used: %s", name, errors[0])
    return False


def _replay(record, task, tvm_target):
    """``record``'s schedule of ``task``'s function: its trace replayed on the kernel; else, for a
    kernel equal to the stored one but for names, the stored kernel scheduled; else the anchor
    block's trace (``schedule_using_anchor_trace``). Raises when none works."""
    import tvm_ffi
    from tvm import s_tir
    from tvm.s_tir.meta_schedule.trace_apply import schedule_using_anchor_trace

    with tvm_target:
        try:
            sch = s_tir.Schedule(task)
            record.trace.apply_to_schedule(sch, remove_postproc=False)
            return sch.mod["main"]
        except Exception:  # noqa: BLE001
            if tvm_ffi.structural_equal(record.workload.mod, task):
                sch = s_tir.Schedule(record.workload.mod)
                record.trace.apply_to_schedule(sch, remove_postproc=False)
                return sch.mod["main"]
        sch = s_tir.Schedule(task)
        schedule_using_anchor_trace(sch, record.trace, tvm_target)
        return sch.mod["main"]


class _Bar:
    """A tqdm bar per kernel (stderr, tty only) showing the best time so far."""

    def __init__(self, desc: str, total: int, best: float | None, enabled: bool):
        import sys

        from edgecc.passes.calibration import NO_PROGRESS_ENV

        self.count, self.best = 0, best
        self.bar = None
        if enabled and sys.stderr.isatty() and not os.environ.get(NO_PROGRESS_ENV):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="trial", file=sys.stderr, leave=False)
            self._show()

    def update(self, seconds: list[float | None]) -> None:
        self.count += len(seconds)
        for value in seconds:
            if value is not None and (self.best is None or value < self.best):
                self.best = value
        if self.bar is not None:
            self.bar.update(len(seconds))
            self._show()

    def _show(self) -> None:
        if self.bar is not None and self.best is not None:
            self.bar.set_postfix_str(f"best {self.best * 1e3:.4g} ms")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_callback(bar: _Bar):
    """A MetaSchedule measure callback feeding ``bar``; also where Ctrl-C stops the search
    (between batches, after the default callbacks have committed the batch's records)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            bar.update([None if r.error_msg else _mean(r.run_secs) for r in runner_results])
            interrupt.check()

    return Progress()


def _task_logger(work: Path, name: str) -> logging.Logger:
    """A logger for one task that writes nowhere but debug logging (MetaSchedule's own loggers
    add files and console handlers; see :func:`meta_schedule_logging`)."""
    logger = logging.getLogger(f"{META_SCHEDULE_LOGGER}.edgecc.{name}")
    logger.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
    return logger


def records_digest(folder: Path) -> str | None:
    """sha256 over the two record files (None when there are none)."""
    digest = hashlib.sha256()
    found = False
    for name in (WORKLOADS, RECORDS):
        path = Path(folder) / name
        if path.exists():
            found = True
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest() if found else None


def open_records(folder: Path):
    """The JSONDatabase in ``folder`` (created), after :func:`repair_records`."""
    from tvm.s_tir import meta_schedule as ms

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    repair_records(folder)
    return ms.database.JSONDatabase(work_dir=str(folder), module_equality=MODULE_EQUALITY)


def merge_records(sources: list[Path], dest: Path) -> int:
    """Add the records of ``sources`` (record folders, e.g. tuned on several machines or in
    separate runs) to the record folder ``dest`` (created); return the records ``dest`` then
    holds.

    Workloads are matched by anchor block as when tuning; a record whose workload and trace
    are already in ``dest`` is kept once, with the faster time. The merged database is written
    to a temporary folder beside ``dest`` and its files renamed over ``dest``'s, the workloads
    first: the old records refer to the old workloads by line, and the merged workload table
    starts with ``dest``'s own workloads in their order, so ``dest`` is valid at every moment.
    """
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    found: dict[tuple[int, str], Any] = {}
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=dest.parent) as tmp:
        merged = ms.database.JSONDatabase(work_dir=tmp, module_equality=MODULE_EQUALITY)
        repair_records(dest)
        for line in _read_lines(dest / WORKLOADS):  # dest's workloads first, in their order
            merged.commit_workload(ms.database.Workload.from_json(json.loads(line)).mod)
        for folder in [dest, *sources]:
            for record in open_records(folder).get_all_tuning_records():
                workload = merged.commit_workload(record.workload.mod)
                key = (tvm_ffi.structural_hash(workload.mod), str(record.trace))
                old = found.get(key)
                if old is None or _faster(record, old[1]):
                    found[key] = (workload, record)
        for workload, record in found.values():
            merged.commit_tuning_record(
                ms.database.TuningRecord(
                    record.trace, workload, record.run_secs, record.target, record.args_info
                )
            )
        for name in (WORKLOADS, RECORDS):
            os.replace(Path(tmp) / name, dest / name)
    return len(found)


def _faster(record, other) -> bool:
    """Whether ``record`` has a run time and ``other`` none or a longer one."""
    mine, theirs = _mean(record.run_secs), _mean(other.run_secs)
    return mine is not None and (theirs is None or mine < theirs)


def repair_records(folder: Path) -> int:
    """Drop the lines of ``folder``'s record files TVM could not load; return how many.

    JSONDatabase appends one JSON line per workload and per record; a process killed while
    appending leaves a truncated last line, on which TVM's loader fails. The workload table is
    cut at its first bad line (records refer to workloads by line number, so later lines would
    shift); records that do not parse or refer to a missing workload are dropped. A changed file
    is rewritten to a temporary name and renamed over the old one.
    """
    folder = Path(folder)
    workloads = _read_lines(folder / WORKLOADS)
    good_workloads = []
    for line in workloads:
        if not _valid_workload(line):
            break
        good_workloads.append(line)
    records = _read_lines(folder / RECORDS)
    good_records = [r for r in records if _valid_record(r, len(good_workloads))]
    dropped = len(workloads) - len(good_workloads) + len(records) - len(good_records)
    if dropped:
        log.warning(
            "tuning records in %s: dropped %d truncated or invalid line(s) (an interrupted "
            "tuning?); the other records are kept",
            folder,
            dropped,
        )
        _rewrite(folder / WORKLOADS, good_workloads)
        _rewrite(folder / RECORDS, good_records)
    return dropped


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text(errors="replace").splitlines() if line.strip()]


def _valid_workload(line: str) -> bool:
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], str)


def _valid_record(line: str, workloads: int) -> bool:
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], int)
        and 0 <= value[0] < workloads
        and isinstance(value[1], list)
        and len(value[1]) >= 2
    )


def _rewrite(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def tuning_target(target: Target, num_cores: int | None = None):
    """``target``'s TVM target with ``num-cores`` (MetaSchedule's parallel rules need it): the
    target record's cores, else this host's."""
    import tvm

    cores = num_cores or target.cores or len(os.sched_getaffinity(0))
    return tvm.target.Target({**target.tvm_target, "num-cores": cores})


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


def _builder(kind: Any, register: Callable[[], None], export: Callable[[Any], str] | None = None):
    """MetaSchedule's builder of candidates: ``inprocess`` (serial, here), ``local`` (a pool of
    worker processes, which MetaSchedule restarts for every batch: ~4 s of imports each time), or
    a ``Builder`` given by the caller. ``export`` replaces MetaSchedule's tar export (a shared
    library for a board: :func:`edgecc.lower.tune_remote.so_export`)."""
    from tvm.s_tir import meta_schedule as ms

    if not isinstance(kind, str):
        return kind
    if kind == "local":
        return ms.builder.LocalBuilder(initializer=register, f_export=export)
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    export_candidate = export or default_export

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    path = export_candidate(default_build(item.mod, item.target, None))
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
