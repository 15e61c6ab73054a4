"""Static int8 quantization: insert QuantizeLinear/DequantizeLinear (QDQ) around Conv/Gemm/MatMul.

Weights are quantized per output channel, symmetrically, and stored as int8 initializers read
through ``DequantizeLinear``::

    s_c = max|W_c| / 127,   W_q = clip(round(W / s_c), -127, 127),   W ~ W_q * s_c

(channel axis 0 for Conv; for Gemm the N axis of B: 0 with ``transB=1``, 1 without; for MatMul
``x @ W`` the last axis of W). The range stops at -127 so products of two int8 values never need
the -128 * -128 case. An all-zero channel gets ``s_c = 1``. ``reduce_range=true`` (default off)
quantizes weights to 7 bits instead, ``s_c = max|W_c| / 63`` and ``W_q`` in [-63, 63], like ONNX
Runtime's ``reduce_range``: any two adjacent weights then have ``|w0| + |w1| <= 126``, so the
u8 x s8 int16 pair sums of x86 ``vpmaddubsw`` (``255 * 126 < 32767``) never saturate and edgecc
uses that instruction for every conv/matmul on AVX2/AVX-512 (ONNX Runtime's own AVX2 kernels are
then exact too). It costs one bit of weight precision.

Activations are quantized per tensor with a ``Q -> DQ`` pair whose range ``[lo, hi]`` comes from
calibration (``method``: ``minmax``, ``percentile`` or ``entropy``; see
:mod:`edgecc.passes.calibration`)::

    uint8 (asymmetric): lo' = min(lo, 0), hi' = max(hi, 0), s = (hi' - lo') / 255,
                        zp = round(-lo' / s)
    int8 (symmetric):   s = max(|lo|, |hi|) / 127, zp = 0

``activation=`` picks the type; by default it follows the target: ``uint8`` on x86-64 (the u8 x s8
layout of VNNI and ONNX Runtime's default, and a post-ReLU tensor gets ``zp = 0`` so ONNX Runtime
drops the ReLU and fuses QLinearConv), ``int8`` symmetric elsewhere (ARM ``sdot``, TensorRT) and
when no target is set.

Where QDQ goes: on every float activation input of a quantized Conv/Gemm/MatMul, and on the output
of the quantized ops listed in ``outputs`` (default: Conv), so that runtimes can fuse DQ, Conv and Q
into one integer kernel (QLinearConv). With uint8 the output Q moves past a sole Relu/Clip consumer
(a ReLU output gets ``zp = 0``, uint8's minimum, so ONNX Runtime drops the ReLU and fuses the conv);
with symmetric int8 it stays before the ReLU (``zp = 0`` is not int8's minimum: ORT would keep the
ReLU between conv and Q and run the conv in float), and the ReLU output, when it feeds another
quantized op, gets its own Q/DQ. Gemm and MatMul outputs stay float by default: ONNX Runtime fuses
them without an output Q (QGemm with float output, MatMulIntegerToFloat), and in transformers they
are the residual stream, whose outlier channels (values of 100+ beside ones near 0.1) a per-tensor
scale cannot hold (on all-MiniLM-L6-v2 quantizing them too drops the embedding cosine from 0.97 to
0.84). A quantized tensor is read through its DQ by every consumer except nodes in ``keep_float``.
Graph outputs are never quantized (the model's outputs stay exactly float). Conv and Gemm biases
(computable from constants, one value per output channel; this includes the ``Expand(Shape(W))``
zero bias torch's exporter writes for bias-free convolutions) become int32 with scale ``s_x *
s_w[c]`` and zero point 0, the QDQ convention ONNX Runtime needs to fuse QGemm; a bias that would
overflow int32 stays float.

Declined (with a reason in ``info["declined"]``): nodes whose weight is not constant or not float32
(a Conv/Gemm weight fed by a graph input, for instance), MatMul with a constant first operand
(``W @ x``: per-channel scales would run along the reduced axis of the activation), Gemm with a
non-constant B, and nodes with a non-float32 activation input. ``keep_float`` names nodes or op
types to leave alone; ``only`` names the nodes to quantize, all others staying float (what
``edgecc sensitivity`` uses to quantize one layer at a time). A weight also read by a node that
is not quantized keeps its float copy for that reader (``info["float_weights_kept"]``). The
model needs ONNX opset >= 13 (per-axis DQ).

``gather=True`` (the default) also stores constant Gather tables (embeddings) as int8, one
scale per row, read through a per-axis DequantizeLinear (:mod:`edgecc.passes.gather_tables`): the
Gather output stays float, so the rest of the plan is unchanged; a compiled library keeps the
table in int8 and dequantizes only the gathered rows. ``gather=False`` keeps the tables float.

The result is standard QDQ ONNX: ONNX Runtime runs it as is, and at its default optimisation
level fuses the groups into QLinearConv / QGemm / QLinearMatMul / MatMulIntegerToFloat.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from edgecc.errors import UserInputError
from edgecc.passes.calibration import METHODS, calibrated_range, make_observer, observe
from edgecc.passes.gather_tables import quantize_tables
from edgecc.passes.graph import (
    GraphIndex,
    attr,
    check_names,
    const_value,
    fold_shape_reads,
    infer_types,
    refresh_shapes,
    remove_dead_nodes,
    remove_if_unused,
    topological_sort,
    why_unchanged,
)
from edgecc.passes.manager import PassContext, PassResult, register

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
FUSED_ACTIVATIONS = ("Relu", "Clip")
ACTIVATION_TYPES = {"uint8": np.uint8, "int8": np.int8}
INT32_MAX = 2**31 - 1
MIN_OPSET = 13
NO_CALIBRATION = "qdq needs calibration data: pass --calib data.npz|dir|random"


def quantize_symmetric(
    w: np.ndarray, axis: int | None, qmax: int = 127
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of ``w``, per channel along ``axis`` (None: per tensor).

    Returns:
        ``(q, scale)``: int8 values in [-qmax, qmax] (127, or 63 for ``reduce_range``) and
        float32 scales (shape ``(C,)``, or ``()`` per tensor) with ``w ~ q * scale`` broadcast
        along ``axis``.
    """
    w = np.asarray(w, np.float32)
    if axis is None:
        top = np.array(np.max(np.abs(w)) if w.size else 0.0, np.float32)
    else:
        top = np.max(np.abs(w), axis=tuple(i for i in range(w.ndim) if i != axis))
    scale = np.where(top > 0, top / float(qmax), 1.0).astype(np.float32)
    q = np.clip(np.round(w / _along(scale, axis, w.ndim)), -qmax, qmax).astype(np.int8)
    return q, scale


