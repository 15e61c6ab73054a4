"""The evaluator behind ``edgecc eval``, ``edgecc.evaluate``, sensitivity and accuracy budgets.

A model (a torch or ONNX source file loaded by :mod:`edgecc.frontend` with the compile options,
an in-memory ONNX graph, or a compiled package) runs over labelled data
(:mod:`edgecc.evaluation.data`) batch by batch, and each batch folds into the metrics
(:mod:`edgecc.evaluation.metrics`): top-1/top-5 against labels, and agreement with a float
reference. Sources and graphs run under ONNX Runtime with optimisations off; packages run their
compiled library (natively, or aarch64 under emulation).

Which metric: ``top1`` when the data has labels, else ``agreement``. The reference for agreement
is ``reference`` when given; else, for a package, its source model when the manifest records the
source's path and the file is still there (loaded with the given model options at the package's
input shapes); else, for a source model, the model itself (agreement 1). A Python callable
``metric(outputs, labels) -> float`` is called once with the chosen output of every sample
(concatenated, samples on axis 0) and the labels (or None): it is the one metric that keeps
outputs in memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecc.errors import UserInputError
from edgecc.evaluation.data import EvalData, open_data
from edgecc.evaluation.metrics import METRICS, Agreement, TopK, score
from edgecc.evaluation.runners import OnnxRunner, PackageRunner

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 64
Metric = str | Callable[[np.ndarray, np.ndarray | None], float] | None


@dataclass
class ModelOptions:
    """How to load a source model: the options ``compile`` takes (``--input-shape``, ...)."""

    input_shapes: Sequence[Any] | None = None
    trust_code: bool = False
    input_values: Mapping[str, Any] | None = None
    target: Any = None
    example_inputs: Any = None

    def load(self, model: Any, input_shapes: Sequence[Any] | None = None) -> Any:
        from edgecc.api import _input_specs
        from edgecc.frontend import load_model

        return load_model(
            model,
            input_specs=_input_specs(input_shapes or self.input_shapes),
            example_inputs=self.example_inputs,
            trust_code=self.trust_code,
            input_values=self.input_values,
        )


@dataclass
class Opened:
    """A runnable model and what it is."""

    runner: Any
    description: str
    package: Any = None
    source: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def is_package(model: Any) -> bool:
    """True for a package folder (or :class:`edgecc.package.Package`)."""
    from edgecc.package import MANIFEST, Package

    if isinstance(model, Package):
        return True
    return isinstance(model, (str, Path)) and (Path(model) / MANIFEST).is_file()


def open_model(model: Any, options: ModelOptions | None = None) -> Opened:
    """A runner for ``model``: a package (folder or object), an ONNX graph, or a source."""
    from edgecc.package import Package
    from edgecc.targets import Target, get_target

    options = options or ModelOptions()
    if is_package(model):
        pkg = model if isinstance(model, Package) else Package(model)
        target = options.target
        if target is not None and not isinstance(target, Target):
            target = get_target(str(target))
        runner = PackageRunner(pkg, target)
        return Opened(runner, f"package {pkg.path}", package=pkg)
    if isinstance(model, onnx.ModelProto):
        return Opened(OnnxRunner(model), "ONNX graph", source=True)
    if options.target is not None:
        logger.warning("--target applies to packages only; %s is run by ONNX Runtime", model)
    direct = _batch_dynamic_onnx(model, options)
    if direct is not None:
        return Opened(OnnxRunner(direct), str(model), source=True)
    loaded = options.load(model)
    return Opened(
        OnnxRunner(loaded.model),
        str(model) if isinstance(model, (str, Path)) else type(model).__name__,
        source=True,
        extra={"source_format": loaded.source_format},
    )


def _batch_dynamic_onnx(model: Any, options: ModelOptions) -> onnx.ModelProto | None:
    """An ``.onnx`` file whose inputs are static but for the batch axis, read as it is (the
    frontend would want ``--input-shape`` to fix the batch); None for anything else."""
    if not isinstance(model, (str, Path)) or Path(model).suffix != ".onnx" or options.input_shapes:
        return None
    from edgecc.frontend.onnx_io import read_onnx

    graph = read_onnx(Path(model))
    inits = {t.name for t in graph.graph.initializer}
    for vi in graph.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param or any(not d.HasField("dim_value") for d in dims[1:]):
            return None
    return graph


def _package_source(opened: Opened, options: ModelOptions) -> Opened | None:
    """The float source of a package, when its manifest records a path that still exists."""
    path = opened.package.manifest.get("source", {}).get("path")
    if not path or not Path(path).is_file():
        return None
    shapes = [
        f"{i['name']}:{'x'.join(map(str, i['shape']))}:{i['dtype']}"
        for i in opened.package.manifest["inputs"]
    ]
    loaded = options.load(path, options.input_shapes or shapes)
    return Opened(OnnxRunner(loaded.model), str(path), source=True)


class CachedReference:
    """A reference runner whose outputs are kept per batch, for repeated evaluations on the
    same data (sensitivity, budgets): the reference runs once."""

    def __init__(self, runner: Any, output: str | int | None = None):
        self.runner, self.output = runner, output
        self.cache: list[np.ndarray] = []

    def outputs(self, index: int, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        if index < len(self.cache):
            return self.cache[index]
        value = _pick(self.runner.run(feeds), self.runner.output_names, self.output)
        self.cache.append(value)
        return value


def _pick(outputs: Mapping[str, np.ndarray], names: Sequence[str], output: str | int | None) -> Any:
    if output is None:
        output = 0
    if isinstance(output, int):
        if not 0 <= output < len(names):
            raise UserInputError(f"output index {output} out of range; the model gives {names}")
        return outputs[names[output]]
    if output not in outputs:
        raise UserInputError(f"unknown output {output!r}; the model gives {list(names)}")
    return outputs[output]


def run_evaluation(
    runner: Any,
    data: EvalData,
    metric: Metric = None,
    reference: CachedReference | None = None,
    batch_size: int = DEFAULT_BATCH,
    output: str | int | None = None,
    desc: str = "evaluating",
) -> dict[str, Any]:
    """Evaluate ``runner`` on bound ``data`` (see :func:`evaluate` for the result)."""
    from edgecc.passes.calibration import progress

    name = _metric_name(metric, data)
    if name in ("top1", "top5") and not data.has_labels:
        raise UserInputError(
            f"--metric {name} needs labels: the data has none (a labels array in the .npz, or "
            "labels.npy/labels.txt/labels.csv in the folder); use --metric agreement"
        )
    if name == "agreement" and reference is None:
        raise UserInputError("--metric agreement needs a float reference model (--reference)")
    step = getattr(runner, "chunk", None) or batch_size
    topk = TopK() if data.has_labels else None
    agree = Agreement() if reference is not None else None
    kept: list[np.ndarray] = []
    start = time.perf_counter()
    batches = progress(data.batches(step), desc, total=data.num_batches(step))
    for index, batch in enumerate(batches):
        y = _pick(runner.run(batch.inputs), runner.output_names, output)
        if topk is not None and batch.labels is not None:
            topk.update(y, batch.labels)
        if agree is not None:
            agree.update(y, reference.outputs(index, batch.inputs), batch.inputs)
        if callable(metric):
            kept.append(np.asarray(y))
    result: dict[str, Any] = {"samples": data.num_samples, "data": data.description}
    if topk is not None:
        result.update(topk.result())
    if agree is not None:
        result["agreement"] = agree.result()
    if callable(metric):
        outputs = np.concatenate(kept) if kept else np.empty((0,))
        result["value"] = float(metric(outputs, data.labels))
    else:
        result["value"] = score(result, name)
    result["metric"] = name
    result["seconds"] = time.perf_counter() - start
    return result


def _metric_name(metric: Metric, data: EvalData) -> str:
    if callable(metric):
        return getattr(metric, "__name__", "callable")
    if metric is None:
        return "top1" if data.has_labels else "agreement"
    if metric not in METRICS:
        raise UserInputError(f"unknown metric {metric!r}; choose {', '.join(METRICS)}")
    return metric


def evaluate(
    model: Any,
    data: Any,
    *,
    metric: Metric = None,
    reference: Any = None,
    batch_size: int = DEFAULT_BATCH,
    output: str | int | None = None,
    samples: int | None = None,
    input_shapes: Sequence[Any] | None = None,
    trust_code: bool = False,
    input_values: Mapping[str, Any] | None = None,
    target: Any = None,
    example_inputs: Any = None,
) -> dict[str, Any]:
    """Accuracy of ``model`` on ``data``, and its agreement with a float reference.

    Args:
        model: a package folder or :class:`~edgecc.package.Package`, an ``onnx.ModelProto``, or
            a source (``.onnx``, ``.pt``, ``.pt2``, pickled with ``trust_code``, an
            ``nn.Module`` with ``example_inputs``).
        data: an ``.npz``, a folder, a dataset name (``fashion-mnist``, ``digits``), a mapping
            of arrays (plus ``labels``) or an :class:`edgecc.datasets.Dataset` (see
            :mod:`edgecc.evaluation.data`).
        metric: ``top1``, ``top5``, ``agreement``, a callable ``(outputs, labels) -> float``,
            or None (``top1`` with labels, else ``agreement``).
        reference: the float model to agree with (same kinds as ``model``); see the module
            docstring for the default.
        batch_size: samples per ONNX Runtime run (packages run at their own batch).
        output: the output to score, by name or index (default the first).
        samples: evaluate the first ``samples`` samples only.
        input_shapes, trust_code, input_values, example_inputs: how to load a source model, as
            for :func:`edgecc.compile`.
        target: run a package as this target (a name or record) instead of its manifest's.

    Returns:
        ``{"metric", "value", "samples", "data", "model", "top1", "top5" (percent, with labels),
        "agreement": {"cosine", "cosine_min", "max_abs_error", "top1", "pooled"} (with a
        reference), "seconds"}``.

    Raises:
        UserInputError: unreadable data, missing labels, wrong input names or shapes.
    """
    options = ModelOptions(input_shapes, trust_code, input_values, target, example_inputs)
    opened = open_model(model, options)
    bound = open_data(data, opened.runner.inputs).limit(samples)
    ref_opened = None
    if reference is not None:
        ref_opened = open_model(reference, ModelOptions(input_shapes, trust_code, input_values))
    elif opened.package is not None and (metric == "agreement" or not bound.has_labels):
        ref_opened = _package_source(opened, options)
        if ref_opened is None:
            raise UserInputError(
                f"agreement with the float model needs --reference FLOAT_MODEL: package "
                f"{opened.package.path} does not record a source file that still exists"
            )
    ref = None
    if ref_opened is not None:
        ref = CachedReference(ref_opened.runner, output)
    elif opened.source and (metric == "agreement" or not bound.has_labels):
        ref = CachedReference(opened.runner, output)  # a float source agrees with itself
        ref_opened = opened
    result = run_evaluation(opened.runner, bound, metric, ref, batch_size, output)
    result["model"] = opened.description
    result["runner"] = opened.runner.description
    if ref_opened is not None:
        result["reference"] = ref_opened.description
    return result
