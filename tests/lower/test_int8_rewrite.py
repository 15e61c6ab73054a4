"""The int8 Relax rewrite on its own (no build): what it produces and what it declines."""

from __future__ import annotations

import numpy as np
import pytest

from tests.lower.int8_graphs import QdqGraph, input_shapes


def rewritten(model):
    import tvm

    from edgecc.lower.build import import_relax
    from edgecc.lower.int8 import Int8Log, integer_lowering_passes

    shapes = input_shapes(model)
    mod = import_relax(model, shapes, dict.fromkeys(shapes, "float32"), lambda _: None)
    record = Int8Log()
    mod = tvm.transform.Sequential(integer_lowering_passes(record))(mod)
    return mod, record


def calls(mod) -> list[tuple[str, str]]:
    """(op name, output dtype) of every call in main, in order."""
    from tvm import relax

    out = []

    def visit(expr):
        if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
            out.append((expr.op.name, str(getattr(expr.ty, "dtype", ""))))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return out


def constants(mod) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    found = []

    def visit(expr):
        if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr.value, "numpy"):
            found.append(expr.value.numpy())

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def test_conv_becomes_int32_conv_with_int8_weights():
    g = QdqGraph(exact=False)
    x = g.input([1, 4, 6, 6])
    xq, (s, _, _) = g.qdq(x, "uint8", 9)
    w, sw = g.weight([8, 4, 3, 3], 0)
    g.output_q(g.node("Conv", [xq, w, g.bias(s, sw)], pads=[1, 1, 1, 1]))
    mod, record = rewritten(g.model())
    assert [d.integer for d in record.decisions] == [True]
    assert "int32 bias" in record.decisions[0].detail
    ops = calls(mod)
    assert ("relax.nn.conv2d", "int32") in ops
    assert ("relax.nn.pad", "uint8") in ops  # zero point 9 padded explicitly
    assert not any(name == "relax.dequantize" and i < ops.index(("relax.nn.conv2d", "int32"))
                   for i, (name, _) in enumerate(ops))  # fmt: skip
    weights = [c for c in constants(mod) if c.shape == (8, 4, 3, 3)]
    assert len(weights) == 1 and weights[0].dtype == np.int8
    assert not [c for c in constants(mod) if c.dtype == np.float32 and c.size == 8 * 4 * 9]


def test_weight_only_matmul_is_left_to_the_float_path():
    """DQ(weight) -> MatMul with a float activation (dynamic-quant) is not this rewrite's."""
    g = QdqGraph(exact=False)
    v = g.input([2, 16])
    w, _ = g.weight([16, 4], 1)
    g.output_float(g.node("MatMul", [v, w]))
    mod, record = rewritten(g.model())
    assert [(d.integer, d.detail) for d in record.decisions] == [
        (False, "the activation is float (not read through DequantizeLinear)")
    ]
    assert ("relax.matmul", "float32") in calls(mod)


@pytest.mark.parametrize("zp", [200, 0])
def test_uint8_weight_zero_point(zp):
    """uint8 weights with zero point 128 centre into int8 exactly; 200 would not fit: declined."""
    g = QdqGraph(exact=False)
    v = g.input([2, 16])
    vq, _ = g.qdq(v, "int8", 0)
    g.rng = np.random.default_rng(5)
    w, _ = g.weight([16, 4], None, "uint8", 128 if zp == 0 else zp)
    g.output_float(g.node("MatMul", [vq, w]))
    _, record = rewritten(g.model())
    (decision,) = record.decisions
    if zp == 0:
        assert decision.integer
    else:
        assert not decision.integer and "int8 range" in decision.detail


def test_equal_params_quantize_of_dequantize_cancels_and_pool_runs_on_int8():
    g = QdqGraph(exact=False)
    x = g.input([1, 4, 6, 6])
    xq, (s, zp, dtype) = g.qdq(x, "uint8", 3)
    pooled = g.node("MaxPool", [xq], kernel_shape=[2, 2], strides=[2, 2])
    again, _ = g.qdq(pooled, "uint8", 3, s)  # same parameters: Q(DQ(q)) = q
    w, _ = g.weight([4, 4, 1, 1], 0)
    g.output_q(g.node("Conv", [again, w]))
    mod, record = rewritten(g.model())
    ops = calls(mod)
    assert ("relax.nn.max_pool2d", "uint8") in ops
    assert [name for name, _ in ops].count("relax.quantize") == 2  # input and output only
    assert [d.integer for d in record.decisions] == [True]
