"""Depthwise conv rule: one input channel per group (MobileNet/EfficientNet blocks), NHWC.

Matches a fused kernel whose single ``group_conv2d_nhwc`` block has one input channel per group
(``cg == 1``: depthwise, with or without a channel multiplier), any kernel size, stride,
dilation and padding, with the padding block before it and any elementwise epilogue after it
(bias, ReLU6/clip, SiLU, residual add).

Schedule (``out[n, y, x, f] += pad[n, y*s+ry*d, x*s+rx*d, f] * w[ry, rx, 0, f]``): the
micro-kernel of :mod:`edgecc.lower.schedules.conv2d` with the loops ``n, y, f_outer, x_outer |
ry, rx | x_inner, f_inner``: ``mr`` pixels x ``nf`` channels (``nf`` = up to 4 vectors of
``lanes``) accumulated in registers, the kernel window unrolled (up to 7x7), inputs and weights
loaded as vectors over channels; ``n, y, f_outer`` fused and parallel; the epilogue computed at
the tile; the padding block a parallel, vectorised copy.

Declines: grouped convs with several channels per group (the conv2d rule takes them), NCHW
convs, dynamic shapes.
"""

from __future__ import annotations

from edgecc.lower.schedules import register_rule
from edgecc.lower.schedules.conv2d import ConvRuleBase


@register_rule(12)
class DepthwiseConvRule(ConvRuleBase):
    """NHWC depthwise conv2d + fused epilogue."""

    name = "depthwise-conv2d"
    depthwise = True
