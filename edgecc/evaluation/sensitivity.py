"""Per-layer sensitivity: apply one lossy pass to one layer at a time and measure the damage.

For a pass that takes an ``only=`` option (``qdq``, ``prune``, ``lowrank``), the layers are those
the pass changes when run on the whole graph (``qdq``: the quantized nodes; ``prune``: the
producers of the channel groups it prunes; ``lowrank``: the split layers). For each layer ``l``
the pass runs again with ``only=[l]`` (every other layer float/dense) and the graph is evaluated
on the data (ONNX Runtime, optimisations off)::

    drop_l = baseline - metric(pass restricted to l)

where ``baseline`` is the metric of the float graph (``top1``/``top5`` in percent; for
``agreement``, the mean cosine against the float graph's own outputs, so the baseline is 1 and
``drop_l = 1 - cosine_l``). Layers come sorted by drop, most damaging first; ``params`` counts
the elements of the layer's constant inputs (weights and bias). The float outputs are computed
once and reused for every layer. Interactions between layers are not measured: the ranking is a
first-order guide (what the accuracy budget of :mod:`edgecc.evaluation.budget` uses, checking
the combined effect itself).

The result, also written by ``edgecc sensitivity -o sens.json``::

    {"model": str, "pass": str, "metric": str, "baseline": float,
     "layers": [{"layer": node, "op": op_type, "metric": float, "drop": float, "params": int}],
     "data": str, "samples": int, "seconds": float}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from edgecc.errors import UserInputError
from edgecc.evaluation.core import (
    DEFAULT_BATCH,
    CachedReference,
    Metric,
    ModelOptions,
    run_evaluation,
)
from edgecc.evaluation.data import EvalData, open_data
from edgecc.evaluation.runners import OnnxRunner
from edgecc.passes.manager import PassContext, PassManager, PassSpec, option_schema

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


def layer_names(pass_name: str, info: Mapping[str, Any]) -> list[str]:
    """The layers a pass changed, from its report ``info``."""
    if pass_name == "qdq":
        return list(info.get("quantized_nodes", []))
    if pass_name == "prune":
        return list(
            dict.fromkeys(
                s for g in info.get("groups", []) if g["kept"] < g["total"] for s in g["sources"]
            )
        )
    if pass_name == "lowrank":
        return [n for row in info.get("layers", []) for n in row["nodes"]]
    raise UserInputError(f"sensitivity does not know the layers of pass {pass_name!r}")


def restricted(spec: PassSpec, layers: Sequence[str]) -> PassSpec:
    """``spec`` with ``only=layers`` (replacing any ``only`` it had)."""
    options = tuple((k, v) for k, v in spec.options if k != "only")
    return PassSpec(spec.name, (*options, ("only", list(layers))))


def check_pass(spec: PassSpec) -> None:
    """Refuse a pass that cannot be restricted to one layer."""
    from edgecc.passes import registered_passes

    passes = registered_passes()
    if spec.name not in passes:
        raise UserInputError(f"unknown pass {spec.name!r}; known passes: {', '.join(passes)}")
    if "only" not in option_schema(passes[spec.name]):
        raise UserInputError(
            f"sensitivity needs a pass that takes only= (qdq, prune, lowrank); got {spec.name!r}"
        )


def layer_params(model: onnx.ModelProto, node_name: str) -> tuple[str, int]:
    """The op type of ``node_name`` and the element count of its constant inputs."""
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    return node.op_type, sum(sizes.get(i, 0) for i in node.input)


def layer_sensitivity(
    graph: onnx.ModelProto,
    spec: PassSpec,
    data: EvalData,
    ctx: PassContext,
    metric: Metric = None,
    batch_size: int = DEFAULT_BATCH,
    output: str | int | None = None,
    model_name: str = "",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Sensitivity of ``graph`` (float) to ``spec``, layer by layer (see the module docstring)."""
    check_pass(spec)
    say = progress or (lambda msg: logger.info("%s", msg))
    start = time.perf_counter()
    float_runner = OnnxRunner(graph)
    reference = CachedReference(float_runner, output)
    base = run_evaluation(float_runner, data, metric, reference, batch_size, output, "float")
    name = base["metric"]
    full = PassManager([spec])
    full.run(graph, ctx)
    layers = layer_names(spec.name, full.records[-1].info)
    if not layers:
        raise UserInputError(f"{spec.text()} changes no layer of the model: nothing to rank")
    say(
        f"sensitivity of {len(layers)} layers to {spec.text()} ({name}, {data.num_samples} samples)"
    )
    rows = []
    for i, layer in enumerate(layers, start=1):
        changed = PassManager([restricted(spec, [layer])]).run(graph, ctx)
        res = run_evaluation(
            OnnxRunner(changed), data, metric, reference, batch_size, output, f"layer {i}"
        )
        op, params = layer_params(graph, layer)
        rows.append(
            {
                "layer": layer,
                "op": op,
                "metric": res["value"],
                "drop": base["value"] - res["value"],
                "params": params,
            }
        )
        logger.info("sensitivity: %s %s: %s %.6g", layer, op, name, res["value"])
    rows.sort(key=lambda r: r["drop"], reverse=True)
    return {
        "model": model_name,
        "pass": spec.text(),
        "metric": name,
        "baseline": base["value"],
        "layers": rows,
        "data": data.description,
        "samples": data.num_samples,
        "seconds": time.perf_counter() - start,
    }


