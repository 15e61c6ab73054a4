"""Graph statistics: nodes, parameters, multiply-accumulates and bytes.

MACs are counted for the compute-heavy ops from inferred shapes:
    Conv:          prod(Y.shape) * (C_in / groups) * prod(kernel)
    ConvTranspose: prod(X.shape) * (C_out / groups) * prod(kernel)
    Gemm/MatMul:   prod(Y.shape) * K   (K the reduced dimension)
Other ops count zero; an op whose shapes are unknown (dynamic dims) counts zero and is listed
in ``unknown``. Parameters are the elements of initializers and Constant tensors, whatever
their dtype (an int8 weight counts like a float one: bytes shows the difference).
"""

from __future__ import annotations

import math

import onnx
from onnx import numpy_helper, shape_inference

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _shape_table(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # shape inference is best-effort for statistics
        inferred = model
    table: dict[str, list[int | None]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            table[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in g.initializer:
        table[init.name] = list(init.dims)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    table[node.output[0]] = list(a.t.dims)
    return table


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def node_macs(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> int | None:
    """MACs of one node, 0 for non-MAC ops, None when shapes are unknown."""
    if node.op_type not in MAC_OPS:
        return 0
    x, w = (shapes.get(n) for n in node.input[:2])
    y = shapes.get(node.output[0])
    if not (_known(x) and _known(w) and _known(y)):
        return None
    if node.op_type == "Conv":
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        return math.prod(y) * (x[1] // groups) * math.prod(w[2:])
    if node.op_type == "ConvTranspose":
        return math.prod(x) * w[1] * math.prod(w[2:])
    if node.op_type == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        return math.prod(y) * (x[0] if trans_a else x[-1])
    return math.prod(y) * x[-1]  # MatMul


def graph_stats(model: onnx.ModelProto) -> dict[str, int | list[str]]:
    """Nodes, parameters, MACs and serialized bytes of ``model``."""
    shapes = _shape_table(model)
    macs, unknown = 0, []
    for node in model.graph.node:
        m = node_macs(node, shapes)
        if m is None:
            unknown.append(node.name)
        else:
            macs += m
    params = sum(math.prod(t.dims) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            params += sum(math.prod(a.t.dims) for a in node.attribute if a.name == "value")
    return {
        "nodes": len(model.graph.node),
        "params": int(params),
        "macs": int(macs),
        "bytes": model.ByteSize(),
        "macs_unknown": unknown,
    }


def initializer_arrays(model: onnx.ModelProto) -> dict[str, numpy_helper.np.ndarray]:
    """Name -> numpy array of every initializer."""
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
