"""Order-preserving ops on the int8 tensors between quantized layers.

Dequantize ``d(q) = (q - zp) * s`` with ``s > 0`` is strictly increasing, so ops that only select
or copy values commute with it exactly (no rounding anywhere)::

    max_pool2d(d(q))             = d(max_pool2d(q))           padding never wins a window
    concat(d1(q1), d2(q2), ...)  = d(concat(q1, q2, ...))     when all (s, zp, dtype) are equal
    resize2d_nearest(d(q))       = d(resize2d_nearest(q))
    quantize(d(q), s, zp)        = q                          same s, zp and dtype

and a lookup (ONNX Gather, ``relax.take``) commutes with a dequantize whose parameters are per
tensor or per row along the gathered axis (the ``gather=`` tables of ``qdq`` / ``dynamic-quant``)::

    take(d(T_q, s, zp), idx, axis)  = (take(T_q, idx) - take(zp, idx)) * take(s, idx)

(the gathered scale reshaped to broadcast over the row's other axes; the zero-point term is
omitted when all zero points are 0). The integer difference is exact and the one float32 multiply
is the one DequantizeLinear does, so the gathered rows equal ONNX Runtime's bit for bit; the
library stores the int8 table and the per-row scales, and dequantizes only the rows it reads.

so the pool / concat / resize / lookup run on int8 (a quarter of the memory traffic) and the next
``quantize`` sees ``d(...)`` again, which either cancels (same parameters) or stays a requantize
(different ones; elementwise, fused into a neighbouring kernel). Ops that average (average
pooling, linear resize, Add of two quantized tensors) stay in float on the dequantized values:
exactly what ONNX Runtime's reference computes, with the dequantize only there.

Limits: per-tensor parameters only, except the lookup's per-row ones (per-channel activations
are not produced by ``qdq`` or ``quantize_static``); the rewrite is local (one call at a time,
post order), so it is linear in the size of the function.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecc.lower.int8.anchors import Decision, Int8Log
from edgecc.lower.int8.qparams import Dequantized, dequantized, dtype_of, op_name, shape_of

SELECTING = ("relax.nn.max_pool2d", "relax.image.resize2d")


class _Bindings:
    """The ``var -> value`` view of the bindings a mutator has emitted so far."""

    def __init__(self, builder: Any):
        self.builder = builder

    def __contains__(self, var: Any) -> bool:
        return self.builder.lookup_binding(var) is not None

    def __getitem__(self, var: Any) -> Any:
        return self.builder.lookup_binding(var)


def _same(a: Dequantized, b: Dequantized) -> bool:
    return (
        a.per_tensor
        and b.per_tensor
        and a.dtype == b.dtype
        and np.array_equal(a.scale, b.scale)
        and np.array_equal(a.zero_point, b.zero_point)
    )


def commute_pass(log_to: Int8Log | None = None) -> Any:
    """A module pass applying the rewrites of the module docstring (lookups on int8 tables are
    recorded in ``log_to`` as ``take`` decisions)."""
    import tvm
    from tvm import relax

    record = log_to if log_to is not None else Int8Log()

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: ANN001, ANN202 - TVM's signature
            call = super().visit_call_(call)
            seen = _Bindings(self.builder_)
            name = op_name(call)
            if name in SELECTING and call.args:
                dq = dequantized(call.args[0], seen)
                if dq is None or not dq.per_tensor or not self._selecting(call):
                    return call
                moved = self.builder_.emit(
                    relax.Call(call.op, [dq.q, *call.args[1:]], call.attrs, call.ty_args)
                )
                return self._dequantize(moved, call.args[0], seen)
            if name == "relax.concat" and isinstance(call.args[0], relax.Tuple):
                fields = [dequantized(f, seen) for f in call.args[0].fields]
                if not fields or any(f is None for f in fields):
                    return call
                if not all(_same(fields[0], f) for f in fields):
                    return call
                moved = self.builder_.emit(
                    relax.Call(call.op, [relax.Tuple([f.q for f in fields])], call.attrs)
                )
                return self._dequantize(moved, call.args[0].fields[0], seen)
            if name == "relax.take":
                return self._take(call, seen)
            if name == "relax.quantize":
                dq = dequantized(call.args[0], seen)
                if dq is None or dtype_of(dq.q) != str(call.attrs.out_dtype):
                    return call
                target = _quantize_params(call, seen)
                if target is not None and _same(dq, target):
                    return dq.q
            return call

        @staticmethod
        def _selecting(call: Any) -> bool:
            if op_name(call) == "relax.image.resize2d":
                attrs = call.attrs
                out = str(getattr(attrs, "out_dtype", "") or "")
                return str(attrs.method) == "nearest_neighbor" and out in ("", "void")
            return True

        def _take(self, call: Any, seen: _Bindings) -> Any:
            dq = dequantized(call.args[0], seen)
            if dq is None:
                return call
            shape, idx_shape = shape_of(dq.q), shape_of(call.args[1])
            if not shape or idx_shape is None or call.attrs.axis is None:
                record.decisions.append(Decision("take", False, "dynamic shapes"))
                return call
            axis, mode = int(call.attrs.axis) % len(shape), str(call.attrs.mode)
            if not dq.per_tensor and dq.axis != axis:
                why = f"scales along axis {dq.axis}, rows gathered along axis {axis}"
                record.decisions.append(Decision("take", False, why))
                return call
            idx = call.args[1]
            rows = self.builder_.emit(relax.op.take(dq.q, idx, axis, mode))
            if dq.per_tensor:
                scale, zp = relax.const(dq.scale), relax.const(dq.zero_point)
            else:  # one scale (and zero point) per gathered row, broadcast over its elements
                row_shape = (*idx_shape, *(1,) * (len(shape) - 1 - axis))
                scale, zp = (
                    self.builder_.emit(
                        relax.op.reshape(relax.op.take(relax.const(v), idx, 0, mode), row_shape)
                    )
                    for v in (dq.scale, dq.zero_point)
                )
            centred = rows
            if np.any(dq.zero_point):
                centred = self.builder_.emit(relax.op.subtract(relax.op.astype(rows, "int32"), zp))
            per = "one scale" if dq.per_tensor else "one scale per row"
            detail = f"{dq.dtype} table {list(shape)} stored ({per}), gathered rows dequantized"
            record.decisions.append(Decision("take", True, detail))
            real = self.builder_.emit(relax.op.astype(centred, "float32"))
            return relax.op.multiply(real, scale)

        def _dequantize(self, moved: Any, original: Any, seen: _Bindings) -> Any:
            dq_call = seen[original] if original in seen else original  # noqa: SIM401
            return relax.op.dequantize(
                moved, dq_call.args[1], dq_call.args[2], int(dq_call.attrs.axis), "float32"
            )

    @tvm.transform.module_pass(opt_level=0, name="EdgeccInt8Commute")
    def _pass(mod, _ctx):  # noqa: ANN001, ANN202
        rewriter = _Rewrite(mod)
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gvar] = rewriter.visit_expr(func)
        return relax.transform.DeadCodeElimination()(mod)

    return _pass


def _quantize_params(call: Any, seen: _Bindings) -> Dequantized | None:
    """The parameters of ``quantize(x, s, zp)`` as a :class:`Dequantized` (for comparison)."""
    from edgecc.lower.int8.qparams import constant_value

    s = constant_value(call.args[1], seen)
    z = constant_value(call.args[2], seen)
    if s is None or z is None or s.size != 1 or z.size != 1:
        return None
    dtype = str(call.attrs.out_dtype)
    return Dequantized(call.args[0], s.reshape(()), z.astype(np.int32).reshape(()), 0, dtype)
