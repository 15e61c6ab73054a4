"""The Python API: what build pipelines embed. The CLI is a thin layer over these functions.

Example::

    import edgecc
    pkg = edgecc.compile("model.pt", target="rpi4", input_shapes=["x:1x3x224x224"],
                         passes="fold-bn,prune(ratio=0.3)", out="build/model")
    outputs = edgecc.load("build/model").run({"x": x})
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecc import __version__
from edgecc.package import (
    LIBRARY,
    MANIFEST,
    ONNX_MODEL,
    REFERENCE,
    REPORT,
    WARN_COSINE,
    Package,
    read_arrays,
    save_reference,
    sha256_file,
    staged_output,
    write_json,
    write_runner,
)

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

# Run before every pipeline unless ``cleanup=False`` / ``--no-cleanup``: exporters leave weights
# behind Transpose/Cast chains and compute zero biases from Shape; folding them first lets the
# compression passes see plain constant weights. expand-rnn unrolls LSTM/GRU/RNN (TVM cannot
# import them) before any pass (dynamic-quant, lowrank) looks for MatMul weights.
CLEANUP_PASSES = "fold-constants,expand-rnn,qlinear-to-qdq,remove-identity,eliminate-dead"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"edgecc": __version__, "python": platform.python_version()}
    for dist in ("torch", "apache-tvm", "onnx", "onnxruntime"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _probe_text(probe: str | Path | Mapping[str, np.ndarray] | None) -> str:
    if probe is None:
        return "seeded: floats N(0, 1), ids uniform, masks ones"
    return str(probe) if isinstance(probe, (str, Path)) else "arrays given to edgecc.compile"


def _input_specs(input_shapes: Sequence[Any] | None) -> list[Any] | None:
    from edgecc.frontend import InputSpec, parse_input_spec

    if not input_shapes:
        return None
    return [s if isinstance(s, InputSpec) else parse_input_spec(str(s)) for s in input_shapes]


def _io_entries(
    model: onnx.ModelProto, names: Iterable[str], arrays: Mapping[str, np.ndarray]
) -> list[dict[str, Any]]:
    return [
        {"name": n, "shape": list(np.shape(arrays[n])), "dtype": str(np.asarray(arrays[n]).dtype)}
        for n in names
    ]


def compile(  # noqa: A001  (the product's verb; shadowing the builtin inside edgecc is intended)
    model: str | Path | Any,
    target: str | Any = "x86",
    *,
    out: str | Path,
    input_shapes: Sequence[Any] | None = None,
    example_inputs: Any = None,
    passes: str | Sequence[Any] | None = None,
    disable_passes: Iterable[str] = (),
    cleanup: bool = True,
    calib: str | None = None,
    calib_samples: int | None = None,
    dump_dir: str | Path | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    input_values: Mapping[str, Any] | None = None,
    seed: int = 0,
    probe: str | Path | Mapping[str, np.ndarray] | None = None,
    min_cosine: float | None = None,
    progress: Progress | None = None,
    data: Any = None,
    metric: Any = None,
    max_drop: float | None = None,
    tuning_records: str | Path | None = None,
    tune_trials: int = 0,
    tuning_runner: Any = None,
    tuning_builder: Any = None,
    train_data: str | Path | Mapping[str, np.ndarray] | None = None,
) -> Package:
    """Compile a model for a target into a package folder at ``out``.

    Args:
        model: a path (``.pt`` TorchScript, ``.pt2`` torch.export, ``.onnx``, pickled module with
            ``trust_pickle``) or an ``nn.Module``.
        target: a target name/alias (``edgecc targets``) or a :class:`edgecc.targets.Target`.
        out: the package folder to write (replaced atomically).
        input_shapes: ``["x:1x3x224x224[:dtype]"]`` or InputSpecs, where the model does not say.
        example_inputs: example tensors for an ``nn.Module`` (tuple or dict).
        passes: pipeline text (``fold-bn,prune(ratio=0.3)``) or PassSpecs; None = target default.
        disable_passes: pass names to skip (bisecting).
        cleanup: run :data:`CLEANUP_PASSES` before the pipeline, so that exporter artefacts
            (weights behind Transpose, zero biases computed from Shape) are plain constants
            the compression passes can match.
        calib: calibration data for ``qdq``: ``.npz`` file, folder of ``.npy``, or ``random``.
        calib_samples: use at most this many calibration samples.
        dump_dir: write the graph after each pass and a summary table there.
        trust_pickle: alias of ``trust_code``.
        trust_code: load files that run their own code (pickled modules or ``.pt2`` members,
            TorchScript calling file/network operators); refused otherwise.
        input_values: constants for non-tensor ``forward`` arguments (``{"sr": 16000}``).
        seed: seed of the probe input and random calibration.
        probe: the input the reference and the per-pass comparisons use (``.npy``/``.npz``
            path or arrays by name; a leading dataset axis is cut to the batch); default a
            seeded N(0, 1) input. Give real data when lossy passes expect real inputs.
        min_cosine: fail (:class:`edgecc.errors.CheckFailedError`, exit 4, no package written)
            when the final graph's cosine against the source model's float reference on the
            probe is below this; below 0.99 a warning is logged either way.
        progress: called with one-line progress messages.
        data: labelled (or unlabelled) data to measure the accuracy on, as for
            :func:`edgecc.evaluate`; recorded in the manifest's ``accuracy``.
        metric: ``top1``, ``top5``, ``agreement`` (default: ``top1`` with labels).
        max_drop: the accuracy budget (needs ``data``): exempt the most sensitive layers of the
            qdq (else prune, else lowrank) pass until the drop is at most this
            (:mod:`edgecc.evaluation.budget`).
        tuning_records: a MetaSchedule record folder (``edgecc tune``): kernels with a record
            use it, the others the schedule rules (:mod:`edgecc.lower.tune`).
        tune_trials: tune every kernel with this many measured candidates first, into
            ``tuning_records`` or, without it, the target's default cache.
        tuning_runner: a MetaSchedule Runner timing the candidates (default: this host).
        tuning_builder: a MetaSchedule Builder (default: in this process).
        train_data: training data for ``distill`` (``.npz`` path or arrays by input name, plus
            optional ``labels``).

    Returns:
        The written :class:`Package`.

    Raises:
        CheckFailedError: the agreement with the source is below ``min_cosine``, or the
            ``max_drop`` budget cannot be met.
    """
    from edgecc.frontend import load_model
    from edgecc.lower import check_coverage, check_toolchain, int8_dynamic, lower
    from edgecc.passes import PassContext, PassManager, PassSpec, format_pipeline, parse_pipeline
    from edgecc.passes.dump import DumpInstrument
    from edgecc.passes.manager import FailureDumpInstrument
    from edgecc.report.compare import check_rule, compare_outputs, run_onnx
    from edgecc.targets import Target, get_target

    say = progress or (lambda msg: logger.info("%s", msg))
    started = time.perf_counter()
    tgt: Target = target if isinstance(target, Target) else get_target(str(target))
    if passes is None:
        specs = parse_pipeline(tgt.default_passes)
    elif isinstance(passes, str):
        specs = parse_pipeline(passes)
    else:
        specs = [
            p if isinstance(p, PassSpec) else PassSpec(p[0], tuple(dict(p[1]).items()))
            for p in passes
        ]
    if cleanup:
        specs = parse_pipeline(CLEANUP_PASSES) + specs
    check_toolchain(tgt)  # a missing compiler fails before any export or pass
    if max_drop is not None and data is None:
        from edgecc.errors import UserInputError

        raise UserInputError("--max-drop needs --data (the data to measure the drop on)")
    tuning = _tuning(tgt, tuning_records, tune_trials, tuning_runner, tuning_builder, seed)
    out = Path(out)

    with staged_output(out) as staging:
        say(f"loading {model if isinstance(model, (str, Path)) else type(model).__name__}")
        loaded = load_model(
            model,
            input_specs=_input_specs(input_shapes),
            example_inputs=example_inputs,
            trust_code=trust_code or trust_pickle,
            input_values=input_values,
            seed=seed,
            probe_inputs=read_arrays(Path(probe)) if isinstance(probe, (str, Path)) else probe,
        )
        # fail before any pass or compile time is spent (ops a pass will expand excepted)
        check_coverage(loaded.model, {s.name for s in specs} - set(disable_passes))

        ctx = PassContext(target=tgt, probe_inputs=loaded.probe_inputs, seed=seed, progress=say)
        dump = DumpInstrument(dump_dir, loaded.reference_outputs)
        instruments = [dump] + ([FailureDumpInstrument(Path(dump_dir))] if dump_dir else [])
        manager = PassManager(specs, instruments, disabled=disable_passes)
        if calib is not None and not manager.uses("qdq"):  # not recorded: it had no effect
            logger.warning("--calib has no effect: no qdq pass in the pipeline")
        elif calib is not None:
            from edgecc.passes.calibration import load_calibration

            ctx.calibration, ctx.calibration_source = load_calibration(
                calib, loaded.inputs, limit=calib_samples, seed=seed
            )
        if train_data is not None and not manager.uses("distill"):
            logger.warning("--train has no effect: no distill pass in the pipeline")
        elif train_data is not None:
            from edgecc.train import load_train_data

            ctx.train_data, ctx.train_source = load_train_data(train_data)
        budget = None
        if data is not None:
            from edgecc.evaluation.budget import fit_budget
            from edgecc.evaluation.data import open_data
            from edgecc.evaluation.runners import OnnxRunner

            bound = open_data(data, OnnxRunner(loaded.model).inputs)
            budget = fit_budget(
                loaded.model, specs, ctx, bound, metric, max_drop, manager.disabled, progress=say
            )
            if budget.specs != specs:
                specs = budget.specs
                manager = PassManager(specs, instruments, disabled=disable_passes)
        effective = manager.effective
        say(f"running {len(effective)} passes: {format_pipeline(effective) or '(none)'}")
        final = manager.run(loaded.model, ctx)  # lower() checks coverage again before TVM
        expected = run_onnx(final, loaded.probe_inputs)
        graph_vs_reference = compare_outputs(expected, loaded.reference_outputs)
        _gate_agreement(graph_vs_reference, min_cosine, format_pipeline(specs))

        shapes = {s.name: tuple(s.shape) for s in loaded.inputs}
        dtypes = {s.name: s.dtype for s in loaded.inputs}
        say(f"lowering through TVM for {tgt.name}")
        lib = lower(final, tgt, shapes, dtypes, staging / LIBRARY, progress=say, tuning=tuning)

        onnx.save(final, str(staging / ONNX_MODEL))
        save_reference(staging / REFERENCE, loaded.probe_inputs, loaded.reference_outputs, expected)
        write_runner(staging)

        manifest = {
            "format": "edgecc-package/1",
            "versions": _versions(),
            "target": tgt.to_dict(),
            "source": {
                "format": loaded.source_format,
                "path": str(Path(model).resolve()) if isinstance(model, (str, Path)) else None,
                "sha256": loaded.source_sha256,
                "reference": loaded.reference_source,
                "probe": _probe_text(probe),
                "input_values": loaded.input_values,
                "fixed_dims": loaded.fixed_dims,
            },
            "inputs": [
                {"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in loaded.inputs
            ],
            "outputs": _io_entries(final, loaded.output_names, expected),
            "passes": [{"name": s.name, "options": dict(s.options)} for s in specs],
            "pipeline": format_pipeline(specs),
            "disabled_passes": sorted(manager.disabled),
            "calibration": ctx.calibration_source,
            "train_data": ctx.train_source,
            "library": {
                "file": LIBRARY,
                "sha256": sha256_file(lib.path),
                "cuda_code": lib.cuda_code,
                "notes": lib.notes,
                **lib.details,
            },
            "onnx": {"file": ONNX_MODEL, "sha256": sha256_file(staging / ONNX_MODEL)},
            "int8_execution": _int8_execution(final, tgt, lib.details),
            "check": int8_dynamic.check_rule(check_rule(final, expected), lib.details),
            **(budget.record(final) if budget is not None else {}),
        }
        write_json(staging / MANIFEST, manifest)
        rows = dump.rows
        final_row = rows[-1]  # the last row describes the final graph (skipped passes add none)
        report = {
            "passes": rows,
            "skipped_passes": [r.spec.text() for r in manager.records if r.skipped],
            "graph_vs_reference": graph_vs_reference,
            "sizes": {
                "library_bytes": lib.path.stat().st_size,
                "onnx_bytes": final_row["bytes"],
                "source_onnx_bytes": rows[0]["bytes"] if rows else None,
            },
            "stats": {
                "input": {k: rows[0][k] for k in ("nodes", "params", "macs", "bytes")},
                "final": {k: final_row[k] for k in ("nodes", "params", "macs", "bytes")},
            },
            "compile_seconds": lib.compile_seconds,
            "total_seconds": time.perf_counter() - started,
        }
        write_json(staging / REPORT, report)
        if dump_dir:
            dump.write_summary()
    say(f"wrote {out}")
    return Package(out)


def _tuning(
    target: Any, records: str | Path | None, trials: int, runner: Any, builder: Any, seed: int
) -> Any:
    """The :class:`edgecc.lower.tune.Tuning` of compile's options (None: no records used).

    Raises:
        UserInputError: negative trials, or a record folder that is not a folder.
    """
    from edgecc.errors import UserInputError

    if records is None and not trials:
        return None
    from edgecc.lower.tune import Tuning, check_tunable, default_records_dir

    if trials < 0:
        raise UserInputError(f"--tune-trials must be >= 0, got {trials}")
    folder = Path(records) if records is not None else default_records_dir(target)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"--tuning-records {folder}: not a folder")
    if records is not None and not trials and not folder.is_dir():
        raise UserInputError(f"--tuning-records {folder}: no such folder (tune first: edgecc tune)")
    tuning = Tuning(
        folder, trials, explicit=records is not None, seed=seed, runner=runner,
        builder=builder or "inprocess",
    )  # fmt: skip
    check_tunable(target, tuning)  # before any export or pass
    return tuning


def _gate_agreement(agreement: Mapping[str, Any], min_cosine: float | None, pipeline: str) -> None:
    """Warn below :data:`WARN_COSINE`, fail below ``min_cosine`` (cosine vs the source)."""
    from edgecc.errors import CheckFailedError

    cos = agreement["cosine"]
    text = f"cosine {cos:.6f} against the source model's float reference on the probe input"
    if agreement.get("nonfinite"):
        text += f" ({agreement['nonfinite']} NaN/Inf output values where the source has none)"
    if min_cosine is not None and not cos >= min_cosine:
        raise CheckFailedError(
            f"{text} is below --min-cosine {min_cosine} (pipeline {pipeline or '(none)'}); "
            "no package written"
        )
    if not cos >= WARN_COSINE:
        logger.warning("warning: %s is below %s: the passes changed the outputs", text, WARN_COSINE)


def _int8_execution(model: onnx.ModelProto, tgt: Any, details: Mapping[str, Any]) -> Any:
    """Per quantized layer, integer or float (CPU builds record it); else the target's line."""
    if "int8_ops" not in details:
        return tgt.int8_execution
    from edgecc.lower.int8.layers import int8_execution

    return int8_execution(
        model, details["int8_ops"], details.get("schedules"), details.get("int8_dynamic")
    )


def load(path: str | Path) -> Package:
    """Open a compiled package folder (``edgecc.load(path).run(inputs)``)."""
    return Package(path)
