"""fold-bn: fold inference-mode BatchNormalization into the linear op before it.

Maths. BatchNormalization (inference form) is a per-channel affine map on axis 1::

    y = (x - mean) * gamma / sqrt(var + eps) + beta = x * s + t,
    s = gamma / sqrt(var + eps),   t = beta - mean * s

When ``x = W * a + b`` comes from a linear op whose output channel is axis 1, scaling each
output channel's weights and bias gives the same ``y`` with no BatchNorm::

    W' = W * s  (per output channel),   b' = (b - mean) * s + beta

Computed in float64 and cast back to the weight's dtype, so the folded graph matches the
original to float rounding (tests: 1e-5 relative).

Patterns, and where the output channel lives in the weight:
    Conv            W (C_out, C_in/g, k...): axis 0, any ``group``; a missing bias is created.
    ConvTranspose   W (C_in, C_out/g, k...): output channel ``o = j * C_out/g + c`` scales
                    ``W[j * C_in/g : (j+1) * C_in/g, c]``.
    Gemm            Y = alpha * A' B' + beta * C: the columns of B' (rows of B when transB=1);
                    C becomes ``(beta * C - mean) * s + beta_bn`` and the Gemm's beta 1.
    MatMul [+ Add]  Y = A B (+ b) with 2-D output (N, C) and constant 2-D B: BatchNorm's axis 1
                    is then the last axis; the columns of B and the Add's constant (an Add is
                    created when there is none).

A BatchNorm with nothing to fold into (its input is a graph input or comes from another op, or
from a MatMul whose output is not 2-D) becomes ``Mul(x, s) -> Add(t)`` with constants shaped
``(C, 1, ..., 1)`` to broadcast on axis 1 (option ``standalone=False`` keeps it instead).

Declined, with the reason logged and listed in ``info["declined"]`` (the BatchNorm is kept):
    - training-mode BatchNorm (``training_mode=1`` or running-statistics outputs in use);
    - BatchNorm parameters, or the op's weight or bias, not constant;
    - the weight read by another node too (scaling it would change that node);
    - the op's output also read by another node or a graph output (that reader would see the
      scaled values).

Limits: one BatchNorm folds into one op; a BatchNorm after an op already folded in this run is
converted to Mul+Add rather than folded again (run the pass twice to fold chains).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from edgecc.passes.graph import (
    GraphIndex,
    attr,
    const_value,
    infer_types,
    refresh_shapes,
    remove_dead_nodes,
    remove_if_unused,
    set_const_input,
    static_shape,
    value_consumers,
    why_unchanged,
)
from edgecc.passes.manager import PassContext, PassResult, register

logger = logging.getLogger(__name__)


@dataclass
class _Target:
    """The linear op a BatchNorm folds into (and, for MatMul, its bias Add)."""

    node: onnx.NodeProto
    add: onnx.NodeProto | None = None
    add_const: int = 1  # which input of ``add`` is the constant bias

    @property
    def last(self) -> onnx.NodeProto:
        """The node whose output the BatchNorm reads."""
        return self.add or self.node


class _Decline(Exception):
    """A rewrite is not safe; the message is the reason."""


def _name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


@register("fold-bn")
class FoldBatchNorm:
    """Fold BatchNormalization into Conv/ConvTranspose/Gemm/MatMul; else make it Mul+Add.

    Args:
        standalone: turn a BatchNorm with nothing to fold into into a per-channel Mul+Add.
    """

    def __init__(self, standalone: bool = True):
        self.standalone = standalone

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        index = GraphIndex(model)
        types = infer_types(model)
        info: dict[str, Any] = {"folded": [], "converted": [], "declined": []}
        replace: dict[int, list[onnx.NodeProto]] = {}
        orphaned: set[str] = set()
        for bn in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
            try:
                scale, shift = self._affine(bn, index, types)
                target = self._match(bn, index, types)
                if target is None and not self.standalone:
                    continue
                if target is None:
                    replace[id(bn)] = self._to_mul_add(bn, scale, shift, index, types)
                    info["converted"].append(_name(bn))
                else:
                    replace[id(bn)], old = self._fold(bn, target, scale, shift, index, types)
                    orphaned |= old
                    info["folded"].append(
                        {"bn": _name(bn), "into": _name(target.node), "op": target.node.op_type}
                    )
            except _Decline as why:
                logger.info("fold-bn: %s left as is: %s", _name(bn), why)
                info["declined"].append({"node": _name(bn), "reason": str(why)})
                continue
            orphaned.update(bn.input[1:])
        if not replace:
            why = (
                why_unchanged(model, "fold-bn", info["declined"], "")
                if info["declined"]
                else "no BatchNormalization in the graph"
            )
            return PassResult(model, False, info, reason=why)
        nodes = [new for n in model.graph.node for new in replace.get(id(n), [n])]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        remove_if_unused(model, orphaned | remove_dead_nodes(model, orphaned))
        refresh_shapes(model)
        return PassResult(model, True, info)

    @staticmethod
    def _affine(
        bn: onnx.NodeProto, index: GraphIndex, types: dict[str, onnx.TypeProto]
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(s, t)`` with ``BN(x) = x * s + t`` per channel, in float64."""
        if attr(bn, "training_mode", 0) or any(index.uses(o) for o in bn.output[1:] if o):
            raise _Decline("training-mode BatchNorm (running-statistics outputs are used)")
        params = [const_value(index, name, types) for name in bn.input[1:5]]
        if any(p is None for p in params):
            raise _Decline("BatchNorm parameters are not constant")
        gamma, beta, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)
        scale = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
        return scale, beta - mean * scale

    @staticmethod
    def _match(
        bn: onnx.NodeProto, index: GraphIndex, types: dict[str, onnx.TypeProto]
    ) -> _Target | None:
        """The op to fold into, None when there is none; raises :class:`_Decline` if unsafe."""
        x = bn.input[0]
        node = index.producer.get(x)
        target = None
        if node is not None and node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            target = _Target(node)
        elif node is not None and node.op_type in ("MatMul", "Add"):
            target = _matmul_target(node, index, types)
        if target is None:
            return None
        op = target.node.op_type
        if x in index.graph_outputs:
            raise _Decline(f"the {op} output {x!r} is a graph output; folding would change it")
        readers = [n for n in value_consumers(index, x) if n is not bn]
        if readers:
            raise _Decline(
                f"the {op} output {x!r} is also read by {', '.join(_name(n) for n in readers)}"
            )
        weight = target.node.input[1]
        if const_value(index, weight, types) is None:
            raise _Decline(f"the {op} weight {weight!r} is not constant")
        sharers = [n for n in value_consumers(index, weight) if n is not target.node]
        if sharers or weight in index.graph_outputs:
            raise _Decline(
                f"the {op} weight {weight!r} is shared with "
                f"{', '.join(_name(n) for n in sharers) or 'a graph output'}"
            )
        bias = target.node.input[2] if len(target.node.input) > 2 else ""
        if bias and const_value(index, bias, types) is None:
            raise _Decline(f"the {op} bias {bias!r} is not constant")
        return target

    @staticmethod
    def _fold(
        bn: onnx.NodeProto,
        target: _Target,
        scale: np.ndarray,
        shift: np.ndarray,
        index: GraphIndex,
        types: dict[str, onnx.TypeProto],
    ) -> tuple[list[onnx.NodeProto], set[str]]:
        """Scale the target's weight and bias so it computes the BatchNorm's output.

        Returns the nodes replacing the BatchNorm (none, or a bias Add for a bias-free MatMul)
        and the tensor names the rewrite stopped reading.
        """
        node = target.node
        weight = const_value(index, node.input[1], types)
        w64 = weight.astype(np.float64)
        if node.op_type == "Conv":
            channels = weight.shape[0]
            w64 = w64 * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        elif node.op_type == "ConvTranspose":
            groups = int(attr(node, "group", 1))
            channels = weight.shape[1] * groups
            grouped = w64.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
            w64 = (grouped * scale.reshape(groups, 1, -1, 1)).reshape(weight.shape)
        elif node.op_type == "Gemm":
            trans_b = int(attr(node, "transB", 0))
            channels = weight.shape[0 if trans_b else 1]
            w64 = w64 * (scale[:, None] if trans_b else scale[None, :])
        else:  # MatMul, 2-D constant weight (K, N)
            channels = weight.shape[1]
            w64 = w64 * scale[None, :]
        if channels != scale.size:
            raise _Decline(f"{scale.size} BatchNorm channels but {channels} output channels")
        old = set(node.input[1:])
        set_const_input(index, node, 1, w64.astype(weight.dtype), f"{node.name or 'w'}_folded")
        if target.add is not None:  # b' = b * s + shift, shift = beta - mean * s
            pos = target.add_const
            bias = const_value(index, target.add.input[pos], types)
            old.add(target.add.input[pos])
            set_const_input(
                index,
                target.add,
                pos,
                (bias.astype(np.float64) * scale + shift).astype(bias.dtype),
                f"{target.add.name or 'bias'}_folded",
            )
        elif node.op_type == "MatMul":
            bias = index.add_initializer(f"{bn.name or 'bn'}_bias", shift.astype(weight.dtype))
            add = index.make_node("Add", [bn.input[0], bias], [bn.output[0]], f"{bn.name}_add")
            return [add], old - set(node.input)
        else:
            _fold_bias(node, index, types, scale, shift, weight.dtype)
        _take_over(target.last.output[0], bn.output[0], target.last, index)
        return [], old - set(node.input)

    @staticmethod
    def _to_mul_add(
        bn: onnx.NodeProto,
        scale: np.ndarray,
        shift: np.ndarray,
        index: GraphIndex,
        types: dict[str, onnx.TypeProto],
    ) -> list[onnx.NodeProto]:
        """``Mul(x, s) -> Add(t)`` with constants broadcasting on axis 1."""
        shape = static_shape(types, bn.input[0])
        if shape is None or len(shape) < 2:
            raise _Decline(
                "the input rank is unknown, so the per-channel constants cannot be shaped"
            )
        dtype = helper.tensor_dtype_to_np_dtype(types[bn.input[0]].tensor_type.elem_type)
        bshape = (-1,) + (1,) * (len(shape) - 2)
        s = index.add_initializer(f"{bn.name or 'bn'}_scale", scale.astype(dtype).reshape(bshape))
        t = index.add_initializer(f"{bn.name or 'bn'}_shift", shift.astype(dtype).reshape(bshape))
        mid = index.unique(f"{bn.output[0]}_scaled")
        return [
            index.make_node("Mul", [bn.input[0], s], [mid], f"{bn.name}_mul"),
            index.make_node("Add", [mid, t], [bn.output[0]], f"{bn.name}_add"),
        ]


