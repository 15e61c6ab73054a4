"""depthwise-separable: exact on separable kernels, the least-squares error bound otherwise,
declines and the MAC saving."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from edgecc.errors import UserInputError
from edgecc.passes.manager import PassManager, parse_pipeline
from edgecc.report.compare import run_onnx
from edgecc.report.metrics import graph_stats
from tests.models import onnx_model, tensor

OUT, C, K = 24, 12, 3


def _conv(w: np.ndarray, group: int = 1, stride: int = 1, bias: bool = True):
    o = w.shape[0]
    inits = {"w": w, **({"b": np.linspace(-1, 1, o, dtype=np.float32)} if bias else {})}
    node = helper.make_node(
        "Conv",
        ["x", "w", *(["b"] if bias else [])],
        ["y"],
        "conv",
        pads=[1, 1, 1, 1],
        strides=[stride, stride],
        group=group,
    )
    side = 8 // stride
    return onnx_model([node], [tensor("x", [1, C, 8, 8])], [tensor("y", [1, o, side, side])], inits)


def _run(model, pipeline: str = "depthwise-separable"):
    manager = PassManager(parse_pipeline(pipeline))
    return manager.run(model), manager.records[-1]


X = {"x": np.random.default_rng(5).normal(size=(1, C, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_exact_when_separable(stride: int, bias: bool) -> None:
    """W[o, c] = P[o, c] D[c]: rank one per input channel, so the rewrite is exact."""
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(OUT, C))[:, :, None, None] * rng.normal(size=(C, K, K))[None]).astype(
        np.float32
    )
    model = _conv(w, stride=stride, bias=bias)
    out, record = _run(model)
    assert record.modified
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv"]
    assert record.info["layers"][0]["rel_error"] < 1e-6
    want, got = run_onnx(model, X)["y"], run_onnx(out, X)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert graph_stats(out)["macs"] < graph_stats(model)["macs"]


@pytest.mark.parametrize("rank", [1, 2])
def test_error_is_the_svd_tail(rank: int) -> None:
    """Random kernel: relative error = sqrt(sum of dropped s^2 / ||W||^2), and the outputs
    differ by no more than that error allows (||y - y'|| <= ||W - W'|| ||patches||)."""
    w = np.random.default_rng(1).normal(size=(OUT, C, K, K)).astype(np.float32)
    s = np.linalg.svd(np.moveaxis(w.reshape(OUT, C, -1), 1, 0).astype(np.float64), compute_uv=False)
    expected = np.sqrt((s[:, rank:] ** 2).sum() / (s**2).sum())
    out, record = _run(_conv(w, bias=False), f"depthwise-separable(rank={rank})")
    assert record.info["layers"][0]["rel_error"] == pytest.approx(expected, rel=1e-5)
    want, got = run_onnx(_conv(w, bias=False), X)["y"], run_onnx(out, X)["y"]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1.5 * expected  # random input: output error tracks the weight error
    assert rel > 0.1 * expected  # and it is lossy


@pytest.mark.parametrize(
    ("w", "group", "pipeline", "reason"),
    [
        (np.ones((C, 1, K, K), np.float32), C, "depthwise-separable", "grouped"),
        (np.ones((OUT, C, 1, 1), np.float32), 1, "depthwise-separable", "1x1"),
        (
            np.ones((OUT, C, K, K), np.float32),
            1,
            "depthwise-separable(min_channels=16)",
            "min_chan",
        ),
        (
            np.random.default_rng(2).normal(size=(OUT, C, K, K)).astype(np.float32),
            1,
            "depthwise-separable(max_error=0.1)",
            "max_error",
        ),
    ],
)
def test_declines(w: np.ndarray, group: int, pipeline: str, reason: str) -> None:
    model = _conv(w, group=group)
    out, record = _run(model, pipeline)
    assert not record.modified
    assert reason in record.info["declined"][0]["reason"]
    assert [n.op_type for n in out.graph.node] == ["Conv"]


def test_bad_options() -> None:
    with pytest.raises(UserInputError, match="rank"):
        PassManager(parse_pipeline("depthwise-separable(rank=0)"))
    model = _conv(np.ones((OUT, C, K, K), np.float32))
    with pytest.raises(UserInputError, match="skip"):
        _run(model, "depthwise-separable(skip=[nope])")
