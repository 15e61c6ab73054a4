"""Run ONNX models as the numerical reference and compare outputs.

The reference runner is ONNX Runtime with every graph optimisation off
(``ORT_DISABLE_ALL``): its own fusions would otherwise change the numbers we compare against.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgecc.runtime import _runner


def run_onnx(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on ``inputs`` with ONNX Runtime, optimisations off, CPU, 2 threads."""
    sess = ort_session(model, threads=2, optimise=False)
    names = [o.name for o in sess.get_outputs()]
    feeds = {i.name: np.asarray(inputs[i.name]) for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, feeds), strict=True))


def ort_session(model: onnx.ModelProto, threads: int, optimise: bool) -> Any:
    """A CPU ONNX Runtime session; ``optimise=False`` turns every graph optimisation off."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimise:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # fatal only: a failing node is in the exception, one line
    return ort.InferenceSession(_ort_bytes(model), opts, providers=["CPUExecutionProvider"])


# onnx >= 1.20 stamps new models with IR version 12+, which ONNX Runtime may not read yet; the
# operators we use are all expressible at IR 10, so the reference run lowers the stamp.
ORT_MAX_IR_VERSION = 10


def _ort_bytes(model: onnx.ModelProto) -> bytes:
    if model.ir_version <= ORT_MAX_IR_VERSION:
        return model.SerializeToString()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = ORT_MAX_IR_VERSION
    return copy.SerializeToString()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two tensors, flattened (1.0 for two zero tensors, NaN with NaNs)."""
    return _runner.cosine(a, b)


def compare_outputs(
    outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """Worst-case agreement of ``outputs`` with ``reference`` (matched by name, else by order).

    Returns ``max_abs_diff`` (max over outputs), ``max_rel_diff`` (max abs diff divided by the
    reference's max magnitude), ``cosine`` (min over outputs), ``nonfinite`` (elements that are
    NaN/Inf on one side only, summed) and ``per_output`` (the same figures by name). Any
    ``nonfinite`` element makes the diffs ``inf`` and the cosine NaN, never a perfect match.
    The arithmetic is the package runner's (:mod:`edgecc.runtime._runner`), so a board's
    ``run.py --check`` and ``edgecc run --check`` agree.
    """
    return _runner.compare_named(outputs, reference)


# run --check on a quantized package: tolerance in quantization steps of each output, and cosine.
# Measured (docs in README "run"): a deep int8 net disagrees with itself by this much between
# ONNX Runtime's optimisation levels; see check_rule.
QUANT_MAX_STEPS = 8.0
QUANT_MIN_COSINE = 0.999


def is_quantized(model: onnx.ModelProto) -> bool:
    """True when the graph quantizes activations (QuantizeLinear nodes): rounding ties there
    may flip one step between implementations."""
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def uses_int8(model: onnx.ModelProto) -> bool:
    """True when the graph holds any QuantizeLinear/DequantizeLinear (static or weight-only)."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def check_rule(model: onnx.ModelProto, expected: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The rule ``run --check`` applies to a package of ``model`` (stored in its manifest).

    fp32 graphs: ``max_rel_diff <= 1e-3`` and cosine ``>= 0.9999`` per output. Quantized graphs
    (:func:`is_quantized`): per output ``max_abs_diff <= QUANT_MAX_STEPS * step`` and cosine
    ``>= QUANT_MIN_COSINE``, where ``step`` is the scale of the DequantizeLinear producing the
    output when there is one, else one int8 step of the output's range on the probe input
    (``(max - min) / 255`` of ``expected``).
    """
    if not is_quantized(model):
        return dict(_runner.FP32_RULE)
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    steps = {}
    for name, value in expected.items():
        node = producers.get(name)
        scale = None
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in inits:
            s = numpy_helper.to_array(inits[node.input[1]])
            scale = float(np.max(s)) if s.size else None
        if scale is None:
            finite = np.asarray(value, np.float64)
            finite = finite[np.isfinite(finite)]
            scale = float(finite.max() - finite.min()) / 255 if finite.size else 0.0
        steps[name] = scale
    return {
        "kind": "quantized",
        "max_steps": QUANT_MAX_STEPS,
        "min_cosine": QUANT_MIN_COSINE,
        "steps": steps,
    }


def time_onnx(
    model: onnx.ModelProto,
    inputs: Mapping[str, np.ndarray],
    repeat: int = 50,
    warmup: int = 5,
    threads: int = 2,
) -> dict[str, float]:
    """Median and quartiles (ms) of ONNX Runtime running ``model`` with its default
    optimisations: the peer a compiled package is compared with, in the same run."""
    import time

    sess = ort_session(model, threads, optimise=True)
    feeds = {i.name: np.asarray(inputs[i.name]) for i in sess.get_inputs()}
    for _ in range(warmup + 1):
        sess.run(None, feeds)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return {"median_ms": float(median), "q1_ms": float(q1), "q3_ms": float(q3)}