def _along(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """``values`` (one per channel) shaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    if axis is None:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def activation_qparams(lo: float, hi: float, dtype: str) -> tuple[float, int]:
    """Scale and zero point of a per-tensor activation range (see module docstring)."""
    if dtype == "uint8":
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / 255.0
        if scale <= 0:
            return 1.0, 0
        return float(np.float32(scale)), int(np.clip(round(-lo / scale), 0, 255))
    top = max(abs(lo), abs(hi))
    return (float(np.float32(top / 127.0)) if top > 0 else 1.0), 0


class WeightQuantizer:
    """Gives constant weights an int8 initializer read through ``DequantizeLinear``.

    Each ``(weight, axis)`` is quantized once; the new nodes collect in :attr:`nodes` (the caller
    inserts them and re-sorts), the float names replaced (weights and biases) in :attr:`replaced`
    and the weights alone in :attr:`weights`.
    """

    def __init__(self, index: GraphIndex, qmax: int = 127):
        self.index = index
        self.qmax = qmax
        self.nodes: list[onnx.NodeProto] = []
        self.replaced: set[str] = set()
        self.weights: set[str] = set()
        self._done: dict[tuple[str, int | None], tuple[str, np.ndarray]] = {}

    def dequantized(self, name: str, axis: int | None) -> tuple[str, np.ndarray]:
        """The DQ output standing for weight ``name``, and its scales."""
        key = (name, axis)
        if key not in self._done:
            q, scale = quantize_symmetric(self.index.const(name), axis, self.qmax)
            self._done[key] = (
                self._dq(name, q, scale, np.zeros(scale.shape, np.int8), axis),
                scale,
            )
            self.replaced.add(name)
            self.weights.add(name)
        return self._done[key]

    def dequantized_bias(self, name: str, value: np.ndarray, scale: np.ndarray) -> str | None:
        """An int32 bias ``value`` with per-channel ``scale`` (zero point 0), or None if it
        overflows."""
        q = np.round(value.astype(np.float64) / scale.astype(np.float64))
        if not np.all(np.abs(q) <= INT32_MAX):
            return None
        self.replaced.add(name)
        return self._dq(name, q.astype(np.int32), scale.astype(np.float32), None, 0)

    def _dq(
        self,
        name: str,
        q: np.ndarray,
        scale: np.ndarray,
        zero_point: np.ndarray | None,
        axis: int | None,
    ) -> str:
        idx = self.index
        inputs = [
            idx.add_initializer(f"{name}_quantized", q),
            idx.add_initializer(f"{name}_scale", scale),
        ]
        if zero_point is not None:
            inputs.append(idx.add_initializer(f"{name}_zero_point", zero_point))
        out = idx.unique(f"{name}_dequantized")
        attrs = {"axis": axis} if axis is not None and scale.ndim else {}
        self.nodes.append(
            idx.make_node("DequantizeLinear", inputs, [out], f"{name}_DequantizeLinear", **attrs)
        )
        return out


def computed_weight(index: GraphIndex, name: str) -> str | None:
    """A decline reason when ``name`` is computed from constants rather than stored (torch's
    exporter writes ``MatMul(x, Transpose(W))``; ``fold-constants`` makes it one initializer)."""
    if const_value(index, name) is None:
        return None
    return f"weight {name!r} is computed from constants: run fold-constants first"


def weight_axis(node: onnx.NodeProto, rank: int) -> int | None:
    """The output-channel axis of the constant weight (input 1) of Conv/Gemm/MatMul."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return rank - 1 if rank >= 2 else None  # MatMul x @ W: N is W's last axis


def finish(
    model: onnx.ModelProto, new_nodes: Iterable[onnx.NodeProto], replaced: Iterable[str]
) -> None:
    """Insert ``new_nodes``, drop the float constants (and constant chains, such as the
    ``Expand(Shape(W))`` zero bias of torch's exporter) nothing reads any more, re-sort and
    re-infer shapes, in place. ``Shape`` reads of a replaced weight become constants, so they do
    not keep it alive."""
    model.graph.node.extend(new_nodes)
    replaced = set(replaced)
    fold_shape_reads(model, replaced)
    remove_if_unused(model, replaced | remove_dead_nodes(model, replaced))
    topological_sort(model)
    refresh_shapes(model)


def matches(node: onnx.NodeProto, names: Iterable[str]) -> bool:
    """True when ``node``'s name or op type is listed in ``names``."""
    names = set(names)
    return node.name in names or node.op_type in names


def as_list(value: str | Sequence[str] | None) -> list[str]:
    """A pass option that is one name or a list of names, as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


@dataclass
class Site:
    """One node to quantize: which inputs are activations, weight, bias, output point."""

    node: onnx.NodeProto
    activations: list[str]
    weight: tuple[int, str, int | None] | None = None  # (input slot, tensor, channel axis)
    bias: tuple[int, str, np.ndarray] | None = None  # (input slot, tensor, its value)
    output: str | None = None


@dataclass
class Plan:
    """The analysis: sites, declined nodes with reasons, and the tensors to calibrate."""

    sites: list[Site] = field(default_factory=list)
    declined: list[dict[str, str]] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)

    @property
    def tensors(self) -> list[str]:
        names = [t for s in self.sites for t in s.activations]
        names += [s.output for s in self.sites if s.output]
        return list(dict.fromkeys(names))


def plan_quantization(
    model: onnx.ModelProto,
    keep_float: Sequence[str],
    outputs: Sequence[str] = ("Conv",),
    past_relu: bool = True,
) -> Plan:
    """Decide which Conv/Gemm/MatMul nodes to quantize and how (no graph change)."""
    index, types, plan = GraphIndex(model), infer_types(model), Plan()
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        if matches(node, keep_float):
            plan.kept_float.append(node.name)
            continue
        site = _site(node, index, types)
        if isinstance(site, str):
            plan.declined.append({"node": node.name, "op": node.op_type, "reason": site})
            continue
        if node.op_type in outputs:
            site.output = _output_point(node, index, keep_float, past_relu)
        plan.sites.append(site)
    return plan


def _site(node: onnx.NodeProto, index: GraphIndex, types: dict[str, onnx.TypeProto]) -> Site | str:
    """The quantization site of ``node``, or the reason it is declined."""
    a, b = node.input[0], node.input[1]
    if node.op_type == "MatMul" and index.is_const(a):
        return "constant first operand (W @ x) is not handled"
    if node.op_type == "MatMul" and not index.is_const(b):
        computed = computed_weight(index, b)
        if computed:
            return computed
        site = Site(node, [a, b])
    elif not index.is_const(b):
        return computed_weight(index, b) or f"weight {b!r} is not constant"
    else:
        w = index.const(b)
        if w.dtype != np.float32:
            return f"weight {b!r} is {w.dtype}, not float32"
        site = Site(node, [a], (1, b, weight_axis(node, w.ndim)))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        channels = w.shape[site.weight[2]] if site.weight[2] is not None else None
        value = const_value(index, bias, types) if bias else None
        if value is not None and value.dtype == np.float32 and value.shape == (channels,):
            site.bias = (2, bias, value)
    for t in site.activations:
        elem = types[t].tensor_type.elem_type if t in types else 0
        if elem != TensorProto.FLOAT:
            kind = TensorProto.DataType.Name(elem) if elem else "of unknown type"
            return f"activation {t!r} is {kind}, not FLOAT"
    return site


def _output_point(
    node: onnx.NodeProto, index: GraphIndex, keep_float: Sequence[str], past_relu: bool
) -> str | None:
    """The tensor to quantize after ``node``: its output, or that of a sole Relu/Clip consumer."""
    y = node.output[0]
    consumers = index.consumers.get(y, [])
    if not consumers or y in index.graph_outputs:
        return None
    nxt = consumers[0]
    if (
        past_relu
        and len(consumers) == 1
        and nxt.op_type in FUSED_ACTIVATIONS
        and not matches(nxt, keep_float)
    ):
        y = nxt.output[0]
    return None if y in index.graph_outputs or not index.consumers.get(y) else y


def default_activation(target: Any) -> tuple[str, str]:
    """The activation type for ``target`` and why (see module docstring)."""
    if target is None:
        return "int8", "no target: int8 symmetric"
    if getattr(target, "arch", None) == "x86_64":
        return "uint8", f"target {target.name} (x86-64): uint8 asymmetric"
    return "int8", f"target {target.name} ({getattr(target, 'arch', '?')}): int8 symmetric"


ORT_NOTE = (
    "no target: standard QDQ ONNX; ONNX Runtime fuses the Q/DQ groups into integer kernels "
    "(QLinearConv, QGemm, QLinearMatMul, MatMulIntegerToFloat) at its default "
    "optimisation level"
)


@register("qdq")
class InsertQDQ:
    """Static int8 quantization with calibration (see module docstring).

    Args:
        method: ``minmax``, ``percentile`` or ``entropy``.
        percentile: the percentile of ``|x|`` kept by ``method=percentile``.
        activation: ``uint8`` (asymmetric) or ``int8`` (symmetric); None: from the target.
        keep_float: node names or op types to leave in float.
        only: node names: quantize these Conv/Gemm/MatMul nodes only, every other one stays
            float (per-layer sensitivity); None quantizes all.
        outputs: op types whose outputs are quantized too (after a Relu/Clip), for fusion; True
            for all of Conv/Gemm/MatMul, False for none.
        bins: histogram bins of the percentile/entropy observers (a power of two).
        gather: also store constant Gather tables (embeddings) as int8 with one scale per row
            (:mod:`edgecc.passes.gather_tables`; the Gather output stays float); on by default.
        reduce_range: 7-bit weights in [-63, 63] (x86 ``vpmaddubsw`` is then exact).
    """

    name = "qdq"

    def __init__(
        self,
        method: str = "minmax",
        percentile: float = 99.99,
        activation: str | None = None,
        keep_float: str | Sequence[str] | None = None,
        outputs: bool | str | Sequence[str] = ("Conv",),
        bins: int = 2048,
        only: str | Sequence[str] | None = None,
        gather: bool = True,
        reduce_range: bool = False,
    ):
        if method not in METHODS:
            raise UserInputError(f"qdq: unknown method {method!r}; choose {', '.join(METHODS)}")
        if not 0 < percentile <= 100:
            raise UserInputError(f"qdq: percentile must be in (0, 100], got {percentile}")
        if activation is not None and activation not in ACTIVATION_TYPES:
            raise UserInputError(f"qdq: activation must be uint8 or int8, got {activation!r}")
        if bins < 256 or bins & (bins - 1):
            raise UserInputError(f"qdq: bins must be a power of two >= 256, got {bins}")
        self.method, self.percentile, self.activation = method, percentile, activation
        if isinstance(outputs, bool):
            outputs = QUANTIZED_OPS if outputs else ()
        self.outputs = as_list(outputs)
        if set(self.outputs) - set(QUANTIZED_OPS):
            raise UserInputError(
                f"qdq: outputs must list ops among {', '.join(QUANTIZED_OPS)}, got {outputs!r}"
            )
        self.keep_float, self.bins = as_list(keep_float), bins
        self.only = None if only is None else as_list(only)
        self.gather = bool(gather)
        self.reduce_range = bool(reduce_range)

    def _kept(self, model: onnx.ModelProto) -> list[str]:
        """``keep_float`` plus, with ``only``, every quantizable node not named there."""
        if self.only is None:
            return self.keep_float
        others = [
            n.name
            for n in model.graph.node
            if n.op_type in QUANTIZED_OPS and n.name not in self.only
        ]
        return [*self.keep_float, *others]

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        check_names(model, "qdq: keep_float", self.keep_float)
        check_names(model, "qdq: only", self.only or [], op_types=False)
        keep_float = self._kept(model)
        if ctx.calibration is None:
            raise UserInputError(NO_CALIBRATION)
        if opset(model) < MIN_OPSET:
            raise UserInputError(
                f"qdq needs ONNX opset >= {MIN_OPSET} (per-channel "
                f"DequantizeLinear); the model imports opset {opset(model)}"
            )
        act, why = (
            (self.activation, "option") if self.activation else default_activation(ctx.target)
        )
        plan = plan_quantization(model, keep_float, self.outputs, act == "uint8")
        info: dict[str, Any] = {
            "method": self.method,
            "declined": plan.declined,
            "kept_float": plan.kept_float,
        }
        if not plan.sites:
            info["note"] = why_unchanged(
                model, "qdq", plan.declined, "no float Conv/Gemm/MatMul to quantize"
            )
            return PassResult(model, False, info, reason=info["note"])
        seen = observe(
            model, plan.tensors, ctx.calibration(), lambda: make_observer(self.method, self.bins)
        )
        params = {t: self._params(seen.observers[t], act) for t in plan.tensors}
        bytes_before = model.ByteSize()
        rewrite_info = self._rewrite(model, plan, params, act, keep_float)
        scales = np.array([p["scale"] for p in params.values()])
        info.update(
            {
                **({"percentile": self.percentile} if self.method == "percentile" else {}),
                "activation": f"{act} {'asymmetric' if act == 'uint8' else 'symmetric'} ({why})",
                "weights": "int8 [-63, 63] (reduce_range)"
                if self.reduce_range
                else "int8 [-127, 127]",
                "calibration": {
                    "source": ctx.calibration_source or "ctx.calibration",
                    "samples": seen.samples,
                    "batches": seen.batches,
                },
                "quantized_nodes": [s.node.name for s in plan.sites],
                "activation_scales": {
                    "count": len(scales),
                    "min": float(scales.min()),
                    "median": float(np.median(scales)),
                    "max": float(scales.max()),
                },
                "activations": params,
                **rewrite_info,
                "bytes_before": bytes_before,
                "bytes_after": model.ByteSize(),
                "int8_execution": ctx.target.int8_execution if ctx.target is not None else ORT_NOTE,
            }
        )
        logger.info(
            "qdq: %d nodes quantized (%s, %s), %d activation tensors, %d -> %d bytes",
            len(plan.sites),
            self.method,
            act,
            len(params),
            bytes_before,
            model.ByteSize(),
        )
        return PassResult(model, True, info)

    def _params(self, observer: Any, act: str) -> dict[str, Any]:
        unsigned = act == "uint8" and observer.range()[0] >= 0  # all 256 levels on [0, hi]
        lo, hi = calibrated_range(observer, self.method, self.percentile, 256 if unsigned else 128)
        scale, zero_point = activation_qparams(lo, hi, act)
        return {
            "scale": scale,
            "zero_point": zero_point,
            "range": [lo, hi],
            "observed": list(observer.range()),
        }

    def _rewrite(
        self,
        model: onnx.ModelProto,
        plan: Plan,
        params: dict[str, dict[str, Any]],
        act: str,
        keep_float: Sequence[str],
    ) -> dict[str, Any]:
        """Insert the weight DQs, int32 biases and activation Q/DQ pairs, in place."""
        index = GraphIndex(model)
        weights = WeightQuantizer(index, 63 if self.reduce_range else 127)
        float_bias = []
        for site in plan.sites:
            node = site.node
            if site.weight is None:
                continue
            slot, name, axis = site.weight
            node.input[slot], w_scale = weights.dequantized(name, axis)
            if site.bias is not None:
                b_slot, b_name, value = site.bias
                bias_dq = weights.dequantized_bias(
                    b_name, value, np.float32(params[site.activations[0]]["scale"]) * w_scale
                )
                if bias_dq is None:
                    float_bias.append(node.name)
                else:
                    node.input[b_slot] = bias_dq
        tables = quantize_tables(model, weights, keep_float) if self.gather else {}
        dq_of, qdq_nodes = {}, []
        dtype = ACTIVATION_TYPES[act]
        for t in plan.tensors:
            p = params[t]
            s = index.add_initializer(f"{t}_scale", np.array(p["scale"], np.float32))
            z = index.add_initializer(f"{t}_zero_point", np.array(p["zero_point"], dtype))
            q, dq_of[t] = index.unique(f"{t}_quantized"), index.unique(f"{t}_dequantized")
            qdq_nodes += [
                index.make_node("QuantizeLinear", [t, s, z], [q], f"{t}_QuantizeLinear"),
                index.make_node("DequantizeLinear", [q, s, z], [dq_of[t]], f"{t}_DequantizeLinear"),
            ]
        for node in model.graph.node:
            if not matches(node, keep_float):
                node.input[:] = [dq_of.get(i, i) for i in node.input]
        finish(model, weights.nodes + qdq_nodes, weights.replaced)
        still = {t.name for t in model.graph.initializer}
        return {
            "weights_quantized": len(weights.weights),
            "float_bias": float_bias,
            "float_weights_kept": sorted(weights.weights & still),
            **tables,
        }
