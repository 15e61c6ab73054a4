"""Operator coverage against TVM's ONNX importer, and the import canonicalisation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from lower_models import conv_net, make_model
from onnx import TensorProto, helper, numpy_helper

from edgecc.errors import EXIT_UNSUPPORTED, UnsupportedOperatorError
from edgecc.lower import check_coverage
from edgecc.lower.coverage import canonicalize, convertible_ops

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])


def test_supported_model_passes():
    check_coverage(conv_net())


def test_converter_map_is_read_from_tvm():
    ops = convertible_ops()
    assert {"Conv", "Gemm", "Softmax", "If", "Constant"} <= ops
    assert "LSTM" not in ops  # a real ONNX op the Relax importer lacks (TVM 0.27)


def test_custom_domain_op_is_reported_with_count_and_names():
    nodes = [helper.make_node("FancyOp", ["x"], ["t"], name="fancy1", domain="my.ops"),
             helper.make_node("Relu", ["t"], ["u"], name="relu"),
             helper.make_node("FancyOp", ["u"], ["y"], name="fancy2", domain="my.ops")]
    model = make_model(nodes, [X], [Y], opsets=[("my.ops", 1)])
    with pytest.raises(UnsupportedOperatorError) as info:
        check_coverage(model)
    assert info.value.unsupported == [("my.ops::FancyOp", 2, ["fancy1", "fancy2"])]
    assert info.value.exit_code == EXIT_UNSUPPORTED
    assert "my.ops::FancyOp x2 (e.g. fancy1, fancy2)" in str(info.value)


def test_custom_op_named_like_a_standard_op_is_not_mistaken_for_it():
    """The importer ignores domains: ``my.ops::Relu`` would silently become a standard Relu."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="r", domain="my.ops")],
                       [X], [Y], opsets=[("my.ops", 1)])
    with pytest.raises(UnsupportedOperatorError, match="my.ops::Relu x1"):
        check_coverage(model)


def test_real_op_tvm_lacks():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 20, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, 20, 5)).astype(np.float32), "R")]
    seq = helper.make_tensor_value_info("seq", TensorProto.FLOAT, [3, 1, 4])
    out = helper.make_tensor_value_info("h", TensorProto.FLOAT, [3, 1, 1, 5])
    model = make_model([helper.make_node("LSTM", ["seq", "W", "R"], ["h"], name="lstm",
                                         hidden_size=5)], [seq], [out], inits)
    with pytest.raises(UnsupportedOperatorError) as info:
        check_coverage(model)
    assert info.value.unsupported == [("LSTM", 1, ["lstm"])]


def test_ops_inside_if_branches_are_checked():
    then = helper.make_graph([helper.make_node("FancyOp", ["x"], ["t"], name="inner",
                                               domain="my.ops")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])])
    orelse = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4])])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=orelse)
    model = make_model([node], [cond, X], [Y], opsets=[("my.ops", 1)])
    with pytest.raises(UnsupportedOperatorError, match="my.ops::FancyOp x1 \\(e.g. inner\\)"):
        check_coverage(model)


def _function_model(body_op: str) -> onnx.ModelProto:
    body = [helper.make_node(body_op, ["a"], ["b"], name="body")]
    fn = helper.make_function("local", "Act", ["a"], ["b"], body,
                              [helper.make_opsetid("", 17)])
    call = helper.make_node("Act", ["x"], ["y"], name="call", domain="local")
    return make_model([call], [X], [Y], functions=[fn], opsets=[("local", 1)])


def test_local_function_bodies_are_checked_not_their_calls():
    check_coverage(_function_model("Relu"))
    with pytest.raises(UnsupportedOperatorError, match="LpNormalization x1 \\(e.g. body\\)"):
        check_coverage(_function_model("LpNormalization"))


def test_canonicalize_inlines_functions_and_rewrites_constant_attrs():
    model = _function_model("Relu")
    shape = helper.make_node("Constant", [], ["shape"], name="k", value_ints=[4, 1])
    model.graph.node.append(shape)
    out = canonicalize(model)
    assert not out.functions and [n.op_type for n in out.graph.node] == ["Relu", "Constant"]
    const = out.graph.node[1].attribute[0]
    assert const.name == "value"
    np.testing.assert_array_equal(numpy_helper.to_array(const.t), np.array([4, 1], np.int64))
    assert model.functions and model.graph.node[1].attribute[0].name == "value_ints"  # untouched


def test_sparse_constant_is_unsupported():
    sparse = helper.make_sparse_tensor(helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
                                       helper.make_tensor("i", TensorProto.INT64, [1], [0]), [4])
    node = helper.make_node("Constant", [], ["c"], name="k", sparse_value=sparse)
    add = helper.make_node("Add", ["x", "c"], ["y"], name="add")
    with pytest.raises(UnsupportedOperatorError, match="Constant\\(sparse_value\\) x1"):
        check_coverage(make_model([node, add], [X], [Y]))
