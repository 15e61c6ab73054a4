"""Shared matching helpers for the integer rewrites: constants and ``relax.dequantize`` operands.

Reusable by any Relax rewrite that needs the quantization parameters of an operand (the static
int8 rewrites of this package, a dynamic-quantization path): everything here reads the *original*
function through a ``var -> bound value`` map, so a matcher looks through dataflow variables
without a pattern language, and every helper is O(size of the matched sub-expression).

* :func:`constant_value` evaluates, in numpy at compile time, the small constant expressions the
  ONNX importer writes around weights and biases (``const``, ``reshape``, ``permute_dims``,
  ``expand_dims``, ``squeeze``, ``astype``, ``dequantize``), or returns None.
* :func:`dequantized` recognises ``dequantize(q, scale, zero_point, axis)`` with constant scale
  and zero point and gives them as numpy arrays (:class:`Dequantized`).
* :func:`int8_weight` recognises a constant integer weight read through ``dequantize`` (possibly
  behind ``permute_dims``, as Gemm's ``transB`` imports) and gives ``W - zp`` as int8 with one
  scale per output channel, or a reason why not.

Dequantize semantics (ONNX ``DequantizeLinear``, TVM's legalization): ``(q - zp) * s`` computed
as ``float32(int32(q) - int32(zp)) * s`` in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

INT_DTYPES = ("int8", "uint8")


def op_name(expr: Any) -> str:
    """The operator name of a Relax call (``relax.nn.conv2d``), else ``""``."""
    op = getattr(expr, "op", None)
    return getattr(op, "name", "") if op is not None else ""


def bound(expr: Any, var2val: Any) -> Any:
    """``expr`` with dataflow variables replaced by their bound values (one level at a time,
    until a non-variable)."""
    from tvm import relax

    seen = 0
    while isinstance(expr, relax.Var) and expr in var2val and seen < 64:
        expr = var2val[expr]
        seen += 1
    return expr


def dtype_of(expr: Any) -> str:
    """The dtype of a tensor-typed Relax expression (``""`` when unknown)."""
    sinfo = getattr(expr, "ty", None)
    return str(getattr(sinfo, "dtype", "")) if sinfo is not None else ""


def shape_of(expr: Any) -> tuple[int, ...] | None:
    """The static shape of a tensor-typed Relax expression, None when not static."""
    sinfo = getattr(expr, "ty", None)
    shape = getattr(sinfo, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return tuple(int(v) for v in shape.values)
    except (TypeError, ValueError):
        return None


def _dequantize_np(q: np.ndarray, s: np.ndarray, z: np.ndarray, axis: int) -> np.ndarray:
    centred = q.astype(np.int32) - _along(z, axis, q.ndim).astype(np.int32)
    return centred.astype(np.float32) * _along(s, axis, q.ndim).astype(np.float32)


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A scalar or 1-D per-axis parameter shaped to broadcast along ``axis`` of an ndim array."""
    if v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = v.size
    return v.reshape(shape)


def constant_value(expr: Any, var2val: Any, depth: int = 0) -> np.ndarray | None:
    """The numpy value of a compile-time constant expression, None when it is not one."""
    import tvm
    from tvm import relax

    expr = bound(expr, var2val)
    if isinstance(expr, tvm.ir.expr.Constant):
        value = expr.value
        return value.numpy() if hasattr(value, "numpy") else None
    if not isinstance(expr, relax.Call) or depth > 16:
        return None
    name = op_name(expr)
    args = [constant_value(a, var2val, depth + 1) for a in expr.args[:1]]
    if args[0] is None:
        return None
    x = args[0]
    if name == "relax.reshape":
        shape = shape_of(expr)
        return None if shape is None else x.reshape(shape)
    if name == "relax.permute_dims":
        axes = expr.attrs.axes
        return np.transpose(x, None if axes is None else [int(a) for a in axes])
    if name in ("relax.expand_dims", "relax.squeeze"):
        shape = shape_of(expr)
        return None if shape is None else x.reshape(shape)
    if name == "relax.astype":
        return x.astype(str(expr.attrs.dtype))
    if name == "relax.dequantize":
        s = constant_value(expr.args[1], var2val, depth + 1)
        z = constant_value(expr.args[2], var2val, depth + 1)
        if s is None or z is None:
            return None
        return _dequantize_np(x, s, z, int(expr.attrs.axis))
    return None


