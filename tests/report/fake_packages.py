"""Package folders written by hand for the report tests: the files a real compile writes,
with the optional manifest entries (accuracy, kept_float, spared, sensitivity) other
commands add, and a placeholder library (the report reads its size, never runs it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgecc.package import sha256_file


def tiny_onnx() -> onnx.ModelProto:
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 2], np.ones(8, np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def pass_rows(final_params: int, cosine: float) -> list[dict[str, Any]]:
    base = {"nodes": 12, "macs": 50_000, "max_abs_diff": 0.0, "seconds": 0.01}
    return [
        {**base, "step": "000_input", "pass": "input", "modified": None, "params": 10_000,
         "bytes": 40_500, "cosine": 1.0},
        {**base, "step": "001_fold-bn", "pass": "fold-bn", "modified": True, "params": 9_800,
         "bytes": 39_700, "cosine": 0.999999},
        {**base, "step": "002_qdq", "pass": "qdq", "modified": True, "params": final_params,
         "bytes": final_params + 900, "cosine": cosine, "max_abs_diff": 0.02},
    ]


def make_package(
    folder: Path,
    *,
    library_bytes: int = 120_000,
    target: str = "x86",
    pipeline: str = "fold-bn,qdq",
    final_params: int = 9_800,
    cosine: float = 0.995,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a package at ``folder``; ``extra`` is merged into the manifest."""
    folder.mkdir(parents=True)
    (folder / "model.so").write_bytes(b"\x7fELF" + bytes(library_bytes - 4))
    onnx.save(tiny_onnx(), str(folder / "model.onnx"))
    x = np.ones((1, 4), np.float32)
    np.savez(folder / "reference.npz", **{"input:x": x, "reference:y": x[:, :2],
                                         "expected:y": x[:, :2]})
    arch = "aarch64" if target == "rpi4" else "x86_64"
    manifest = {
        "format": "edgecc-package/1",
        "target": {"name": target, "arch": arch, "device": "cpu"},
        "source": {"format": "onnx", "sha256": "ab" * 32},
        "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"}],
        "pipeline": pipeline,
        "library": {"file": "model.so", "sha256": sha256_file(folder / "model.so")},
        **(extra or {}),
    }
    report = {
        "passes": pass_rows(final_params, cosine),
        "graph_vs_reference": {"cosine": cosine, "max_abs_diff": 0.02},
        "sizes": {"library_bytes": library_bytes, "onnx_bytes": final_params + 900,
                  "source_onnx_bytes": 40_500},
        "stats": {"input": {"params": 10_000, "macs": 50_000},
                  "final": {"params": final_params, "macs": 50_000}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def sensitivity_result(n_layers: int = 6, evil: str = "") -> dict[str, Any]:
    layers = [
        {"layer": f"/blocks.{i}/conv{'$1' if i == 1 else ''}{evil if i == 0 else ''}",
         "op": "Conv", "metric": 0.9 - 0.01 * i, "drop": 0.05 / (i + 1), "params": 1000 * i}
        for i in range(n_layers)
    ]
    return {"model": "tinycnn", "pass": "qdq", "metric": "top1", "baseline": 0.9,
            "layers": layers}


def bench_result(ratio: float) -> dict[str, Any]:
    def timing(ms: float) -> dict[str, float]:
        return {"median_ms": ms, "q1_ms": ms * 0.9, "q3_ms": ms * 1.1}

    return {"edgecc": timing(ratio * 2.0), "onnxruntime": timing(2.0), "threads": 2,
            "ratio": ratio}