def prepare(
    model: Any,
    passes: str,
    options: ModelOptions,
    calib: str | None = None,
    calib_samples: int | None = None,
    seed: int = 0,
    cleanup: bool = True,
) -> tuple[onnx.ModelProto, PassSpec, PassContext, Any]:
    """Load ``model``, run the cleanup and every pass before the last of ``passes``; the float
    graph, the last pass (the one studied), the pass context and the loaded model."""
    from edgecc.api import CLEANUP_PASSES
    from edgecc.passes import parse_pipeline
    from edgecc.targets import Target, get_target

    specs = parse_pipeline(passes)
    if not specs:
        raise UserInputError("--passes is empty: name the pass to study, e.g. 'qdq'")
    *before, spec = specs
    check_pass(spec)
    loaded = options.load(model)
    target = options.target
    if target is not None and not isinstance(target, Target):
        target = get_target(str(target))
    ctx = PassContext(target=target, probe_inputs=loaded.probe_inputs, seed=seed)
    if calib is not None:
        from edgecc.passes.calibration import load_calibration

        ctx.calibration, ctx.calibration_source = load_calibration(
            calib, loaded.inputs, limit=calib_samples, seed=seed
        )
    prefix = (parse_pipeline(CLEANUP_PASSES) if cleanup else []) + before
    graph = PassManager(prefix).run(loaded.model, ctx) if prefix else loaded.model
    PassManager([spec])  # options checked before any evaluation
    return graph, spec, ctx, loaded


def sensitivity(
    model: Any,
    data: Any,
    passes: str = "qdq",
    *,
    calib: str | None = None,
    calib_samples: int | None = None,
    metric: Metric = None,
    batch_size: int = DEFAULT_BATCH,
    samples: int | None = None,
    output: str | int | None = None,
    input_shapes: Sequence[Any] | None = None,
    trust_code: bool = False,
    input_values: Mapping[str, Any] | None = None,
    target: Any = None,
    example_inputs: Any = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Per-layer sensitivity of ``model`` to the last pass of ``passes`` on ``data``.

    Args:
        model: a source model (as for :func:`edgecc.compile`).
        data: labelled (or unlabelled, for ``agreement``) data, as for :func:`edgecc.evaluate`.
        passes: ``qdq``, ``prune(ratio=0.5)``, ``lowrank(energy=0.9)``...; passes before the
            last one run first, on every layer (``fold-bn,qdq``).
        calib: calibration data for ``qdq`` (``--calib``).
        calib_samples: at most this many calibration samples.
        metric: ``top1``, ``top5``, ``agreement`` or None (``top1`` with labels).
        batch_size, samples, output: as for :func:`edgecc.evaluate`.
        input_shapes, trust_code, input_values, example_inputs: how to load the model.
        target: the target whose pass defaults apply (qdq's activation type).
        seed: seed of random calibration.
        progress: called with one-line progress messages.

    Returns:
        The table of :mod:`edgecc.evaluation.sensitivity` (layers sorted by drop).
    """
    options = ModelOptions(input_shapes, trust_code, input_values, target, example_inputs)
    graph, spec, ctx, loaded = prepare(model, passes, options, calib, calib_samples, seed)
    runner_inputs = OnnxRunner(graph).inputs
    bound = open_data(data, runner_inputs).limit(samples)
    name = str(model) if not hasattr(model, "forward") else type(model).__name__
    return layer_sensitivity(graph, spec, bound, ctx, metric, batch_size, output, name, progress)
