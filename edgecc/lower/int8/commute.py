"""Order-preserving ops on the int8 tensors between quantized layers.

Dequantize ``d(q) = (q - zp) * s`` with ``s > 0`` is strictly increasing, so ops that only select
or copy values commute with it exactly (no rounding anywhere)::

    max_pool2d(d(q))             = d(max_pool2d(q))           padding never wins a window
    concat(d1(q1), d2(q2), ...)  = d(concat(q1, q2, ...))     when all (s, zp, dtype) are equal
    resize2d_nearest(d(q))       = d(resize2d_nearest(q))
    quantize(d(q), s, zp)        = q                          same s, zp and dtype

so the pool / concat / resize run on int8 (a quarter of the memory traffic) and the next
``quantize`` sees ``d(...)`` again, which either cancels (same parameters) or stays a requantize
(different ones; elementwise, fused into a neighbouring kernel). Ops that average (average
pooling, linear resize, Add of two quantized tensors) stay in float on the dequantized values:
exactly what ONNX Runtime's reference computes, with the dequantize only there.

Limits: per-tensor parameters only (per-channel activations are not produced by ``qdq`` or
``quantize_static``); the rewrite is local (one call at a time, post order), so it is linear in
the size of the function.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecc.lower.int8.qparams import Dequantized, dequantized, dtype_of, op_name

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


def commute_pass() -> Any:
    """A module pass applying the rewrites of the module docstring."""
    import tvm
    from tvm import relax

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
