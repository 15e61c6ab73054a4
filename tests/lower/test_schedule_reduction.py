"""The elementwise and reduction schedule rules: correct on odd sizes, and actually applied.

Each graph is lowered for x86 and compared with ONNX Runtime (optimisations off). Tolerance:
float32 reductions reorder sums when parallelised or unrolled, so atol 1e-5 on O(1) values
(rtol 1e-5 for sums of up to ~10^5 terms).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from lower_models import feeds_for, make_model, shapes_of
from onnx import TensorProto, helper

from edgecc.lower import lower
from edgecc.lower.schedules import CpuParams, rules_for
from edgecc.report.compare import run_onnx
from edgecc.runtime import run_library
from edgecc.targets import get_target


def _graph(
    op: str, shape: list[int], out_shape: list[int], out_type: int = TensorProto.FLOAT, **attrs
) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", out_type, out_shape)
    return make_model([helper.make_node(op, ["x"], ["y"], name="op", **attrs)], [x], [y])


def _layer_norm(shape: list[int]) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    scale = onnx.numpy_helper.from_array(rng.standard_normal(shape[-1]).astype(np.float32), "s")
    bias = onnx.numpy_helper.from_array(rng.standard_normal(shape[-1]).astype(np.float32), "b")
    node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln", axis=-1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    return make_model([node], [x], [y], [scale, bias])


def _chain(shape: list[int]) -> onnx.ModelProto:
    """Sigmoid(x) * x + 1, then a transpose: one fused injective kernel plus a layout move."""
    one = onnx.numpy_helper.from_array(np.ones([1], np.float32), "one")
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"]),
        helper.make_node("Mul", ["s", "x"], ["m"]),
        helper.make_node("Add", ["m", "one"], ["a"]),
        helper.make_node("Transpose", ["a"], ["y"], perm=list(reversed(range(len(shape))))),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(reversed(shape)))
    return make_model(nodes, [x], [y], [one])


CASES = {
    "softmax-1000": (_graph("Softmax", [3, 1000], [3, 1000], axis=-1), "reduction"),
    "softmax-rows": (_graph("Softmax", [4, 128, 128], [4, 128, 128], axis=-1), "row-reduction"),
    "softmax-17": (_graph("Softmax", [1, 3, 17, 17], [1, 3, 17, 17], axis=-1), "reduction"),
    "layernorm-384": (_layer_norm([1, 128, 384]), "row-reduction"),
    "layernorm-odd": (_layer_norm([3, 17, 1000]), "row-reduction"),
    "reduce-mean-lead": (
        _graph("ReduceMean", [257, 64, 65], [1, 64, 65], axes=[0], keepdims=1),
        "row-reduction",
    ),
    "reduce-max-inner": (
        _graph("ReduceMax", [64, 33, 1001], [64, 33, 1], axes=[-1], keepdims=1),
        "reduction",
    ),
    "argmax": (
        _graph("ArgMax", [1, 1000, 1003], [1, 1003], TensorProto.INT64, axis=1, keepdims=0),
        "row-reduction",
    ),
    "chain-odd": (_chain([3, 17, 1001]), "elementwise"),
    "chain-small": (_chain([1, 3]), "elementwise"),
    "relu-big": (_graph("Relu", [2, 64, 56, 56], [2, 64, 56, 56]), "elementwise"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_matches_onnxruntime(case: str, tmp_path) -> None:
    model, rule = CASES[case]
    shapes, dtypes = shapes_of(model)
    lib = lower(model, get_target("x86"), shapes, dtypes, tmp_path / "m.so")
    kernels = lib.details["schedules"]["kernels"]
    assert kernels, "no kernel recorded"
    used = {r or "none" for r in kernels.values()}
    assert rule in used, kernels
    feeds = feeds_for(model)
    got = run_library(lib.path, get_target("x86"), feeds, ["y"])["y"]
    ref = run_onnx(model, feeds)["y"]
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if ref.dtype == np.int64:
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_aarch64_kernels_are_scheduled_too(tmp_path) -> None:
    """The same rules serve NEON targets (4 lanes): the library cross-compiles."""
    model = _layer_norm([1, 128, 384])
    shapes, dtypes = shapes_of(model)
    lib = lower(model, get_target("rpi4"), shapes, dtypes, tmp_path / "m.so")
    assert "row-reduction" in lib.details["schedules"]["kernels"].values()


def test_rules_are_off_on_request(monkeypatch) -> None:
    params = CpuParams.of(get_target("x86"))
    assert {r.name for r in rules_for(params)} >= {"elementwise", "reduction", "row-reduction"}
    monkeypatch.setenv("EDGECC_SCHEDULES", "off")
    assert rules_for(params) == []
