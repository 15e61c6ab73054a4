"""sparsify: exact zero counts per layer and globally, declines, and a cosine bound.

Lossy pass: the numerical check is a cosine bound. For Gaussian weights the 20% smallest
magnitudes carry < 0.5% of the energy, so a Gemm's output keeps cosine >= 0.99 at amount 0.2.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.errors import UserInputError
from edgecc.passes.manager import PassContext, clone
from edgecc.passes.sparsify import NOTE, Sparsify
from edgecc.report.compare import cosine, run_onnx

RNG = np.random.default_rng(0)


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray],
           x_shape: list[int], extra_inputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, x_shape if n == "x" else [4, 4])
         for n in ("x", *extra_inputs)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model)  # fills the output's shape


def _net(scale: float = 1.0) -> onnx.ModelProto:
    """Conv -> ConvTranspose -> Flatten -> Gemm -> MatMul, with the Gemm weight scaled."""
    inits = {"cw": RNG.standard_normal((4, 3, 3, 3)), "cb": RNG.standard_normal(4),
             "tw": RNG.standard_normal((4, 2, 2, 2)),
             "gw": RNG.standard_normal((2 * 8 * 8, 10)) * scale,
             "mw": RNG.standard_normal((10, 5))}
    return _model([helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv"),
                   helper.make_node("ConvTranspose", ["c", "tw"], ["t"], name="deconv",
                                    strides=[2, 2]),
                   helper.make_node("Flatten", ["t"], ["f"]),
                   helper.make_node("Gemm", ["f", "gw"], ["g"], name="fc"),
                   helper.make_node("MatMul", ["g", "mw"], ["y"], name="mm")],
                  inits, [1, 3, 6, 6])


def _run(model: onnx.ModelProto, **options: object):
    return Sparsify(**options)(clone(model), PassContext())


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("amount", [0.25, 0.5, 0.9])
def test_per_layer_zeroes_exactly_that_fraction(amount: float) -> None:
    model = _net()
    result = _run(model, amount=amount)
    assert result.modified and result.info["note"] == NOTE
    onnx.checker.check_model(result.model, full_check=True)
    weights = _weights(result.model)
    for name in ("cw", "tw", "gw", "mw"):
        assert (weights[name] == 0).sum() == int(amount * weights[name].size)
        assert result.info["layers"][name] == pytest.approx(int(amount * weights[name].size)
                                                            / weights[name].size)
    np.testing.assert_array_equal(weights["cb"], _weights(model)["cb"])  # biases stay
    kept = weights["gw"] != 0  # the survivors are the largest magnitudes, unchanged
    original = _weights(model)["gw"]
    assert np.abs(original[kept]).min() >= np.abs(original[~kept]).max()
    np.testing.assert_array_equal(weights["gw"][kept], original[kept])
    total = sum(weights[n].size for n in ("cw", "tw", "gw", "mw"))
    zeros = sum(int((weights[n] == 0).sum()) for n in ("cw", "tw", "gw", "mw"))
    assert result.info["achieved_sparsity"] == pytest.approx(zeros / total)
    run_onnx(result.model, {"x": RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)})


def test_global_scope_takes_more_from_small_layers() -> None:
    model = _net(scale=0.01)  # the Gemm's weights are 100x smaller than the others
    result = _run(model, amount=0.5, scope="global")
    weights = _weights(result.model)
    total = sum(weights[n].size for n in ("cw", "tw", "gw", "mw"))
    assert result.info["achieved_sparsity"] == pytest.approx(int(0.5 * total) / total)
    assert result.info["layers"]["gw"] == pytest.approx(int(0.5 * total) / weights["gw"].size)
    assert result.info["layers"]["cw"] == result.info["layers"]["mw"] == 0.0


def test_cosine_bound() -> None:
    model = _model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")],
                   {"w": RNG.standard_normal((64, 32))}, [16, 64])
    feeds = {"x": RNG.standard_normal((16, 64)).astype(np.float32)}
    result = _run(model, amount=0.2)
    (out,), (ref,) = run_onnx(result.model, feeds).values(), run_onnx(model, feeds).values()
    assert cosine(out, ref) >= 0.99


@pytest.mark.parametrize("options", [{"amount": 0.0}, {"skip": ["conv", "deconv", "fc", "mm"]}])
def test_nothing_to_do(options: dict[str, object]) -> None:
    model = _net()
    result = _run(model, **options)
    assert not result.modified
    assert result.model.SerializeToString() == model.SerializeToString()


def test_already_sparse_is_not_modified() -> None:
    once = _run(_net(), amount=0.5).model
    again = _run(once, amount=0.5)
    assert not again.modified and again.info["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_shared_weight_sparsified_once_for_all_readers() -> None:
    model = _model([helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
                    helper.make_node("MatMul", ["a", "w"], ["y"], name="mm2")],
                   {"w": RNG.standard_normal((4, 4))}, [2, 4])
    result = _run(model, amount=0.5)
    assert result.modified and list(result.info["layers"]) == ["w"]
    assert (_weights(result.model)["w"] == 0).sum() == 8


@pytest.mark.parametrize(("case", "reason"), [
    ("also-read-by-add", "also read by add"),
    ("not-constant", "not constant"),
    ("reader-skipped", "also read by mm2"),
])
def test_declines(case: str, reason: str) -> None:
    w = RNG.standard_normal((4, 4))
    if case == "also-read-by-add":
        model = _model([helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
                        helper.make_node("Add", ["a", "w"], ["y"], name="add")], {"w": w}, [4, 4])
    elif case == "not-constant":
        model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {}, [4, 4],
                       extra_inputs=("w",))
    else:
        model = _model([helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
                        helper.make_node("MatMul", ["a", "w"], ["y"], name="mm2")],
                       {"w": w}, [4, 4])
    result = _run(model, amount=0.5, skip=["mm2"] if case == "reader-skipped" else ())
    assert not result.modified
    assert reason in result.info["declined"][0]["reason"]
    assert result.model.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize(("options", "message"), [
    ({"amount": 1.5}, "amount"), ({"amount": -0.1}, "amount"), ({"scope": "net"}, "scope"),
])
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        Sparsify(**options)
