"""Channel dependency analysis: which channel spaces are coupled, atoms, and what locks a group."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.passes.channel_groups import ChannelAnalysis, ChannelGroup, analyse

RNG = np.random.default_rng(0)


def conv(name: str, x: str, y: str, cin: int, cout: int, k: int = 1, group: int = 1,
         inits: dict[str, np.ndarray] | None = None) -> onnx.NodeProto:
    """A Conv named ``name`` with random weight ``name.w`` and bias ``name.b`` put in ``inits``."""
    inits[f"{name}.w"] = RNG.standard_normal((cout, cin // group, k, k)).astype(np.float32)
    inits[f"{name}.b"] = RNG.standard_normal(cout).astype(np.float32)
    return helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name, group=group,
                            pads=[k // 2] * 4)


def tensor(name: str, shape: list[int] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def onnx_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
               outputs: list[onnx.ValueInfoProto], inits: dict[str, np.ndarray]
               ) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def group_of(analysis: ChannelAnalysis, tensor_name: str) -> ChannelGroup:
    return analysis.groups[analysis.group_of[tensor_name]]


def model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], cin: int = 3,
          out: tuple[str, list[int]] = ("y", [1, 4, 4, 4])) -> onnx.ModelProto:
    return onnx_model(nodes, [tensor("x", [1, cin, 4, 4])], [tensor(out[0], out[1])], inits)


def test_residual_add_couples_producers() -> None:
    inits: dict[str, np.ndarray] = {}
    m = model([conv("a", "x", "a", 3, 8, 3, inits=inits),
               helper.make_node("Relu", ["a"], ["ra"]),
               conv("b", "ra", "b", 8, 8, 3, inits=inits),
               helper.make_node("Add", ["b", "ra"], ["s"]),
               conv("c", "s", "y", 8, 4, inits=inits)], inits)
    analysis = analyse(m)
    residual = group_of(analysis, "s")
    assert set(residual.spaces) == {"a", "ra", "b", "s"}
    assert residual.sources == ["a", "b"] and residual.prunable
    assert residual.n_atoms == 8
    for name in residual.spaces:  # channel i of every member is atom i
        np.testing.assert_array_equal(residual.atoms[name], np.arange(8))
    out = group_of(analysis, "y")
    assert not out.prunable and "'y' is a graph output" in out.reasons
    roles = {(analysis.node_names[s.node], s.input, s.role) for s in analysis.slices
             if s.space == "s" or s.space == "ra"}
    assert ("c", 1, "weight_in") in roles and ("b", 1, "weight_in") in roles


def test_concat_maps_inputs_to_slices() -> None:
    inits: dict[str, np.ndarray] = {}
    inits["k"] = RNG.standard_normal((1, 2, 1, 1)).astype(np.float32)
    m = model([conv("a", "x", "a", 3, 4, inits=inits),
               conv("b", "x", "b", 3, 6, inits=inits),
               helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
               helper.make_node("Mul", ["cat", "k2"], ["scaled"]),
               helper.make_node("Concat", ["scaled", "kc"], ["cat2"], axis=1),
               conv("c", "cat2", "y", 12, 4, inits=inits)],
              {**inits, "k2": RNG.standard_normal((1, 10, 1, 1)).astype(np.float32),
               "kc": np.ones((1, 2, 4, 4), np.float32)})
    analysis = analyse(m)
    g = group_of(analysis, "cat")
    assert g.sources == ["a", "b"] and g.prunable and g.n_atoms == 12
    np.testing.assert_array_equal(g.atoms["cat"][:4], g.atoms["a"])
    np.testing.assert_array_equal(g.atoms["cat"][4:], g.atoms["b"])
    np.testing.assert_array_equal(g.atoms["cat2"][:10], g.atoms["cat"])
    assert len(set(g.atoms["a"]) | set(g.atoms["b"])) == 10
    consts = {(analysis.node_names[s.node], s.input): (s.axis, s.start, s.stop)
              for s in analysis.slices if s.role == "param"}
    assert consts[("Mul#3", 1)] == (1, 0, None)  # the scale follows cat's channels
    assert consts[("Concat#4", 1)] == (1, 10, 12)  # the constant is cat2's channels 10..11


@pytest.mark.parametrize(("groups", "atoms"), [(8, 8), (2, 2)], ids=["depthwise", "groups2"])
def test_grouped_conv_couples_input_and_output(groups: int, atoms: int) -> None:
    inits: dict[str, np.ndarray] = {}
    m = model([conv("a", "x", "a", 3, 8, inits=inits),
               helper.make_node("Relu", ["a"], ["r"]),
               conv("dw", "r", "d", 8, 8, 3, group=groups, inits=inits),
               conv("c", "d", "y", 8, 4, inits=inits)], inits)
    analysis = analyse(m)
    g = group_of(analysis, "a")
    assert g.sources == ["a", "dw"] and {"a", "r", "d"} <= set(g.spaces)
    assert g.n_atoms == atoms  # grouped convs lose whole groups
    np.testing.assert_array_equal(g.atoms["a"], np.repeat(np.arange(atoms), 8 // atoms))
    assert [u.per_group for u in analysis.group_updates] == [8 // groups]


@pytest.mark.parametrize("op", ["Flatten", "Reshape"])
def test_flatten_maps_channel_to_feature_block(op: str) -> None:
    inits: dict[str, np.ndarray] = {"fc.w": RNG.standard_normal((64, 5)).astype(np.float32),
                                    "shape": np.array([1, 64], np.int64)}
    flat = helper.make_node(op, ["a", "shape"] if op == "Reshape" else ["a"], ["f"])
    m = model([conv("a", "x", "a", 3, 4, inits=inits), flat,
               helper.make_node("Gemm", ["f", "fc.w"], ["y"], name="fc")],
              inits, out=("y", [1, 5]))
    analysis = analyse(m)
    g = group_of(analysis, "a")
    assert g.prunable and g.spaces == ["a", "f"] and g.n_atoms == 4
    np.testing.assert_array_equal(g.atoms["f"], np.repeat(np.arange(4), 16))
    assert any(s.role == "weight_in" and s.space == "f" and s.axis == 0 for s in analysis.slices)
    assert [si.value for si in analysis.shape_inputs] == ([(1, -1)] if op == "Reshape" else [])


def test_matmul_hidden_dim_of_3d_mlp() -> None:
    inits = {"w1": RNG.standard_normal((8, 16)).astype(np.float32),
             "b1": RNG.standard_normal(16).astype(np.float32),
             "w2": RNG.standard_normal((16, 8)).astype(np.float32)}
    m = onnx_model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
                    helper.make_node("Add", ["h", "b1"], ["hb"]),
                    helper.make_node("Relu", ["hb"], ["r"]),
                    helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
                   [tensor("x", [2, 5, 8])], [tensor("y", [2, 5, 8])], inits)
    g = group_of(analyse(m), "h")
    assert g.prunable and g.sources == ["fc1"] and g.n_atoms == 16
    assert analyse(m).spaces["h"].axis == 2


@pytest.mark.parametrize(("tail", "reason"), [
    (helper.make_node("LRN", ["a"], ["y"], size=3), "no channel rule for op LRN"),
    (helper.make_node("Softmax", ["a"], ["y"], axis=1), "normalises over the channel axis"),
    (helper.make_node("Shape", ["a"], ["y"]), "reads the channel count"),
    (helper.make_node("Add", ["a", "x"], ["y"]), "'x' is a graph input"),
], ids=["unsupported-op", "softmax-over-channels", "shape", "graph-input"])
def test_locks(tail: onnx.NodeProto, reason: str) -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [conv("a", "x", "a", 3, 3, inits=inits), tail]
    if tail.op_type != "Shape":
        nodes.append(helper.make_node("Relu", ["y"], ["out"]))
    m = onnx_model(nodes, [tensor("x", [1, 3, 4, 4])],
                   [tensor("y" if tail.op_type == "Shape" else "out", None)], inits)
    g = group_of(analyse(m), "a")
    assert not g.prunable and any(reason in r for r in g.reasons), g.reasons


def test_analysis_is_cached_until_the_graph_changes() -> None:
    inits: dict[str, np.ndarray] = {}
    m = model([conv("a", "x", "a", 3, 8, inits=inits),
               conv("c", "a", "y", 8, 4, inits=inits)], inits)
    first = analyse(m)
    assert analyse(m) is first
    m.graph.node[0].attribute.append(helper.make_attribute("strides", [1, 1]))
    assert analyse(m) is not first
