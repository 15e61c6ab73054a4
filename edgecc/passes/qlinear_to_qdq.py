"""``qlinear-to-qdq``: QLinearConv / QLinearMatMul / ConvInteger / MatMulInteger -> QDQ form.

Files from other tools (ONNX Runtime's ``quantize_static`` in QOperator format, older
converters) hold fused integer operators that TVM's ONNX importer does not convert. Each is
rewritten into the equivalent QDQ group, which ``edgecc.lower.int8`` turns back into an integer
kernel::

    QLinearConv(x, sx, zx, w, sw, zw, sy, zy, B)
        -> Q(Conv(DQ(x, sx, zx), DQ(w, sw, zw, axis=0), DQ(B, sx * sw, 0, axis=0)), sy, zy)
    QLinearMatMul(a, sa, za, b, sb, zb, sy, zy)
        -> Q(MatMul(DQ(a, sa, za), DQ(b, sb, zb, axis=1)), sy, zy)
    ConvInteger(x, w, zx, zw)      -> Cast<int32>(Conv(DQ(x, 1, zx), DQ(w, 1, zw, axis=0)))
    MatMulInteger(a, b, za, zb)    -> Cast<int32>(MatMul(DQ(a, 1, za), DQ(b, 1, zb, axis=1)))

(per-tensor parameters keep no axis). Exactness: the QLinear ops are defined by exactly this
dequantize -> float op -> quantize composition (``y = saturate(round(real / sy) + zy)``); ONNX
Runtime computes them with an integer accumulator and one float multiplier ``sx * sw / sy``, so
the two agree except where the real value lies within float rounding of a rounding boundary (one
step). For the Integer ops, scale 1 makes every dequantized value an exact integer; the float
sum is exact while it stays below 2^24 in magnitude, and the int8 lowering computes it in int32
anyway (exact always).

Declined (``info["declined"]``): a QLinearConv bias whose scale ``sx * sw`` cannot be computed
at compile time (non-constant scales); per-row zero points of ``MatMulInteger``'s ``a`` (ONNX
allows a 1-D ``a_zero_point`` per row of ``a``: it is not a per-tensor DQ); per-channel
parameters in a model below opset 13 (no per-axis DequantizeLinear there; raising the opset
would change the meaning of other operators).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecc.passes.manager import PassContext, PassResult, register

log = logging.getLogger(__name__)

OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")


class _Declined(Exception):
    """A node that cannot be rewritten (the message says why)."""


class _Builder:
    """New nodes and initializers with names unique in the model."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.taken = {t.name for t in model.graph.initializer} | {
            o for n in model.graph.node for o in n.output
        }
        self.taken |= {i.name for i in model.graph.input}
        self.opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 1)

    def name(self, base: str) -> str:
        k, out = 0, base
        while out in self.taken:
            k += 1
            out = f"{base}_{k}"
        self.taken.add(out)
        return out

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        tensor = numpy_helper.from_array(np.asarray(value), name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def value(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def node(self, op: str, inputs: list[str], outputs: list[str] | None, base: str, **kw) -> str:
        out = outputs[0] if outputs else self.name(f"{base}_{op.lower()}")
        self.new.append(helper.make_node(op, inputs, [out], name=self.name(f"{base}/{op}"), **kw))
        return out

    new: list[onnx.NodeProto]


def _dq(b: _Builder, x: str, scale: str, zp: str, base: str, axis: int | None) -> str:
    """DequantizeLinear, with ``axis`` only when the scale (or zero point) is 1-D."""
    inputs = [x, scale] + ([zp] if zp else [])
    per_axis = any(b.value(n) is not None and b.value(n).ndim == 1 for n in inputs[1:])
    if per_axis and b.opset < 13:
        raise _Declined("per-channel parameters need opset >= 13 (per-axis DequantizeLinear)")
    kwargs = {"axis": axis} if per_axis and axis is not None else {}
    return b.node("DequantizeLinear", inputs, None, base, **kwargs)


def _ones_like(b: _Builder, zp: str, base: str) -> str:
    """A float32 scale of 1 shaped like zero point ``zp`` (scalar when absent or constant-less)."""
    value = b.value(zp) if zp else None
    shape = () if value is None else value.shape
    return b.const(f"{base}_one", np.ones(shape, np.float32))


def _inputs(node: onnx.NodeProto, count: int) -> list[str]:
    return list(node.input) + [""] * (count - len(node.input))


def _conv_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _rewrite(b: _Builder, node: onnx.NodeProto) -> str | None:
    """Append the QDQ form of ``node`` to ``b.new``; None, or a reason when declined."""
    base = node.name or node.output[0]
    y = node.output[0]
    if node.op_type == "QLinearConv":
        x, sx, zx, w, sw, zw, sy, zy, bias = _inputs(node, 9)
        inputs = [_dq(b, x, sx, zx, base, 1), _dq(b, w, sw, zw, base, 0)]
        if bias:
            s_x, s_w = b.value(sx), b.value(sw)
            if s_x is None or s_w is None:
                return "the bias scale x_scale * w_scale is not constant"
            scale = b.const(f"{base}_bias_scale", (s_x.astype(np.float32) * s_w).astype(np.float32))
            inputs.append(_dq(b, bias, scale, "", base, 0))
        conv = b.node("Conv", inputs, None, base, **_conv_attrs(node))
        b.node("QuantizeLinear", [conv, sy] + ([zy] if zy else []), [y], base)
        return None
    if node.op_type == "QLinearMatMul":
        a, sa, za, w, sw, zw, sy, zy = _inputs(node, 8)
        mm = b.node("MatMul", [_dq(b, a, sa, za, base, 1), _dq(b, w, sw, zw, base, 1)], None, base)
        b.node("QuantizeLinear", [mm, sy] + ([zy] if zy else []), [y], base)
        return None
    a, w, za, zw = _inputs(node, 4)
    za_value = b.value(za) if za else None
    if node.op_type == "MatMulInteger" and za and (za_value is None or za_value.size != 1):
        return "a_zero_point is per row (or not constant)"
    da = _dq(b, a, _ones_like(b, za, base), za, base, 1)
    dw = _dq(b, w, _ones_like(b, zw, base), zw, base, 0 if node.op_type == "ConvInteger" else 1)
    op = "Conv" if node.op_type == "ConvInteger" else "MatMul"
    kwargs = _conv_attrs(node) if op == "Conv" else {}
    out = b.node(op, [da, dw], None, base, **kwargs)
    b.node("Cast", [out], [y], base, to=TensorProto.INT32)
    return None


@register("qlinear-to-qdq")
class QLinearToQDQ:
    """Rewrite QLinearConv/QLinearMatMul/ConvInteger/MatMulInteger into QDQ groups."""

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        if not any(n.op_type in OPS and n.domain in ("", "ai.onnx") for n in model.graph.node):
            return PassResult(model, False, {}, reason="no QLinear/Integer operator")
        b = _Builder(model)
        nodes: list[onnx.NodeProto] = []
        ops: Counter[str] = Counter()
        declined: list[dict[str, str]] = []
        for node in model.graph.node:
            if node.op_type not in OPS or node.domain not in ("", "ai.onnx"):
                nodes.append(node)
                continue
            b.new = []
            try:
                reason = _rewrite(b, node)
            except _Declined as err:
                reason = str(err)
            if reason:
                declined.append({"node": node.name, "op": node.op_type, "reason": reason})
                nodes.append(node)
                continue
            nodes.extend(b.new)
            ops[node.op_type] += 1
        info = {"rewritten": dict(ops), "declined": declined}
        if not ops:
            return PassResult(model, False, info, reason=f"{len(declined)} nodes declined")
        copies = []
        for node in nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copies.append(copy)
        del model.graph.node[:]
        model.graph.node.extend(copies)
        log.info("qlinear-to-qdq: %s", ", ".join(f"{v} {k}" for k, v in ops.items()))
        return PassResult(model, True, info)
