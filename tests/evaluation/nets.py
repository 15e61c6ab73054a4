"""Small classifiers on scikit-learn's digits, built as ONNX in code, for the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecc import datasets

FRAGILE = "gemm2"  # its activation input carries one channel 1000x larger than the others
OUTLIER = 1000.0


def train_mlp(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Weights (W: in x out, b) of a 64-48-32-10 ReLU MLP for the digits, in milliseconds:
    seeded random hidden layers (random features) and a least-squares output layer fitted to
    one-hot labels of the train split (about 90 % test accuracy)."""
    rng = np.random.default_rng(seed)
    train = datasets.digits("train")
    x = train.images.reshape(len(train), -1).astype(np.float64)
    w1, b1 = rng.standard_normal((64, 48)) * 0.5, rng.standard_normal(48) * 0.5
    h1 = np.maximum(x @ w1 + b1, 0)
    w2, b2 = rng.standard_normal((48, 32)) * 0.3, rng.standard_normal(32) * 0.3
    h2 = np.maximum(h1 @ w2 + b2, 0)
    design = np.hstack([h2, np.ones((len(h2), 1))])
    target = np.eye(10)[train.labels]
    sol = np.linalg.lstsq(design, target, rcond=None)[0]
    w3, b3 = sol[:-1], sol[-1]
    return [(w.astype(np.float32), b.astype(np.float32)) for w, b in [(w1, b1), (w2, b2), (w3, b3)]]


def mlp_onnx(
    layers: list[tuple[np.ndarray, np.ndarray]], fragile: bool = False, batch: int | str = "N"
) -> onnx.ModelProto:
    """Flatten(1x8x8) -> gemm1 -> relu -> gemm2 -> relu -> gemm3 (ONNX, opset 17).

    ``fragile`` scales hidden channel 0 by 1000 (gemm1's row and bias) and gemm2's matching input
    row by 1/1000: the float function is the same, but a per-tensor int8 scale of gemm2's input
    then has a step of ~1000/255 and rounds every other channel to 0.
    """
    (w1, b1), (w2, b2), (w3, b3) = [(w.copy(), b.copy()) for w, b in layers]
    if fragile:
        w1[:, 0] *= OUTLIER
        b1[0] *= OUTLIER
        w2[0, :] /= OUTLIER
    inits = [
        numpy_helper.from_array(a, n)
        for n, a in [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("w3", w3), ("b3", b3)]
    ]
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], "flatten"),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["h1"], "gemm1"),
        helper.make_node("Relu", ["h1"], ["r1"], "relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], FRAGILE),
        helper.make_node("Relu", ["h2"], ["r2"], "relu2"),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], "gemm3"),
    ]
    g = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save_digits(path: Path, split: str = "test", labels: bool = True) -> Path:
    """The digits split as an .npz named for the MLP's input (``x``, and ``labels``)."""
    ds = datasets.digits(split)
    arrays = {"x": ds.images, **({"labels": ds.labels} if labels else {})}
    np.savez(path, **arrays)
    return path
