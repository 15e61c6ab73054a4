"""Input channels of integer convs padded to a multiple of 4 (the C = 3 first conv of a CNN).

The int8 conv rule's dot-product schedule needs ``C / groups`` to be a multiple of the
instruction's ``kp`` (4 for ``vpmaddubsw`` / ``vpdpbusd``); an RGB stem conv (``C = 3``) fell to
the generic int32 schedule. For an ungrouped integer ``conv2d`` (NCHW / OIHW, int32 output, an
int8 constant weight) with ``C % 4 != 0`` this rewrite appends ``C4 - C`` channels::

    conv(x, W) = conv(pad_C(x, 0), pad_C(W, 0))            exact

the weight's new input channels are zero, so whatever the activation holds there (0 here)
contributes nothing, and the activation zero-point compensation (``zx * sum W``) is unchanged.
The activation pad is one small injective kernel over the input image (fused with the conv's
spatial pad when there is one). Applied on x86 targets (see :func:`pad_channels_pass`) for
convs with at least 8 output channels and ``C < 16`` (where the generic path is much slower);
elsewhere the op is left as it is.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edgecc.lower.int8.qparams import dtype_of

log = logging.getLogger(__name__)
MAX_CHANNELS = 16


def pad_channels_pass(target: Any) -> Any:
    """A module pass padding the input channels of small-C integer convs to a multiple of 4; the
    identity off x86."""
    import tvm
    from tvm import relax

    from edgecc.lower.schedules.int8_intrinsics import target_features

    feats = target_features(target)
    enabled = "avx2" in feats or "avx512" in feats

    @relax.expr_functor.mutator
    class _Pad(relax.PyExprMutator):
        count = 0

        def visit_call_(self, call):  # noqa: ANN001, ANN202 - TVM's signature
            call = super().visit_call_(call)
            if getattr(call.op, "name", "") != "relax.nn.conv2d" or len(call.args) != 2:
                return call
            x, weight = call.args
            a = call.attrs
            if not isinstance(weight, tvm.ir.expr.Constant) or str(weight.value.dtype) != "int8":
                return call
            if dtype_of(x) not in ("int8", "uint8") or str(a.out_dtype) != "int32":
                return call
            if (str(a.data_layout), str(a.kernel_layout)) != ("NCHW", "OIHW") or int(a.groups) != 1:
                return call
            w = weight.value.numpy()
            f, c = w.shape[0], w.shape[1]
            if c % 4 == 0 or c >= MAX_CHANNELS or f % 8:
                return call
            extra = -c % 4
            w4 = np.pad(w, ((0, 0), (0, extra), (0, 0), (0, 0)))
            x4 = self.builder_.emit(
                relax.op.nn.pad(x, [0, 0, 0, extra, 0, 0, 0, 0], "constant", 0.0)
            )
            _Pad.count += 1
            return relax.op.nn.conv2d(
                x4, relax.const(w4, "int8"), strides=a.strides, padding=a.padding,
                dilation=a.dilation, groups=1, data_layout=a.data_layout,
                kernel_layout=a.kernel_layout, out_layout=a.out_layout, out_dtype="int32",
            )  # fmt: skip

    @tvm.transform.module_pass(opt_level=0, name="EdgeccInt8PadChannels")
    def _pass(mod, _ctx):  # noqa: ANN001, ANN202
        if not enabled:
            return mod
        _Pad.count = 0
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gvar] = _Pad(mod).visit_expr(func)
        log.info("int8: %d convs with input channels padded to a multiple of 4", _Pad.count)
        return mod

    return _pass
