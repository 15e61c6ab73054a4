"""Quantized layers built directly in Relax: the kernels the integer lowering emits, for the int8
kernel tests and the per-layer benchmark (``scripts/benchmark.py --int8-layers``).

A :class:`Layer` is one conv2d (NCHW input, OIHW weights: the channels-last pass makes it NHWC)
or matmul on 8-bit activations and int8 constant weights with int32 accumulation, followed by
the requantize epilogue of the integer lowering::

    q = clip(round(float32(acc + bias) * scale) + zero_point, lo, hi) -> int8 / uint8

(``round`` half to even, as ONNX QuantizeLinear). ``requant=False`` returns the raw int32
accumulators (what exactness proofs compare). :func:`float_module` gives the same layers in
float32 (weights as floats, no requantize), the fp32 build the int8 one is compared with.
:func:`reference` computes the int8 outputs with numpy (int64 sums, then the epilogue in
float32 exactly as the kernel does it).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecc.targets import Target

SCALE = np.float32(1 / 1024)


@dataclass(frozen=True)
class Layer:
    """One quantized layer.

    Attributes:
        name: input / output name stem.
        kind: ``conv`` or ``matmul``.
        shape: conv ``(N, C, H, W)`` input; matmul ``(M, K)``.
        out: output channels (conv) or columns ``N`` (matmul).
        kernel: conv kernel size (square).
        stride: conv stride.
        groups: conv groups (``groups == C == out``: depthwise).
        a_dtype: activation dtype, ``uint8`` or ``int8``.
        requant: fuse the requantize epilogue (else the output is the int32 accumulator).
        weight_fill: ``random``, or ``extreme`` (alternating -128 / 127: the values at which
            ``vpmaddubsw``'s int16 pair sums would saturate with uint8 activations of 255), or
            ``symmetric`` (random in [-127, 127], as ``qdq`` quantizes weights), ``7bit`` (random
            in [-63, 63], as ``qdq(reduce_range=true)``: ``vpmaddubsw`` is exact), or ``pair128``
            (K pairs -100, -28: the largest pair sums ``vpmaddubsw`` takes exactly).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    out: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    a_dtype: str = "uint8"
    requant: bool = True
    weight_fill: str = "random"

    def weight(self) -> np.ndarray:
        """The int8 weight (OIHW for convs, ``[K, N]`` for matmuls), fixed by the name."""
        if self.kind == "conv":
            shape: tuple[int, ...] = (
                self.out,
                self.shape[1] // self.groups,
                self.kernel,
                self.kernel,
            )
        else:
            shape = (self.shape[1], self.out)
        if self.weight_fill == "extreme":
            return np.where(np.indices(shape).sum(0) % 2 == 0, -128, 127).astype(np.int8)
        rng = np.random.default_rng(zlib.crc32(self.name.encode()))
        if self.weight_fill == "pair128":  # K pairs (-100, -28): |w0| + |w1| = 128 exactly
            k = np.indices(shape)[1 if self.kind == "conv" else 0]
            return np.where(k % 2 == 0, -100, -28).astype(np.int8)
        if self.weight_fill == "7bit":
            return rng.integers(-63, 64, shape).astype(np.int8)
        low = -127 if self.weight_fill == "symmetric" else -128
        return rng.integers(low, 128, shape).astype(np.int8)

    def bias(self) -> np.ndarray:
        """The int32 bias (``[out]``)."""
        rng = np.random.default_rng(len(self.name) * 7919 + self.out)
        return rng.integers(-5000, 5000, self.out).astype(np.int32)

    def zero_point(self) -> int:
        return 128 if self.a_dtype == "uint8" else 0

    def macs(self) -> int:
        """Multiply-accumulates of one run."""
        if self.kind == "matmul":
            return self.shape[0] * self.shape[1] * self.out
        n, c, h, w = self.shape
        oh, ow = -(-h // self.stride), -(-w // self.stride)
        return n * oh * ow * self.out * (c // self.groups) * self.kernel**2

    def random_input(self, rng: np.random.Generator) -> np.ndarray:
        lo, hi = (0, 256) if self.a_dtype == "uint8" else (-128, 128)
        return rng.integers(lo, hi, self.shape).astype(self.a_dtype)


def _layer_expr(bb: Any, layer: Layer, x: Any, floating: bool) -> Any:
    from tvm import relax

    w = layer.weight()
    if floating:
        w = w.astype(np.float32)
    if layer.kind == "conv":
        pad = layer.kernel // 2
        y = relax.op.nn.conv2d(
            x,
            relax.const(w),
            strides=layer.stride,
            padding=pad,
            groups=layer.groups,
            out_dtype="float32" if floating else "int32",
        )
        bias_shape: tuple[int, ...] = (1, layer.out, 1, 1)
    else:
        y = relax.op.matmul(x, relax.const(w), out_dtype="float32" if floating else "int32")
        bias_shape = (layer.out,)
    y = bb.emit(y)
    bias = layer.bias().reshape(bias_shape)
    if floating:
        return bb.emit(relax.op.add(y, relax.const(bias.astype(np.float32) * SCALE)))
    y = bb.emit(relax.op.add(y, relax.const(bias)))
    if not layer.requant:
        return y
    f = bb.emit(relax.op.multiply(relax.op.astype(y, "float32"), relax.const(SCALE)))
    f = bb.emit(relax.op.add(relax.op.round(f), relax.const(np.float32(layer.zero_point()))))
    lo, hi = (0, 255) if layer.a_dtype == "uint8" else (-128, 127)
    return bb.emit(relax.op.astype(relax.op.clip(f, lo, hi), layer.a_dtype))


def layer_module(layers: list[Layer], floating: bool = False) -> Any:
    """A Relax module whose ``main`` takes one input per layer and returns a tuple of outputs."""
    from tvm import relax

    bb = relax.BlockBuilder()
    params = [
        relax.Var(
            f"{lay.name}_x", relax.TensorType(lay.shape, "float32" if floating else lay.a_dtype)
        )
        for lay in layers
    ]
    with bb.function("main", params):
        with bb.dataflow():
            outs = [
                _layer_expr(bb, lay, x, floating) for lay, x in zip(layers, params, strict=True)
            ]
            result = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(result)
    return bb.get()


def reference(layer: Layer, x: np.ndarray) -> np.ndarray:
    """The layer's output computed with numpy (int64 sums, epilogue in float32)."""
    w = layer.weight().astype(np.int64)
    xi = x.astype(np.int64)
    if layer.kind == "matmul":
        acc = xi @ w + layer.bias()
    else:
        acc = _conv_nchw(xi, w, layer.stride, layer.kernel // 2, layer.groups)
        acc = acc + layer.bias().reshape(1, -1, 1, 1)
    if not layer.requant:
        return acc.astype(np.int32)
    f = np.round(acc.astype(np.float32) * SCALE) + np.float32(layer.zero_point())
    lo, hi = (0, 255) if layer.a_dtype == "uint8" else (-128, 127)
    return np.clip(f, lo, hi).astype(layer.a_dtype)


def _conv_nchw(x: np.ndarray, w: np.ndarray, stride: int, pad: int, groups: int) -> np.ndarray:
    n, c, h, wd = x.shape
    f, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, f, oh, ow), np.int64)
    fg = f // groups
    for g in range(groups):
        xs = xp[:, g * cg : (g + 1) * cg]
        for ry in range(kh):
            for rx in range(kw):
                patch = xs[:, :, ry : ry + stride * oh : stride, rx : rx + stride * ow : stride]
                wk = w[g * fg : (g + 1) * fg, :, ry, rx]  # [fg, cg]
                out[:, g * fg : (g + 1) * fg] += np.einsum("nchw,fc->nfhw", patch, wk)
    return out


def build_module(
    mod: Any, target: Target, path: Path, schedules: bool = True
) -> tuple[Path, dict[str, Any], str]:
    """Compile ``mod`` with edgecc's pipeline for ``target`` into the library ``path``.

    Returns:
        ``(path, schedule coverage summary, the kernels' assembly)``.
    """
    import tvm

    from edgecc.lower.build import _export, _linker, _pipeline, tvm_target_of
    from edgecc.lower.schedules import ScheduleCoverage

    tvm_target = tvm_target_of(target)
    coverage = ScheduleCoverage()
    with tvm_target:
        lowered = _pipeline(tvm_target, target, coverage, schedules)(mod)
        executable = tvm.compile(lowered, target=tvm_target, relax_pipeline=None)
    asm = "\n".join(m.inspect_source("asm") for m in executable.mod.imports if m.kind == "llvm")
    _export(executable, path, _linker(target), None)
    return path, coverage.summary(), asm