def _matmul_target(
    node: onnx.NodeProto, index: GraphIndex, types: dict[str, onnx.TypeProto]
) -> _Target | None:
    """MatMul with a constant 2-D weight and 2-D output, possibly followed by a constant Add."""
    add, pos = None, 1
    if node.op_type == "Add":
        add = node
        for pos in (1, 0):
            mm = index.producer.get(add.input[1 - pos])
            if (
                mm is not None
                and mm.op_type == "MatMul"
                and const_value(index, add.input[pos], types) is not None
            ):
                break
        else:
            return None
        out = mm.output[0]
        if out in index.graph_outputs or value_consumers(index, out) != [add]:
            raise _Decline(f"the MatMul output {out!r} is also read outside its bias Add")
        bias = const_value(index, add.input[pos], types)
        if bias.ndim > 2 or (bias.ndim and bias.shape[-1] not in (1, _last_dim(mm, types))):
            return None
        node = mm
    weight = const_value(index, node.input[1], types)
    shape = static_shape(types, node.output[0])
    if weight is None or weight.ndim != 2 or shape is None or len(shape) != 2:
        return None  # BatchNorm's axis 1 is not the MatMul's output channel
    return _Target(node, add, pos)


def _last_dim(node: onnx.NodeProto, types: dict[str, onnx.TypeProto]) -> int | None:
    shape = static_shape(types, node.output[0])
    return shape[-1] if shape else None


