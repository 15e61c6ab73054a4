"""Channels-last layout for CPU convolutions: ``relax.nn.conv2d`` NCHW/OIHW -> NHWC/HWIO.

The conv, depthwise and pooling rules vectorise over channels, so channels must be the innermost
(contiguous) axis of activations and of weights: activations ``NHWC``, weights ``HWIO`` (output
channels innermost, so one vector load gives the weights of ``lanes`` output channels).

TVM's ``relax.transform.ConvertLayout`` does the rewrite: it changes every conv2d to the desired
layout, propagates the layout through the ops that can follow it (elementwise, broadcasting
adds, pooling, reductions, concat...), and inserts ``permute_dims`` only where a layout-agnostic
op or a graph output needs the original layout: at the edges of conv chains, not around each op.
Constant weights become ``permute_dims(const)``, which the ``FoldConstant`` after legalization
turns into re-laid-out constants at compile time (no run-time cost).

Limits: TOPI legalizes conv2d only for 4-letter layouts, so the blocked ``NCHWc`` layout is not
used; NHWC + HWIO is the blocked-enough choice (vectors over the contiguous channel axis). If
``ConvertLayout`` fails on a model, the module is left as it was (NCHW) and the conv rules decline
those kernels rather than break the build.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

DESIRED_LAYOUTS: dict[str, list[str]] = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


def channels_last_pass() -> Any:
    """A module pass converting conv2d (and what follows it) to NHWC/HWIO; never raises."""
    import tvm
    from tvm import relax

    convert = tvm.transform.Sequential(
        [
            relax.transform.FoldConstant(),
            _clip_bounds_as_relax_ops(),
            _per_tensor_qdq_as_relax_ops(),
            relax.transform.ConvertLayout(DESIRED_LAYOUTS),
        ]
    )

    @tvm.transform.module_pass(opt_level=0, name="EdgeccChannelsLast")
    def _channels_last(mod, _ctx):
        if not _has_conv2d(mod):
            return mod
        try:
            return convert(mod)
        except Exception as err:  # keep NCHW: slower kernels, never a failed build
            log.warning("channels-last layout conversion failed, keeping NCHW: %s", err)
            log.debug("ConvertLayout failure", exc_info=True)
            return mod

    return _channels_last


def _clip_bounds_as_relax_ops() -> Any:
    """``call_tir(maximum|minimum, x, scalar const)`` -> ``relax.op.maximum|minimum``.

    TVM's ONNX importer emits ``Clip`` (ReLU6) as TE kernels, which ``ConvertLayout`` cannot see
    through: every clip would get a transpose on each side. As Relax ops with the bound shaped
    ``(1,) * rank`` the layout propagates through them like any broadcasting elementwise op.
    """
    import numpy as np
    import tvm
    from tvm import relax

    ops = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: ANN001, ANN202 - TVM's visitor signature
            call = self.visit_expr_post_order(call)
            if getattr(call.op, "name", "") != "relax.call_tir" or len(call.args) < 2:
                return call
            callee, args = call.args[0], call.args[1]
            kind = callee.name_hint.rstrip("0123456789") if hasattr(callee, "name_hint") else ""
            if kind not in ops or len(args.fields) != 2:
                return call
            x, bound = args.fields
            if not isinstance(bound, tvm.ir.expr.Constant) or bound.value.numpy().ndim != 0:
                return call
            rank = len(x.ty.shape) if hasattr(x.ty, "shape") and x.ty.shape else 0
            if rank != 4:
                return call
            value = bound.value.numpy().reshape((1,) * rank)
            return ops[kind](x, relax.const(np.ascontiguousarray(value)))

        def visit_expr_post_order(self, call):  # noqa: ANN001, ANN202
            return super().visit_call_(call)

    return _rewrite_functions_pass("EdgeccClipAsRelaxOps", _Rewrite)


def _per_tensor_qdq_as_relax_ops() -> Any:
    """Per-tensor ``relax.quantize`` / ``relax.dequantize`` -> the elementwise Relax ops they
    legalize to.

    ``ConvertLayout`` has no layout rule for quantize/dequantize, so in a QDQ graph every
    activation Q/DQ pair sat between two transposes (int8 ResNet-style: 9 transpose kernels
    instead of 2). With a scalar scale and zero point they are layout-agnostic elementwise maths,
    written here exactly as TVM's legalization computes them (same operations, same order, so
    the results are bit-identical):

    * quantize: ``astype(min(max(round(x / s) + float(zp), qmin), qmax), dtype)``
    * dequantize: ``astype(astype(q, int32) - int32(zp), float32) * s``

    Per-channel (weight) Q/DQ keep their op: their axis is a layout fact, and on constant
    weights they fold at compile time anyway.
    """
    import numpy as np
    import tvm
    from tvm import relax

    def scalar(expr: Any) -> np.ndarray | None:
        if isinstance(expr, tvm.ir.expr.Constant) and expr.value.numpy().size == 1:
            return expr.value.numpy().reshape(())
        return None

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: ANN001, ANN202 - TVM's visitor signature
            call = super().visit_call_(call)
            name = getattr(call.op, "name", "")
            if name not in ("relax.quantize", "relax.dequantize") or len(call.args) != 3:
                return call
            x, scale, zero = call.args
            s, z = scalar(scale), scalar(zero)
            if s is None or z is None or s.dtype != np.float32:
                return call
            if name == "relax.quantize":
                dtype = str(call.attrs.out_dtype)
                if not dtype.startswith(("int", "uint")):
                    return call
                info = np.iinfo(dtype)
                shifted = relax.op.add(
                    relax.op.round(relax.op.divide(x, relax.const(s))),
                    relax.const(z.astype(np.float32)),
                )
                bounded = relax.op.minimum(
                    relax.op.maximum(shifted, relax.const(np.float32(info.min))),
                    relax.const(np.float32(info.max)),
                )
                return relax.op.astype(bounded, dtype)
            in_dtype = str(x.ty.dtype)
            if str(call.attrs.out_dtype) != "float32" or not in_dtype.startswith(("int", "uint")):
                return call
            centred = relax.op.subtract(
                relax.op.astype(x, "int32"), relax.const(z.astype(np.int32))
            )
            return relax.op.multiply(relax.op.astype(centred, "float32"), relax.const(s))

    return _rewrite_functions_pass("EdgeccQdqAsRelaxOps", _Rewrite)


def _rewrite_functions_pass(name: str, mutator: Any) -> Any:
    """A module pass running ``mutator`` (a Relax ``PyExprMutator`` class) over every Relax
    function, then dead-code elimination."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        rewriter = mutator(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mod[gvar] = rewriter.visit_expr(func)
        return relax.transform.DeadCodeElimination()(mod)

    return _pass


def _has_conv2d(mod: Any) -> bool:
    from tvm import relax

    found = False

    def visit(expr: Any) -> None:
        nonlocal found
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.nn.conv2d":
            found = True

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found
