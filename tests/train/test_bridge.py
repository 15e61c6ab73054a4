"""The ONNX <-> torch bridge: every weight kind written back and checked against ONNX Runtime,
the batch-free copy, and the torchvision stand-in."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from onnx import helper

from edgecc.errors import PassError, UserInputError
from edgecc.report.compare import run_onnx
from edgecc.train.bridge import TorchGraph, batch_free, check_write_back, import_onnx2torch
from tests.models import onnx_model, tensor


def _mixed():
    """Conv+bias, BatchNorm, Reshape [1, -1], Gemm (alpha, beta, transB=0), MatMul with a
    weight shared by two nodes, LayerNormalization."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    inits = {
        "cw": f(4, 2, 3, 3), "cb": f(4), "g": f(4) + 2, "be": f(4), "mu": f(4),
        "var": np.abs(f(4)) + 0.5, "shape": np.array([1, -1], np.int64), "gw": f(64, 8),
        "gc": f(8), "mw": f(8, 8), "ln_s": f(8), "ln_b": f(8),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], "conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"], "bn"),
        helper.make_node("Relu", ["bn"], ["r"], "relu"),
        helper.make_node("Reshape", ["r", "shape"], ["flat"], "flat", allowzero=1),
        helper.make_node("Gemm", ["flat", "gw", "gc"], ["h"], "gemm", alpha=2.0, beta=0.5),
        helper.make_node("MatMul", ["h", "mw"], ["m1"], "mm1"),
        helper.make_node("MatMul", ["m1", "mw"], ["m2"], "mm2"),
        helper.make_node("LayerNormalization", ["m2", "ln_s", "ln_b"], ["y"], "ln", axis=-1),
    ]
    return onnx_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 8])], inits)


X = {"x": np.random.default_rng(1).normal(size=(1, 2, 4, 4)).astype(np.float32)}


def test_all_weights_mapped_and_written_back() -> None:
    model = _mixed()
    graph = TorchGraph(model)
    assert set(graph.weights) == {"cw", "cb", "g", "be", "gw", "gc", "mw", "ln_s", "ln_b"}
    assert check_write_back(model, graph, X) < 1e-5  # before training: the same function
    with torch.no_grad():
        for i, p in enumerate(graph.parameters()):
            p.add_(0.05 * (i + 1))
    changed = graph.write_back(model)
    assert check_write_back(changed, graph, X) < 1e-4
    # the shared MatMul weight is one parameter: mm1 and mm2 still read the same values
    assert sum(t.name == "mw" for t in changed.graph.initializer) == 1


def test_check_fails_on_a_wrong_write_back() -> None:
    model = _mixed()
    graph = TorchGraph(model)
    with torch.no_grad():
        graph.weights["gw"].param.mul_(3)
    with pytest.raises(PassError, match="disagree"):
        check_write_back(model, graph, X)  # model still holds the old weights


def test_batch_free_runs_batched() -> None:
    model = _mixed()
    free = batch_free(model)
    reshape = next(n for n in free.graph.node if n.op_type == "Reshape")
    assert not any(a.name == "allowzero" for a in reshape.attribute)
    graph = TorchGraph(model, trainable=False)
    xs = np.random.default_rng(2).normal(size=(3, 2, 4, 4)).astype(np.float32)
    with torch.no_grad():
        batched = graph({"x": torch.from_numpy(xs)}).numpy()
    single = np.concatenate([run_onnx(model, {"x": xs[i : i + 1]})["y"] for i in range(3)])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)


def test_torchvision_stub_raises_a_clear_error() -> None:
    import_onnx2torch()
    from onnx2torch.node_converters import nms

    assert "torchvision" not in sys.modules  # the stub is only in place during the import
    with pytest.raises(UserInputError, match="NonMaxSuppression or RoiAlign"):
        nms.torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
