"""int8 activations shifted to uint8 for x86's u8 x s8 instructions (``vpmaddubsw``, ``vpdpbusd``).

x86's fast int8 instructions multiply *unsigned* activations by signed weights. An integer conv /
matmul of the integer lowering (:mod:`.anchors`) on int8 activations ``x`` (ONNX Runtime's
default s8s8 QDQ, or ``qdq(activation=int8)``) is rewritten, for a constant int8 weight ``W``::

    op(x, W) = op(x + 128, W) - 128 * sum_k W[k, f]          (int32, exact)

``x + 128`` (computed in int16, then cast: exactly [0, 255]) is uint8; the compensation is one
int32 constant per output channel added after the op (fused into the kernel's epilogue with the
bias). Padding: a padded conv pads ``x`` with 0, which is ``x + 128 = 128`` after the shift, so
the conv is made unpadded behind an explicit ``pad(x + 128, 128)`` (a conv already padded
explicitly by :mod:`.anchors` with its zero point ``zx`` reads ``pad(x) + 128``: padded with
``zx + 128``); every tap then gets the same compensation. Sums stay inside int32 as for uint8
activations (``|sum| <= K * 255 * 128``).

Applied only where it pays (x86 targets, see :func:`shift_pass`): the kernel's rule will then
use ``vpdpbusd`` (VNNI targets) or ``vpmaddubsw`` (the weights' pairs fit, see
:mod:`edgecc.lower.schedules.int8_x86`), the conv is not depthwise, ``C / groups`` and ``K`` are
multiples of 4 and the output channels of 8. Elsewhere int8 activations keep ``vpmaddwd``, which
takes them as they are (the shift would only add work). ARM (``sdot`` / ``smull``: s8 x s8) is
never shifted.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edgecc.lower.int8.qparams import dtype_of, op_name, shape_of

log = logging.getLogger(__name__)


def _weight(expr: Any) -> np.ndarray | None:
    import tvm

    if isinstance(expr, tvm.ir.expr.Constant) and str(expr.value.dtype) == "int8":
        return expr.value.numpy()
    return None


def worth_shifting(kind: str, w: np.ndarray, groups: int, vnni: bool) -> bool:
    """Whether shifting the int8 activations of this op to uint8 gets it a faster instruction:
    ``kind`` ``conv2d`` (OIHW ``w``) or ``matmul`` (``[K, N]`` ``w``)."""
    from edgecc.lower.schedules.int8_x86 import pairs_fit

    if kind == "conv2d":
        f, cg = w.shape[0], w.shape[1]
        if cg == 1 and groups > 1 or cg % 4 or f % 8:
            return False
        k_axis = 1
    else:
        if w.ndim != 2 or w.shape[0] % 4 or w.shape[1] % 8:
            return False
        k_axis = 0
    return vnni or pairs_fit(w, k_axis)


def shift_pass(target: Any) -> Any:
    """A module pass (after :mod:`.anchors`) shifting int8 activations of integer conv2d /
    matmul ops to uint8; the identity for targets without x86 u8 x s8 instructions."""
    import tvm
    from tvm import relax

    from edgecc.lower.schedules.int8_intrinsics import target_features

    feats = target_features(target)
    vnni = bool({"avx512vnni", "avxvnni"} & feats)
    enabled = "avx2" in feats or "avx512" in feats

    @relax.expr_functor.mutator
    class _Shift(relax.PyExprMutator):
        count = 0

        def visit_call_(self, call):  # noqa: ANN001, ANN202 - TVM's signature
            call = super().visit_call_(call)
            name = op_name(call)
            if name not in ("relax.nn.conv2d", "relax.matmul") or len(call.args) != 2:
                return call
            x, weight = call.args
            w = _weight(weight)
            if w is None or dtype_of(x) != "int8" or str(call.attrs.out_dtype) != "int32":
                return call
            if name == "relax.matmul":
                if not worth_shifting("matmul", w, 1, vnni) or shape_of(x) is None:
                    return call
                comp = (-128 * w.astype(np.int64).sum(axis=0)).astype(np.int32)
                acc = self.builder_.emit(
                    relax.op.matmul(self._shifted(x), weight, out_dtype="int32")
                )
                _Shift.count += 1
                return relax.op.add(acc, relax.const(comp, "int32"))
            a = call.attrs
            if (str(a.data_layout), str(a.kernel_layout)) != ("NCHW", "OIHW"):
                return call
            if not worth_shifting("conv2d", w, int(a.groups), vnni):
                return call
            padding = [int(p) for p in a.padding]
            xs = self._shifted(x)
            if any(padding):
                top, left, bottom, right = padding
                pads = [0, 0, 0, 0, top, bottom, left, right]
                xs = self.builder_.emit(relax.op.nn.pad(xs, pads, "constant", 128.0))
            acc = self.builder_.emit(
                relax.op.nn.conv2d(
                    xs,
                    weight,
                    strides=a.strides,
                    padding=[0, 0, 0, 0],
                    dilation=a.dilation,
                    groups=a.groups,
                    data_layout=a.data_layout,
                    kernel_layout=a.kernel_layout,
                    out_layout=a.out_layout,
                    out_dtype="int32",
                )  # fmt: skip
            )
            comp = (-128 * w.astype(np.int64).sum(axis=(1, 2, 3))).astype(np.int32)
            _Shift.count += 1
            return relax.op.add(acc, relax.const(comp.reshape(1, -1, 1, 1), "int32"))

        def _shifted(self, x: Any) -> Any:
            wide = relax.op.add(relax.op.astype(x, "int16"), relax.const(128, "int16"))
            return self.builder_.emit(relax.op.astype(wide, "uint8"))

    @tvm.transform.module_pass(opt_level=0, name="EdgeccInt8Shift")
    def _pass(mod, _ctx):  # noqa: ANN001, ANN202
        if not enabled:
            return mod
        _Shift.count = 0
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gvar] = _Shift(mod).visit_expr(func)
        log.info("int8: %d ops take shifted (uint8) activations", _Shift.count)
        return mod

    return _pass
