"""lowrank: truncated-SVD splits of Gemm/MatMul/Conv; exactness, error vs singular values,
declines and options."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.errors import UserInputError
from edgecc.passes.manager import PassContext, PassManager, clone, parse_pipeline
from edgecc.passes.split_lowrank import SplitLowRank, gram_svd
from edgecc.report.compare import run_onnx

F = TensorProto.FLOAT
K, N = 48, 40


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs,
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _low_rank(k: int, n: int, r: int, seed: int = 0) -> np.ndarray:
    rng = _rng(seed)
    return (rng.normal(size=(k, r)) @ rng.normal(size=(r, n)) / np.sqrt(r)).astype(np.float32)


def _layer(kind: str, w_kn: np.ndarray, bias: bool = True) -> onnx.ModelProto:
    """One layer computing ``x @ w_kn`` (+ b) in the given form."""
    k, n = w_kn.shape
    b = _rng(9).normal(size=n).astype(np.float32)
    inits = {"b": b} if bias else {}
    if kind == "matmul-3d":
        inits["w"] = w_kn
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")]
        xs, ys = [2, 3, k], [2, 3, n]
    elif kind in ("gemm", "gemm-t"):
        inits["w"] = w_kn.T.copy() if kind == "gemm-t" else w_kn
        nodes = [helper.make_node("Gemm", ["x", "w"] + ["b"] * bias, ["y"], name="layer",
                                  transB=int(kind == "gemm-t"), alpha=0.5, beta=2.0)]
        xs, ys = [4, k], [4, n]
    else:  # conv: the K axis is (I, 3, 3)
        inits["w"] = w_kn.T.reshape(n, k // 9, 3, 3).copy()
        nodes = [helper.make_node("Conv", ["x", "w"] + ["b"] * bias, ["y"], name="layer",
                                  pads=[1, 1, 1, 1], strides=[2, 2])]
        xs, ys = [1, k // 9, 8, 8], [1, n, 4, 4]
    return _model(nodes, [helper.make_tensor_value_info("x", F, xs)],
                  [helper.make_tensor_value_info("y", F, ys)], inits)


def _feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    vi = model.graph.input[0]
    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return {vi.name: _rng(seed).normal(size=dims).astype(np.float32)}


def _run(model: onnx.ModelProto, **options):
    return SplitLowRank(**options)(clone(model), PassContext())


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


KINDS = [("matmul-3d", False), ("gemm", True), ("gemm", False), ("gemm-t", True),
         ("gemm-t", False), ("conv", True), ("conv", False)]


@pytest.mark.parametrize(("kind", "bias"), KINDS)
@pytest.mark.parametrize("option", [{"rank": 6}, {"energy": 1.0}])
def test_exact_rank_split_equals_the_original(kind, bias, option):
    """A rank-6 weight split at its full rank: outputs equal within 1e-4 (abs, |y| ~ 10)."""
    k = 45 if kind == "conv" else K
    model = _layer(kind, _low_rank(k, N, 6), bias)
    result = _run(model, **option)
    assert result.modified
    onnx.checker.check_model(result.model, full_check=True)
    (row,) = result.info["layers"]
    assert row["rank"] == 6 and row["rel_error"] < 1e-6 and row["nodes"] == ["layer"]
    assert row["params_after"] == 6 * (k + N) < row["params_before"] == k * N
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == [model.graph.node[0].op_type] * 2
    assert "w" not in {t.name for t in result.model.graph.initializer}
    assert _params(result.model) == _params(model) - k * N + 6 * (k + N)
    feeds = _feeds(model)
    np.testing.assert_allclose(run_onnx(result.model, feeds)["y"], run_onnx(model, feeds)["y"],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["gemm", "gemm-t", "conv"])
def test_energy_error_matches_the_singular_values(kind):
    """||W - W_r||_F^2 / ||W||_F^2 = 1 - kept energy (to 1e-5), with the smallest such rank."""
    k = 45 if kind == "conv" else K
    w = _rng(3).normal(size=(k, N)).astype(np.float32) * np.linspace(3, 0.1, N)
    model = _layer(kind, w)
    result = _run(model, energy=0.9)
    (row,) = result.info["layers"]
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    r = row["rank"]
    assert energy[r - 1] >= 0.9 > energy[r - 2]
    assert row["energy_kept"] == pytest.approx(energy[r - 1], abs=1e-9)
    assert abs(row["rel_error"] ** 2 - (1 - row["energy_kept"])) < 1e-5
    factors = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    a, b = factors["w_lowrank_a"], factors["w_lowrank_b"]
    if kind == "gemm-t":
        assert a.shape == (r, k) and b.shape == (N, r)  # stored transposed like the original
    elif kind == "conv":
        assert a.shape == (r, 5, 3, 3) and b.shape == (N, r, 1, 1)
    else:
        assert a.shape == (k, r) and b.shape == (r, N)


@pytest.mark.parametrize("shape", [(60, 25), (25, 60)])
def test_gram_svd_matches_lapack(shape):
    m = _rng(8).normal(size=shape) * np.linspace(5, 0.01, shape[1])
    u, s, vt = gram_svd(m)
    ref = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(s, ref, rtol=1e-9)
    np.testing.assert_allclose((u * s) @ vt, m, atol=1e-10)
    np.testing.assert_allclose(u.T @ u, np.eye(len(s)), atol=1e-8)


def test_ratio_keeps_that_fraction_of_parameters():
    model = _layer("gemm", _rng(4).normal(size=(K, N)).astype(np.float32))
    (row,) = _run(model, ratio=0.25).info["layers"]
    assert row["rank"] == int(0.25 * K * N / (K + N))
    assert row["params_after"] <= 0.25 * row["params_before"]


def test_no_saving_is_declined_with_the_reason():
    model = _layer("gemm", _rng(5).normal(size=(K, N)).astype(np.float32))
    before = model.SerializeToString()
    result = _run(model, rank=min(K, N))
    assert not result.modified and result.model.SerializeToString() == before
    (declined,) = result.info["declined"]
    assert declined["reason"] == (f"rank {N} saves nothing: r(K+N) = {N * (K + N)} >= KN = "
                                  f"{K * N} (K={K}, N={N})")


def test_skip_min_size_and_unsupported_layers_are_declined():
    rng = _rng(6)
    w = _low_rank(K, N, 4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="keep_me"),
             helper.make_node("MatMul", ["h", "small"], ["h2"], name="tiny"),
             helper.make_node("MatMul", ["c", "h2"], ["y"], name="w_at_x"),
             helper.make_node("Conv", ["img", "dw"], ["z"], name="depthwise", group=4),
             helper.make_node("MatMul", ["h2", "batched"], ["v"], name="batched")]
    model = _model(
        nodes, [helper.make_tensor_value_info("x", F, [2, K]),
                helper.make_tensor_value_info("img", F, [1, 4, 5, 5])],
        [helper.make_tensor_value_info(o, F, None) for o in ("y", "z", "v")],
        {"w": w, "small": rng.normal(size=(N, 2)).astype(np.float32),
         "c": rng.normal(size=(3, 2)).astype(np.float32),
         "dw": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
         "batched": rng.normal(size=(3, 2, 5)).astype(np.float32)})
    result = _run(model, rank=4, skip=["keep_me"], min_size=100)
    assert not result.modified
    reasons = {d["node"]: d["reason"] for d in result.info["declined"]}
    assert reasons == {
        "keep_me": "in skip",
        "tiny": "80 weight elements < min_size=100",
        "w_at_x": "constant first operand (W @ x) is not handled",
        "depthwise": "grouped convolution (group=4)",
        "batched": "weight 'batched' is 3-D; only 2-D weights are split",
    }
    assert _run(model, rank=4, skip="MatMul").info["declined"][0]["reason"] == "in skip"


def test_shared_weight_is_factored_once():
    w = _low_rank(K, K, 5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm2")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [3, K])],
                   [helper.make_tensor_value_info("y", F, [3, K])], {"w": w})
    result = _run(model, rank=5)
    (row,) = result.info["layers"]
    assert row["nodes"] == ["mm1", "mm2"]
    assert sorted(t.name for t in result.model.graph.initializer) == ["w_lowrank_a", "w_lowrank_b"]
    feeds = _feeds(model)
    np.testing.assert_allclose(run_onnx(result.model, feeds)["y"], run_onnx(model, feeds)["y"],
                               atol=1e-3, rtol=1e-4)


def test_weight_also_read_elsewhere_is_declined():
    """A tied weight (also gathered as an embedding) would stay in float: nothing to save."""
    w = _low_rank(K, N, 5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("Gather", ["w", "ids"], ["e"], name="embed")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [3, K]),
                           helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                   [helper.make_tensor_value_info("y", F, [3, N]),
                    helper.make_tensor_value_info("e", F, [2, N])], {"w": w})
    result = _run(model, rank=5)
    assert not result.modified
    assert result.info["declined"][0]["reason"] == "weight 'w' is also read by embed"


def test_torch_style_zero_bias_does_not_keep_the_old_weight():
    """torch writes a bias-free conv's bias as Expand(0, Shape(W)[:1]); after the split neither
    that chain nor W may keep the old weight alive."""
    w = _low_rank(45, N, 4).T.reshape(N, 5, 3, 3).copy()
    nodes = [helper.make_node("Shape", ["w"], ["w_shape"], name="shape", end=1),
             helper.make_node("Expand", ["zero", "w_shape"], ["bias"], name="expand"),
             helper.make_node("Conv", ["x", "w", "bias"], ["y"], name="conv", pads=[1] * 4)]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [1, 5, 6, 6])],
                   [helper.make_tensor_value_info("y", F, [1, N, 6, 6])],
                   {"w": w, "zero": np.zeros((), np.float32)})
    result = _run(model, rank=4)
    assert result.modified
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv"]
    assert sorted(t.name for t in result.model.graph.initializer) == [
        "conv_bias", "w_lowrank_a", "w_lowrank_b"]
    feeds = _feeds(model)
    np.testing.assert_allclose(run_onnx(result.model, feeds)["y"], run_onnx(model, feeds)["y"],
                               atol=1e-4, rtol=0)


def test_weight_computed_from_constants_asks_for_fold_constants():
    nodes = [helper.make_node("Transpose", ["w_t"], ["w"], name="transpose"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [3, K])],
                   [helper.make_tensor_value_info("y", F, [3, N])],
                   {"w_t": _low_rank(K, N, 4).T.copy()})
    result = _run(model, rank=4)
    assert not result.modified
    assert result.info["declined"][0]["reason"] == (
        "weight 'w' is computed from constants: run fold-constants first")


def test_nothing_to_split():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                   [helper.make_tensor_value_info("x", F, [2])],
                   [helper.make_tensor_value_info("y", F, [2])], {})
    result = _run(model)
    assert not result.modified and result.info["layers"] == [] and result.info["declined"] == []


@pytest.mark.parametrize(("options", "message"), [
    ({"rank": 4, "energy": 0.9}, "give one of rank, ratio, energy"),
    ({"ratio": 1.5}, "ratio must be in"), ({"energy": 0.0}, "energy must be in"),
    ({"rank": 0}, "rank must be an integer")])
def test_bad_options(options, message):
    with pytest.raises(UserInputError, match=message):
        SplitLowRank(**options)


def test_default_and_pipeline_text():
    assert SplitLowRank().option() == "energy=0.95"
    model = _layer("gemm", _low_rank(K, N, 3))
    manager = PassManager(parse_pipeline("lowrank(energy=0.99,min_size=16)"))
    out = manager.run(model, PassContext())
    assert manager.records[0].modified and manager.records[0].info["layers"][0]["rank"] == 3
    assert [n.op_type for n in out.graph.node] == ["Gemm", "Gemm"]