@dataclass
class Dequantized:
    """A ``dequantize(q, scale, zero_point)`` operand.

    Attributes:
        q: the integer operand (a Relax expression of the original function).
        scale: float32 scale, shape ``()`` (per tensor) or ``(C,)`` (per channel along ``axis``).
        zero_point: zero point, same shape as ``scale`` (int32 values).
        axis: the channel axis of per-channel parameters (normalised to >= 0).
        dtype: the dtype of ``q`` (``int8`` / ``uint8``).
    """

    q: Any
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    dtype: str

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1 and self.zero_point.size == 1


def dequantized(expr: Any, var2val: Any) -> Dequantized | None:
    """``expr`` as a :class:`Dequantized` when it is a float32 ``dequantize`` of an int8/uint8
    operand with constant parameters; None otherwise."""
    call = bound(expr, var2val)
    if op_name(call) != "relax.dequantize" or len(call.args) != 3:
        return None
    if str(call.attrs.out_dtype) != "float32":
        return None
    q = call.args[0]
    dtype = dtype_of(q)
    if dtype not in INT_DTYPES:
        return None
    s = constant_value(call.args[1], var2val)
    z = constant_value(call.args[2], var2val)
    if s is None or z is None or s.dtype != np.float32 or s.ndim > 1 or z.ndim > 1:
        return None
    rank = len(shape_of(q) or ()) or 1
    axis = int(call.attrs.axis) % rank
    z = np.broadcast_to(z.astype(np.int32).reshape(-1), s.reshape(-1).shape).copy()
    return Dequantized(
        q, s.reshape(-1) if s.size > 1 else s.reshape(()), z.reshape(s.shape), axis, dtype
    )


@dataclass
class Int8Weight:
    """A constant weight as stored for an integer kernel.

    Attributes:
        values: ``W - zp`` as int8, in the layout the float op read (after any transpose).
        scale: float32 scale per output channel, shape ``(C,)``.
    """

    values: np.ndarray
    scale: np.ndarray


def int8_weight(expr: Any, var2val: Any, out_axis: int) -> Int8Weight | str:
    """A constant int8/uint8 weight read through ``dequantize`` (optionally transposed).

    Args:
        expr: the float weight operand of the conv/matmul.
        var2val: bindings of the original function.
        out_axis: the output-channel axis of the weight as the op reads it (OIHW: 0, IOHW: 1,
            matmul ``[K, N]``: 1).

    Returns:
        The weight, or a one-line reason why it cannot be an integer operand.
    """
    call = bound(expr, var2val)
    perm: list[int] | None = None
    if op_name(call) == "relax.permute_dims":
        axes = call.attrs.axes
        rank = len(shape_of(call) or ())
        perm = list(range(rank))[::-1] if axes is None else [int(a) for a in axes]
        call = bound(call.args[0], var2val)
    dq = dequantized(call, var2val)
    if dq is None:
        return "the weight is not read through DequantizeLinear"
    q = constant_value(dq.q, var2val)
    if q is None:
        return "the quantized weight is not a constant"
    centred = q.astype(np.int32) - _along(dq.zero_point, dq.axis, q.ndim)
    if centred.min() < -128 or centred.max() > 127:
        return "weight minus its zero point leaves the int8 range"
    scale_axis = dq.axis
    if perm is not None:
        centred = np.transpose(centred, perm)
        scale_axis = perm.index(dq.axis)
    channels = centred.shape[out_axis]
    if dq.scale.size == 1:
        scale = np.full(channels, dq.scale.reshape(()), np.float32)
    elif scale_axis == out_axis and dq.scale.size == channels:
        scale = dq.scale.astype(np.float32)
    else:
        return "weight scales vary along an axis other than the output channels"
    return Int8Weight(np.ascontiguousarray(centred.astype(np.int8)), scale)


def int32_bias(expr: Any, var2val: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """``(b, scale)`` (flat, one per channel) when ``expr`` is ``dequantize`` of an int32
    constant with zero point 0 (the QDQ bias convention), behind any reshapes; else None."""
    call = bound(expr, var2val)
    while op_name(call) in ("relax.reshape", "relax.expand_dims"):
        call = bound(call.args[0], var2val)
    if op_name(call) != "relax.dequantize" or dtype_of(call.args[0]) != "int32":
        return None
    b = constant_value(call.args[0], var2val)
    s = constant_value(call.args[1], var2val)
    z = constant_value(call.args[2], var2val)
    if b is None or s is None or z is None or np.any(z != 0) or b.ndim > 1:
        return None
    return b.reshape(-1), np.broadcast_to(s.reshape(-1), b.reshape(-1).shape)
