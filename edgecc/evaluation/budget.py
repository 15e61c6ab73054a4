"""Accuracy budget for ``edgecc compile --data DATA [--metric M] [--max-drop X]``.

The drop is measured on the data against the source model's float graph (ONNX Runtime,
optimisations off), with the whole pipeline applied::

    drop = metric(float source) - metric(pipeline output)

``top1`` / ``top5``: in percentage points (``--max-drop 1`` allows 89.7 % -> 88.7 %);
``agreement``: the float source's outputs are the reference, so ``metric(float) = 1`` and
``drop = 1 - mean cosine`` (``--max-drop 0.01`` asks for a cosine >= 0.99; the cosine of
mean-pooled sentence embeddings for transformer token outputs, see
:mod:`edgecc.evaluation.metrics`).

The budget acts on one lossy pass of the pipeline: its ``qdq`` when there is one, else its
``prune``, else its ``lowrank``. The passes before it run once; on their output the pass's
per-layer sensitivity is measured (:mod:`edgecc.evaluation.sensitivity`), and the ``k`` most
sensitive layers are exempted, with ``k`` the smallest count meeting the budget:

- ``qdq``: the ``k`` layers are added to ``keep_float`` (they stay float; ``kept_float``);
- ``prune``: they get ``overrides={layer: 0.0}``, their channel groups are not pruned;
- ``lowrank``: they are added to ``skip`` (kept dense); both recorded as ``spared``.

``k`` is found by bisection over ``0..n`` (``n`` the layers the pass changes), evaluating the
whole pipeline after the pass at each step, so every figure is measured, not estimated; it
assumes exempting more layers does not hurt (it is checked at ``k = 0`` and ``k = n``; a
non-monotone case gives a ``k`` that meets the budget, perhaps not the smallest). ``k = n`` is
measured first: when even that (the pass changing nothing) misses the budget, because the
other passes cost more than it, compilation stops with
:class:`~edgecc.errors.CheckFailedError` (exit code 4) and no package, as ``--min-cosine`` does.

Without ``--max-drop``, ``--data`` only measures: the manifest records the accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from edgecc.errors import CheckFailedError, UserInputError
from edgecc.evaluation.core import DEFAULT_BATCH, CachedReference, Metric, run_evaluation
from edgecc.evaluation.data import EvalData
from edgecc.evaluation.runners import OnnxRunner
from edgecc.evaluation.sensitivity import layer_names, layer_sensitivity
from edgecc.passes.manager import PassContext, PassManager, PassSpec

logger = logging.getLogger(__name__)

BUDGET_PASSES = ("qdq", "prune", "lowrank")
Progress = Callable[[str], None]


@dataclass
class Budget:
    """The accuracy measurement (and, with ``max_drop``, the fitted pipeline) of a compile.

    Attributes:
        specs: the pipeline, with the budget pass's exemptions added.
        float_value: the metric of the float source.
        kept_float: ``qdq`` layers left float (None unless the budget acted on qdq).
        spared: ``prune``/``lowrank`` layers left whole, with their ratio (None otherwise).
        sensitivity: the per-layer table the exemptions followed (None without ``max_drop``).
    """

    specs: list[PassSpec]
    data: EvalData
    metric: Metric
    max_drop: float | None
    reference: CachedReference
    float_value: float
    metric_name: str
    batch_size: int = DEFAULT_BATCH
    kept_float: list[str] | None = None
    spared: list[dict[str, Any]] | None = None
    sensitivity: dict[str, Any] | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)

    def measure(self, graph: onnx.ModelProto, desc: str = "evaluating") -> float:
        """The metric of ``graph`` on the data."""
        res = run_evaluation(
            OnnxRunner(graph), self.data, self.metric, self.reference, self.batch_size, None, desc
        )
        return res["value"]

    def record(self, final: onnx.ModelProto) -> dict[str, Any]:
        """The manifest entries: ``accuracy`` (of ``final``), and the exemptions."""
        value = self.measure(final, "final graph")
        out: dict[str, Any] = {
            "accuracy": {
                "metric": self.metric_name,
                "float": self.float_value,
                "final": value,
                "drop": self.float_value - value,
                "max_drop": self.max_drop,
                "samples": self.data.num_samples,
                "data": self.data.description,
            }
        }
        if self.kept_float is not None:
            out["kept_float"] = self.kept_float
        if self.spared is not None:
            out["spared"] = self.spared
        if self.sensitivity is not None:
            out["sensitivity"] = self.sensitivity
        return out


def budget_pass(specs: Sequence[PassSpec]) -> int | None:
    """The index of the pass the budget acts on (see the module docstring), or None."""
    for name in BUDGET_PASSES:
        for i, s in enumerate(specs):
            if s.name == name:
                return i
    return None


def exempt(spec: PassSpec, layers: Sequence[str]) -> PassSpec:
    """``spec`` with ``layers`` kept float (qdq), unpruned (prune) or dense (lowrank)."""
    options = dict(spec.options)
    if not layers:
        return spec
    if spec.name == "qdq":
        kept = options.get("keep_float") or []
        options["keep_float"] = [*([kept] if isinstance(kept, str) else kept), *layers]
    elif spec.name == "prune":
        options["overrides"] = {
            **dict(options.get("overrides") or {}),
            **dict.fromkeys(layers, 0.0),
        }
    else:
        skip = options.get("skip") or []
        options["skip"] = [*([skip] if isinstance(skip, str) else skip), *layers]
    return PassSpec(spec.name, tuple(options.items()))


def fit_budget(
    model: onnx.ModelProto,
    specs: Sequence[PassSpec],
    ctx: PassContext,
    data: EvalData,
    metric: Metric = None,
    max_drop: float | None = None,
    disabled: Iterable[str] = (),
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> Budget:
    """Measure the float source on ``data`` and, with ``max_drop``, fit the pipeline to it.

    Raises:
        UserInputError: ``max_drop`` is negative or the pipeline has no pass to act on.
        CheckFailedError: the budget cannot be met even with the pass changing nothing.
    """
    say = progress or (lambda msg: logger.info("%s", msg))
    specs = list(specs)
    disabled = set(disabled)
    float_runner = OnnxRunner(model)
    reference = CachedReference(float_runner)
    base = run_evaluation(float_runner, data, metric, reference, batch_size, None, "float model")
    budget = Budget(
        specs, data, metric, max_drop, reference, base["value"], base["metric"], batch_size
    )
    say(f"float model: {base['metric']} {base['value']:.6g} on {data.num_samples} samples")
    if max_drop is None:
        return budget
    if max_drop < 0:
        raise UserInputError(f"--max-drop must be >= 0, got {max_drop}")
    effective = [s for s in specs if s.name not in disabled]
    idx = budget_pass(effective)
    if idx is None:
        raise UserInputError(
            f"--max-drop needs a {', '.join(BUDGET_PASSES)} pass in the pipeline to act on"
        )
    spec = effective[idx]
    graph = PassManager(effective[:idx]).run(model, ctx) if idx else model
    rest = effective[idx + 1 :]
    results: dict[frozenset[str], float] = {}

    def drop(exempted: Sequence[str]) -> float:
        key = frozenset(exempted)
        if key not in results:
            out = PassManager([exempt(spec, list(exempted)), *rest]).run(graph, ctx)
            results[key] = base["value"] - budget.measure(out, f"{len(key)} exempt")
            budget.trials.append({"exempt": len(key), "drop": results[key]})
            say(f"budget: {len(key)} {spec.name} layers exempt: drop {results[key]:.4g}")
        return results[key]

    probe = PassManager([spec])
    probe.run(graph, ctx)
    every = layer_names(spec.name, probe.records[-1].info)
    if drop(every) > max_drop:  # checked first: no ranking is worth computing then
        raise CheckFailedError(
            f"--max-drop {max_drop}: the drop is {results[frozenset(every)]:.4g} "
            f"{_unit(base['metric'])} even with all {len(every)} layers of {spec.name} exempt "
            "(the other passes cost that much); no package written"
        )
    sens = layer_sensitivity(
        graph, spec, data, ctx, metric, batch_size, None, "pipeline before " + spec.name, say
    )
    ranking = [r["layer"] for r in sens["layers"]]
    budget.sensitivity = sens
    n = len(ranking)
    if drop([]) <= max_drop:
        k = 0
    else:
        lo, hi = 0, n  # drop(lo) > max_drop >= drop(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if drop(ranking[:mid]) <= max_drop else (mid, hi)
        k = hi
    chosen = ranking[:k]
    new = exempt(spec, chosen)
    budget.specs = [new if s is spec else s for s in specs]
    if spec.name == "qdq":
        budget.kept_float = chosen
    else:
        budget.spared = [{"layer": layer, "ratio": 0.0} for layer in chosen]
    say(
        f"budget: {k} of {n} {spec.name} layers exempt, drop {drop(chosen):.4g} "
        f"{_unit(base['metric'])} (max {max_drop})"
    )
    return budget


def _unit(metric: str) -> str:
    return "points" if metric in ("top1", "top5") else "(1 - cosine)"


def fit(
    model: Any,
    passes: str,
    data: Any,
    *,
    calib: str | None = None,
    calib_samples: int | None = None,
    metric: Metric = None,
    max_drop: float | None = None,
    target: Any = None,
    input_shapes: Sequence[Any] | None = None,
    trust_code: bool = False,
    example_inputs: Any = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], onnx.ModelProto]:
    """What ``compile --data --max-drop`` does before lowering, as a function: load ``model``,
    fit ``passes`` (after the cleanup passes) to the budget and measure the final graph.

    Returns:
        ``(record, graph)``: the manifest entries (``accuracy``, ``kept_float``/``spared``,
        ``sensitivity``) plus ``pipeline``, ``trials`` and ``seconds``; and the final graph.
    """
    import time

    from edgecc.api import CLEANUP_PASSES
    from edgecc.evaluation.core import ModelOptions
    from edgecc.evaluation.data import open_data
    from edgecc.passes import format_pipeline, parse_pipeline
    from edgecc.targets import Target, get_target

    start = time.perf_counter()
    loaded = ModelOptions(input_shapes, trust_code, None, None, example_inputs).load(model)
    tgt = target if target is None or isinstance(target, Target) else get_target(str(target))
    ctx = PassContext(target=tgt, probe_inputs=loaded.probe_inputs, seed=seed)
    if calib is not None:
        from edgecc.passes.calibration import load_calibration

        ctx.calibration, ctx.calibration_source = load_calibration(
            calib, loaded.inputs, limit=calib_samples, seed=seed
        )
    specs = parse_pipeline(CLEANUP_PASSES) + parse_pipeline(passes)
    bound = open_data(data, OnnxRunner(loaded.model).inputs)
    budget = fit_budget(loaded.model, specs, ctx, bound, metric, max_drop, progress=progress)
    final = PassManager(budget.specs).run(loaded.model, ctx)
    record = {
        "pipeline": format_pipeline(budget.specs),
        **budget.record(final),
        "trials": budget.trials,
        "seconds": time.perf_counter() - start,
    }
    return record, final
