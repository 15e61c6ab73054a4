"""Run ONNX models as the numerical reference and compare outputs.

The reference runner is ONNX Runtime with every graph optimisation off
(``ORT_DISABLE_ALL``): its own fusions would otherwise change the numbers we compare against.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx


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
    """Cosine similarity of two tensors, flattened (1.0 for two zero tensors)."""
    a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a64 @ b64 / (na * nb))


def compare_outputs(
    outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Worst-case agreement of ``outputs`` with ``reference`` (matched by name, else by order).

    Returns ``max_abs_diff`` (max over outputs), ``max_rel_diff`` (max abs diff divided by the
    reference's max magnitude) and ``cosine`` (min over outputs).
    """
    ref_items = list(reference.items())
    out_items = list(outputs.items())
    if len(ref_items) != len(out_items):
        raise ValueError(f"{len(out_items)} outputs but {len(ref_items)} reference outputs")
    by_name = all(name in outputs for name, _ in ref_items)
    worst = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "cosine": 1.0}
    for i, (name, ref) in enumerate(ref_items):
        out = outputs[name] if by_name else out_items[i][1]
        out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
        if out.shape != ref.shape:
            raise ValueError(f"output {name!r}: shape {out.shape} != reference {ref.shape}")
        diff = float(np.max(np.abs(out - ref))) if out.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        worst["max_abs_diff"] = max(worst["max_abs_diff"], diff)
        worst["max_rel_diff"] = max(worst["max_rel_diff"], diff / scale if scale else diff)
        worst["cosine"] = min(worst["cosine"], cosine(out, ref))
    return worst


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
