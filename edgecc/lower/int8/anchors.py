"""Integer convolutions and matmuls from QDQ graphs (the static int8 rewrite).

Pattern (as the ONNX importer writes a QDQ Conv / ConvTranspose / Gemm / MatMul)::

    y = op(dequantize(xq, sx, zx), dequantize(Wq, sw, zw)) [+ bias]

with ``xq`` any int8/uint8 tensor (a ``quantize`` of a float tensor, or the int8 output of the
previous rewritten layer: chains stay int8 between kernels), ``sx, zx`` per-tensor constants, and
``Wq`` a constant int8/uint8 weight, per-tensor or per output channel. Rewrite::

    acc  = op_int(xq', W', out_dtype="int32")              int8/uint8 operands, exact int32 sum
    y    = float32(acc + B_c) * S_c                         S_c = float32(sx * sw_c)
    (relu / clip / quantize that followed y are left as they were: elementwise, so FuseOps puts
     them in the same kernel as the conv: the requantize epilogue)

* ``W' = Wq - zw`` stored as an int8 constant (declined when it leaves [-128, 127]).
* Activation zero point: ``sum (x - zx) W' = sum x W' - zx * sum W'``, so
  ``B_c = bias_c / S_c - zx * sum_k W'[c, k]`` (an int32 constant, compensation folded into the
  bias). A padded conv with ``zx != 0`` pads ``xq`` explicitly with ``zx`` (``relax.nn.pad``;
  float zero is ``xq = zx``) and convolves unpadded, so the compensation is the same everywhere.
* The bias is folded into ``B_c`` when ``bias_c / S_c`` is an integer (the int32 QDQ bias the
  ``qdq`` pass and ONNX Runtime's ``quantize_static`` write, scale ``sx * sw_c``); any other bias
  stays a float add after the multiply (still in the same kernel).
* The output ``quantize(y, sy, zy)`` stays the ONNX one: ``saturate(round_half_even(y / sy) +
  zy)``, which TVM legalizes exactly (``round`` is ``nearbyint``, half to even).

Both operands activations (attention's ``Q K^T`` and ``P V``, batched ``[B, H, S, D]``: MatMul
with a per-tensor ``dequantize(quantize(x))`` on each side, neither constant)::

    acc = matmul(aq, bq, out_dtype="int32")                                  [..., M, N]
    acc' = acc - zb * sum_k aq[.., m, k] - za * sum_k bq[.., k, n] + K za zb   (terms with a zero
                                                                             point 0 omitted)
    y   = float32(acc') * float32(sa * sb)

since ``sum_k (a - za)(b - zb) = sum ab - zb sum a - za sum b + K za zb``: the row sums of ``aq``
and the column sums of ``bq`` are two small int32 reductions (their own kernels), the
compensation and scale are elementwise and fuse into the matmul's write-back (with whatever float
epilogue follows: the attention mask add). Exact in int32 while each term stays below 2^31 (``K
<= 8256`` for uint8 x uint8); the output is float, as the ``qdq`` pass leaves MatMul outputs.

Exactness against ONNX Runtime (optimisations off), which dequantizes both operands to float32
and convolves in float32: ``acc`` is the exact integer ``sum (x - zx)(w - zw)`` (|acc| < 2^31:
``K * 255 * 128`` for K < 65793), ``y`` is one float rounding of the exact real value
``S_c * (acc + B_c)`` (two when |acc| >= 2^24). ORT's float sum rounds every product and partial
sum in its own order (and FMA), so the two ``y`` differ by a few float ulps and a quantized output
differs by one step exactly where ``y / sy`` lands within those ulps of a rounding boundary: equal
bit for bit when the float reference is itself exact (power-of-two scales, sums < 2^24), within
one quantization step otherwise, the tests measure both. Float outputs (a Gemm/MatMul without an
output Q) match to float rounding (relative ~1e-6).

Declined, the op left in float with the reason recorded (``Decision``): the activation not read
through a per-tensor ``dequantize`` (a float activation: the weight-only / dynamic path is not
this rewrite's), a non-constant weight, weight scales along a reduced axis, ``W - zw`` outside
int8, ConvTranspose with groups or a nonzero activation zero point (its zero-point term depends
on the output position), a matmul with the weight first or a weight of rank != 2, reductions
long enough to overflow int32, activation x activation matmuls with a 1-D operand or
per-channel scales. Layouts: runs before the channels-last pass, on NCHW/OIHW as
imported; the integer conv then converts to NHWC/HWIO like a float one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecc.lower.int8.qparams import (
    constant_value,
    dequantized,
    int8_weight,
    int32_bias,
    op_name,
    shape_of,
)

log = logging.getLogger(__name__)

ANCHORS = {
    "relax.nn.conv2d": "conv2d",
    "relax.nn.conv2d_transpose": "conv2d_transpose",
    "relax.matmul": "matmul",
}
MAX_REDUCTION = 65792  # K * 255 * 128 < 2^31
# activation x activation: the four terms of the compensation, each <= K * 255 * 255, stay < 2^31
MAX_ACTIVATION_REDUCTION = 8256


@dataclass
class Decision:
    """How one quantized conv/matmul of the Relax module executes.

    Attributes:
        op: ``conv2d``, ``conv2d_transpose``, ``matmul`` (or ``take``: a lookup in an int8
            table, :mod:`.commute`).
        integer: True when rewritten to an integer kernel (``take``: the table stays int8).
        detail: operand types and what was folded (integer) or why it stays float.
        weights: False for a matmul of two activations (attention), True otherwise.
    """

    op: str
    integer: bool
    detail: str
    weights: bool = True


@dataclass
class Int8Log:
    """Decisions of one run of the rewrite, in the order of the module's bindings (the ONNX
    node order the importer keeps)."""

    decisions: list[Decision] = field(default_factory=list)


@dataclass
class _Anchor:
    acc: Any  # the int32 accumulator var (before compensation)
    comp: np.ndarray  # int32 per channel, subtracted from acc
    scale: np.ndarray  # float32 per channel
    channel_shape: tuple[int, ...]  # how a per-channel vector broadcasts against the output
    decision: Decision


def _integer_bias(
    expr: Any, var2val: Any, value: np.ndarray, scale: np.ndarray
) -> np.ndarray | None:
    """``bias / S`` as integers when exact: an int32 QDQ bias whose scale is ``S`` (to 1e-6
    relative: the same float32 product up to how it was rounded), or a float bias that is an
    integer multiple of ``S``; else None (the bias stays a float add)."""
    quantized = int32_bias(expr, var2val)
    if quantized is not None and quantized[0].size == scale.size:
        b, s = quantized
        if np.allclose(s, scale, rtol=1e-6, atol=0):
            return b.astype(np.int64)
    ratio = value.astype(np.float64) / scale
    integer = np.round(ratio)
    if np.abs(ratio - integer).max() > 1e-3 or np.abs(integer).max() >= 2**30:
        return None
    return integer.astype(np.int64)


def activation_plan(call: Any, a: Any, b: Any) -> int | str:
    """The reduction length ``K`` of ``matmul(dequantize(a), dequantize(b))`` with both operands
    activations, or why it stays float."""
    if not (a.per_tensor and b.per_tensor):
        return "per-channel activation scales"
    sa, sb = shape_of(a.q), shape_of(b.q)
    if sa is None or sb is None or shape_of(call) is None:
        return "dynamic shapes"
    if len(sa) < 2 or len(sb) < 2:
        return "a 1-D operand (matrix-vector products are not rewritten)"
    if sa[-1] > MAX_ACTIVATION_REDUCTION:
        return f"reduction of {sa[-1]} terms could overflow int32"
    return sa[-1]


def _uses(func: Any) -> dict[Any, int]:
    """How many times each variable is read in ``func`` (one walk)."""
    from tvm import relax

    counts: dict[Any, int] = {}

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def integer_anchors_pass(log_to: Int8Log | None = None) -> Any:
    """A module pass rewriting quantized conv2d / conv2d_transpose / matmul to integer ops."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def __init__(self, mod: Any, var2val: Any, uses: dict[Any, int], record: Int8Log):
            super().__init__(mod)
            self.var2val = var2val
            self.uses = uses
            self.record = record
            self.anchors: dict[Any, _Anchor] = {}
            self.current: Any = None

        def visit_var_binding_(self, binding):  # noqa: ANN001, ANN202 - TVM's signature
            self.current = binding.var
            super().visit_var_binding_(binding)

        def visit_call_(self, call):  # noqa: ANN001, ANN202
            var = self.current
            name = op_name(call)
            if name in ANCHORS:
                new = self._anchor(call, ANCHORS[name], var)
                if new is not None:
                    return new
            elif name == "relax.add":
                new = self._bias(call)
                if new is not None:
                    return new
            return super().visit_call_(call)

        # -- conv / matmul ------------------------------------------------------------------
        def _anchor(self, call: Any, kind: str, var: Any) -> Any:
            data = dequantized(call.args[0], self.var2val)
            other = dequantized(call.args[1], self.var2val)
            if data is None and other is None:
                return None  # not a quantized op at all
            both = kind == "matmul" and data is not None and other is not None
            if both and constant_value(other.q, self.var2val) is None:  # activation x activation
                plan = activation_plan(call, data, other)
                if isinstance(plan, str):
                    self.record.decisions.append(Decision(kind, False, plan, weights=False))
                    return None
                return self._activation_matmul(data, other, plan)
            plan = self._plan(call, kind, data)
            if isinstance(plan, str):
                self.record.decisions.append(Decision(kind, False, plan))
                return None
            weight, out_axis, channel_shape = plan
            zx = int(data.zero_point.reshape(-1)[0])
            sx = np.float32(data.scale.reshape(-1)[0])
            scale = (sx * weight.scale).astype(np.float32)
            w = weight.values
            reduce_axes = tuple(a for a in range(w.ndim) if a != out_axis)
            sums = w.astype(np.int64).sum(axis=reduce_axes)
            comp = (zx * sums).astype(np.int32)
            xq = self.visit_expr(data.q)
            acc = self.builder_.emit(self._integer_op(call, kind, xq, w, zx))
            detail = (
                f"{data.dtype} x int8 -> int32, "
                f"{'per-channel' if np.unique(weight.scale).size > 1 else 'per-tensor'} weights"
                + (f", activation zero point {zx} folded into the bias" if zx else "")
            )
            decision = Decision(kind, True, detail)
            self.record.decisions.append(decision)
            anchor = _Anchor(acc, comp, scale, channel_shape, decision)
            self.anchors[var] = anchor
            return self._epilogue(anchor, -comp)

        def _activation_matmul(self, a: Any, b: Any, k: int) -> Any:
            """``sum_k (a - za)(b - zb)`` in int32, then one float multiply (module docstring)."""
            za, zb = (int(d.zero_point.reshape(-1)[0]) for d in (a, b))
            aq, bq = self.visit_expr(a.q), self.visit_expr(b.q)
            acc = self.builder_.emit(relax.op.matmul(aq, bq, out_dtype="int32"))
            if zb:  # zb * (row sums of a): [..., M, 1]
                rows = relax.op.sum(relax.op.astype(aq, "int32"), axis=[-1], keepdims=True)
                rows = self.builder_.emit(relax.op.multiply(rows, relax.const(zb, "int32")))
                acc = self.builder_.emit(relax.op.subtract(acc, rows))
            if za:  # za * (column sums of b): [..., 1, N]
                cols = relax.op.sum(relax.op.astype(bq, "int32"), axis=[-2], keepdims=True)
                cols = self.builder_.emit(relax.op.multiply(cols, relax.const(za, "int32")))
                acc = self.builder_.emit(relax.op.subtract(acc, cols))
            if za and zb:
                acc = self.builder_.emit(relax.op.add(acc, relax.const(k * za * zb, "int32")))
            scale = np.float32(a.scale.reshape(-1)[0]) * np.float32(b.scale.reshape(-1)[0])
            points = f", zero points {za}/{zb} compensated by row/column sums" if za or zb else ""
            self.record.decisions.append(
                Decision(
                    "matmul",
                    True,
                    f"{a.dtype} x {b.dtype} -> int32, activation x activation "
                    f"{list(shape_of(a.q))} x {list(shape_of(b.q))}{points}",
                    weights=False,
                )
            )
            real = self.builder_.emit(relax.op.astype(acc, "float32"))
            return relax.op.multiply(real, relax.const(scale, "float32"))

        def _plan(self, call: Any, kind: str, data: Any) -> tuple[Any, int, tuple[int, ...]] | str:
            if data is None:
                return "the activation is float (not read through DequantizeLinear)"
            if not data.per_tensor:
                return "per-channel activation scales"
            out_shape = shape_of(call)
            if out_shape is None:
                return "dynamic shapes"
            if kind == "matmul":
                wshape = shape_of(call.args[1])
                if wshape is None or len(wshape) != 2:
                    return "the weight is not a 2-D constant"
                out_axis = 1
                channel_shape = (wshape[1],)
            else:
                attrs = call.attrs
                layouts = (str(attrs.data_layout), str(attrs.kernel_layout))
                if layouts not in (("NCHW", "OIHW"), ("NCHW", "IOHW")):
                    return f"layout {attrs.data_layout}/{attrs.kernel_layout}"
                out_axis = 0 if kind == "conv2d" else 1
                if kind == "conv2d_transpose":
                    if int(attrs.groups) != 1:
                        return "grouped ConvTranspose"
                    if int(data.zero_point.reshape(-1)[0]) != 0:
                        return "ConvTranspose with a nonzero activation zero point"
                channel_shape = (1, out_shape[1], 1, 1)
            weight = int8_weight(call.args[1], self.var2val, out_axis)
            if isinstance(weight, str):
                return weight
            reduction = weight.values.size // weight.values.shape[out_axis]
            if kind == "conv2d_transpose":
                reduction = weight.values.shape[0] * weight.values[0, 0].size
            if reduction > MAX_REDUCTION:
                return f"reduction of {reduction} terms could overflow int32"
            return weight, out_axis, channel_shape

        def _integer_op(self, call: Any, kind: str, xq: Any, w: np.ndarray, zx: int) -> Any:
            weight = relax.const(w, "int8")
            if kind == "matmul":
                return relax.op.matmul(xq, weight, out_dtype="int32")
            a = call.attrs
            padding = [int(p) for p in a.padding]
            if kind == "conv2d_transpose":
                return relax.op.nn.conv2d_transpose(
                    xq, weight, strides=a.strides, padding=padding,
                    output_padding=a.output_padding, dilation=a.dilation, groups=a.groups,
                    data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                    out_layout=a.out_layout, out_dtype="int32",
                )  # fmt: skip
            if zx != 0 and any(padding):
                top, left, bottom, right = padding
                xq = self.builder_.emit(
                    relax.op.nn.pad(
                        xq, [0, 0, 0, 0, top, bottom, left, right], "constant", float(zx)
                    )
                )
                padding = [0, 0, 0, 0]
            return relax.op.nn.conv2d(
                xq, weight, strides=a.strides, padding=padding, dilation=a.dilation,
                groups=a.groups, data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                out_layout=a.out_layout, out_dtype="int32",
            )  # fmt: skip

        def _epilogue(self, anchor: _Anchor, offset: np.ndarray) -> Any:
            acc = anchor.acc
            if np.any(offset):
                acc = self.builder_.emit(
                    relax.op.add(acc, relax.const(offset.reshape(anchor.channel_shape), "int32"))
                )
            real = self.builder_.emit(relax.op.astype(acc, "float32"))
            return relax.op.multiply(
                real, relax.const(anchor.scale.reshape(anchor.channel_shape), "float32")
            )

        # -- bias ---------------------------------------------------------------------------
        def _bias(self, call: Any) -> Any:
            for mine, other in ((0, 1), (1, 0)):
                var = call.args[mine]
                anchor = self.anchors.get(var)
                if anchor is None or self.uses.get(var, 0) != 1:
                    continue
                value = constant_value(call.args[other], self.var2val)
                channels = anchor.scale.size
                if value is None or value.dtype != np.float32 or value.size not in (1, channels):
                    return None
                if value.ndim > len(anchor.channel_shape):
                    return None
                try:  # one value per channel (or one for all), broadcasting like the output
                    value = np.broadcast_to(value, anchor.channel_shape).reshape(-1)
                except ValueError:
                    return None
                integer = _integer_bias(call.args[other], self.var2val, value, anchor.scale)
                if integer is None:
                    return None
                anchor.decision.detail += ", int32 bias"
                offset = integer - anchor.comp
                if np.abs(offset).max() >= 2**31 - 2**24:  # keep acc + offset inside int32
                    return None
                offset = offset.astype(np.int32)
                return self._epilogue(anchor, offset)
            return None

    @tvm.transform.module_pass(opt_level=0, name="EdgeccInt8Anchors")
    def _pass(mod, _ctx):  # noqa: ANN001, ANN202
        record = log_to if log_to is not None else Int8Log()
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            var2val = relax.analysis.get_var2val(func)
            rewriter = _Rewrite(mod, var2val, _uses(func), record)
            mod[gvar] = rewriter.visit_expr(func)
        integer = sum(d.integer for d in record.decisions)
        log.info(
            "int8: %d of %d quantized ops rewritten to integer kernels",
            integer,
            len(record.decisions),
        )
        return relax.transform.DeadCodeElimination()(mod)

    return _pass