def _fold_bias(
    node: onnx.NodeProto,
    index: GraphIndex,
    types: dict[str, onnx.TypeProto],
    scale: np.ndarray,
    shift: np.ndarray,
    dtype: np.dtype,
) -> None:
    """Conv/ConvTranspose/Gemm bias: ``b' = b * s + shift`` (created when absent)."""
    has_bias = len(node.input) > 2 and node.input[2]
    bias = const_value(index, node.input[2], types) if has_bias else np.zeros((), dtype)
    b64 = bias.astype(np.float64)
    if node.op_type == "Gemm":
        b64 = b64 * float(attr(node, "beta", 1.0)) if has_bias else b64
        for a in node.attribute:
            if a.name == "beta":
                a.f = 1.0
    new = (b64 * scale + shift).astype(bias.dtype)
    set_const_input(index, node, 2, new, f"{node.name or 'b'}_bias_folded")


def _take_over(old: str, bn_out: str, writer: onnx.NodeProto, index: GraphIndex) -> None:
    """``writer`` (output ``old``) now computes the BatchNorm's output ``bn_out``.

    Its tensor keeps the op's own name (``.../Conv_output_0``, not ``.../BatchNormalization_
    output_0``) and the BatchNorm's readers are rewired, unless ``bn_out`` is a graph output or
    read inside a subgraph: those names must not change, so ``writer`` writes ``bn_out``.
    """
    subgraph_reads = {
        i
        for n in index.graph.node
        for a in n.attribute
        if a.type == onnx.AttributeProto.GRAPH
        for sn in a.g.node
        for i in sn.input
    }
    if bn_out in index.graph_outputs or bn_out in subgraph_reads:
        _redirect(old, bn_out, writer, index)
        return
    for reader in index.consumers.get(bn_out, []):
        reader.input[:] = [old if i == bn_out else i for i in reader.input]


def _redirect(old: str, new: str, writer: onnx.NodeProto, index: GraphIndex) -> None:
    """``writer`` now writes ``new``; readers of ``old``'s shape or type read ``new`` instead."""
    writer.output[0] = new
    for reader in index.consumers.get(old, []):
        reader.input[:] = [new if i == old else i for i in reader.input]
