"""Channel dependency analysis for structured pruning (analysis only; ``prune`` rewrites).

Model (Torch-Pruning's DepGraph idea, on ONNX). A *channel space* is one tensor's channel axis:
axis 1 of a Conv/Gemm output, the last axis of a MatMul output, and wherever ops move that axis.
Spaces are the nodes of a networkx graph; an edge (:class:`Link`) couples two spaces whose
channels must be removed together, with an index map: channel block ``j`` of ``a`` (``block_a``
channels) goes with block ``j`` of ``b`` (``block_b`` channels, after ``offset_b``). Connected
components are the *groups*. Inside a group, a union-find over single channels splits it into
*atoms*: the sets of channels (one or more per space) that can only go together.

Coupling rules (x the data input, y the output):
    Conv/ConvTranspose, group 1   none: y's channels are W's axis 0 (axis 1 for ConvTranspose) and
                                  the bias; x's channels are W's other channel axis.
    grouped Conv (depthwise too)  x's group j (C_in/g channels) <-> y's group j (C_out/g): whole
                                  groups go and the ``group`` attribute shrinks.
    Gemm (transA 0) / MatMul      constant 2-D weight: y's last axis is B's output axis, x's last
                                  axis B's K axis (channels on another axis of x, e.g. after a
                                  Transpose, are contracted or batched: locked, even when the
                                  sizes happen to match); Gemm's C is an operand of y.
    Add Sub Mul Div Pow Max Min   operands with the channel dim <-> y, aligned from the right as
    Sum Mean PRelu Where ...      numpy broadcasts; size-1 dims broadcast and are left alone;
                                  constant operands are sliced.
    Concat on the channel axis    input i <-> y's channels [o_i, o_i + C_i) (constants sliced);
                                  on another axis every input <-> y.
    unary ops, Clip, Dropout,     x <-> y on the same axis; BatchNormalization and
    BatchNormalization, pooling,  InstanceNormalization parameters are sliced, Resize ``sizes``
    Resize, Pad, Softmax ...      rewritten; Pad must not pad channels, Softmax must not run
                                  over them, Resize must not scale them.
    Transpose, Squeeze, Unsqueeze,
    Reduce* over other axes       x <-> y with the axis moved.
    Flatten / flattening Reshape  (N, C, d...) -> (N, C * prod(d)): channel c <-> features
                                  [c * prod(d), (c+1) * prod(d)) (the Reshape target becomes
                                  ``[N, -1]``), so a following Gemm/MatMul loses whole blocks.

Locks. A group is left whole, with the reasons, when one of its spaces is a graph input or
output (their shapes are the model's interface), is read by an op without a rule, by ``Shape``
or ``Size``, or inside a subgraph, has an unknown channel count, or a rule's precondition fails
(non-constant weight, unknown shapes, Softmax over channels, ...). A group with no
Conv/Gemm/MatMul whose output channels live in it has nothing to cut. Everything a rewrite must
touch is listed as data: :class:`ParamSlice` (constant inputs indexed by a space),
:class:`GroupUpdate` (``group`` attributes), :class:`ShapeInput` (Reshape targets, Resize sizes).

Limits: Split, Slice or Gather on the channel axis, LayerNorm/GroupNorm, channel shuffles and
attention reshapes lock their groups; grouped convolutions are pruned a whole group at a time.
Results are cached per graph (keyed by its serialized bytes), so repeated calls are free until
the graph changes.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx

from edgecc.passes.graph import (
    META_INPUTS,
    GraphIndex,
    attr,
    const_value,
    infer_types,
    static_shape,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Space:
    """The channel axis of one tensor: ``size`` channels (None when not static)."""

    tensor: str
    axis: int
    size: int | None


@dataclass(frozen=True)
class Link:
    """Block ``j`` of ``a`` (``block_a`` channels) goes with block ``j`` of ``b`` (``block_b``
    channels, counted from ``offset_b``); ``node`` is the op that couples them."""

    a: str
    b: str
    node: int
    block_a: int = 1
    block_b: int = 1
    offset_b: int = 0


@dataclass(frozen=True)
class ParamSlice:
    """Constant input ``input`` of node ``node`` is indexed on ``axis`` by ``space``'s channels.

    Only channels ``[start, stop)`` of the space fall in this constant (Concat of a constant).
    ``role`` is ``weight_out`` (the producer's output channels: importance comes from these),
    ``weight_in``, ``bias``, ``gamma`` (a BatchNorm scale) or ``param``.
    """

    node: int
    input: int
    axis: int
    space: str
    role: str
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class GroupUpdate:
    """Node ``node``'s ``group`` attribute becomes ``kept(space) // per_group``."""

    node: int
    space: str
    per_group: int


@dataclass(frozen=True)
class ShapeInput:
    """Input ``input`` of ``node`` becomes the int64 constant ``value``, with the kept channel
    count of ``space`` written at ``position`` when that is not None (Resize ``sizes``)."""

    node: int
    input: int
    value: tuple[int, ...]
    space: str
    position: int | None = None


@dataclass
class ChannelGroup:
    """A connected component of coupled channel spaces.

    Attributes:
        id: index in :attr:`ChannelAnalysis.groups`.
        spaces: tensor names of the member spaces, in discovery order.
        sources: names of the nodes whose output channels live in the group.
        reasons: why the group must stay whole (empty when it can be pruned).
        atoms: for prunable groups, tensor -> atom id of each of its channels.
        n_atoms: number of atoms (the group's prunable units).
    """

    id: int
    spaces: list[str]
    sources: list[str]
    reasons: list[str]
    atoms: dict[str, np.ndarray] = field(default_factory=dict)
    n_atoms: int = 0

    @property
    def prunable(self) -> bool:
        """True when the group has channels to cut and nothing locks it."""
        return not self.reasons


@dataclass
class ChannelAnalysis:
    """The result of :func:`analyse`: spaces, groups and what a rewrite must touch."""

    spaces: dict[str, Space]
    graph: nx.Graph
    groups: list[ChannelGroup]
    group_of: dict[str, int]
    slices: list[ParamSlice]
    group_updates: list[GroupUpdate]
    shape_inputs: list[ShapeInput]
    node_names: list[str]


_CACHE: OrderedDict[str, ChannelAnalysis] = OrderedDict()
_CACHE_SIZE = 4


def analyse(model: onnx.ModelProto) -> ChannelAnalysis:
    """Channel spaces, groups and atoms of ``model`` (cached until the graph changes)."""
    key = hashlib.sha256(model.graph.SerializeToString()).hexdigest()
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    result = _Builder(model).run()
    _CACHE[key] = result
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


_UNARY = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Softplus",
        "Softsign",
        "Mish",
        "Erf",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
        "Neg",
        "Abs",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Sin",
        "Cos",
        "Identity",
        "Cast",
        "Dropout",
        "Clip",
        "ThresholdedRelu",
        "Shrink",
        "Not",
        "IsNaN",
        "IsInf",
        "CastLike",
    }
)
_SPATIAL = frozenset(
    {
        "MaxPool",
        "AveragePool",
        "LpPool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "GlobalLpPool",
        "BatchNormalization",
        "InstanceNormalization",
        "Resize",
        "Upsample",
        "Pad",
    }
)
_ELEMENTWISE = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "PRelu",
        "Where",
        "Equal",
        "Greater",
        "Less",
        "GreaterOrEqual",
        "LessOrEqual",
        "And",
        "Or",
        "Xor",
        "Mod",
    }
)
_REDUCE = frozenset(
    {
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        "ReduceSum",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    }
)


class _Builder:
    """Discovers spaces from every Conv/Gemm/MatMul output and follows the coupling rules."""

    def __init__(self, model: onnx.ModelProto):
        self.index = GraphIndex(model)
        self.types = infer_types(model)
        self.nodes = list(model.graph.node)
        self.position = {id(n): i for i, n in enumerate(self.nodes)}
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18
        )
        self.subgraph_reads = {
            i
            for n in self.nodes
            for a in n.attribute
            if a.type == onnx.AttributeProto.GRAPH
            for sn in a.g.node
            for i in sn.input
        }
        self.spaces: dict[str, Space] = {}
        self.locks: dict[str, list[str]] = {}
        self.links: list[Link] = []
        self.slices: dict[ParamSlice, None] = {}  # ordered sets
        self.updates: dict[GroupUpdate, None] = {}
        self.shape_inputs: dict[ShapeInput, None] = {}
        self.queue: deque[str] = deque()
        self.visited: set[tuple[int, str]] = set()
        self._consts: dict[str, np.ndarray | None] = {}
        self.rules: dict[str, Callable[[onnx.NodeProto, str], None]] = {
            "Conv": self._conv,
            "ConvTranspose": self._conv,
            "Gemm": self._gemm,
            "MatMul": self._matmul,
            "Concat": self._concat,
            "Flatten": self._flatten,
            "Reshape": self._reshape,
            "Transpose": self._transpose,
            "Squeeze": self._squeeze,
            "Unsqueeze": self._unsqueeze,
            "Softmax": self._softmax,
            "LogSoftmax": self._softmax,
            "Hardmax": self._softmax,
            **dict.fromkeys(_UNARY, self._unary),
            **dict.fromkeys(_SPATIAL, self._spatial),
            **dict.fromkeys(_ELEMENTWISE, self._elementwise),
            **dict.fromkeys(_REDUCE, self._reduce),
        }

    # -- bookkeeping ----------------------------------------------------------------------

    def name(self, node: onnx.NodeProto) -> str:
        return node.name or f"{node.op_type}#{self.position[id(node)]}"

    def shape(self, tensor: str) -> list[int | str | None] | None:
        return static_shape(self.types, tensor)

    def const(self, tensor: str) -> np.ndarray | None:
        if tensor not in self._consts:
            self._consts[tensor] = const_value(self.index, tensor, self.types)
        return self._consts[tensor]

    def lock(self, tensor: str, reason: str) -> None:
        reasons = self.locks.setdefault(tensor, [])
        if reason not in reasons:
            reasons.append(reason)

    def add_space(self, tensor: str, axis: int) -> bool:
        """Make ``tensor``'s axis ``axis`` a space (queued for its producer and consumers)."""
        if tensor in self.spaces:
            if self.spaces[tensor].axis != axis:
                self.lock(
                    tensor,
                    f"{tensor!r} carries channels on axes {self.spaces[tensor].axis} and {axis}",
                )
            return False
        shape = self.shape(tensor)
        size = shape[axis] if shape is not None and 0 <= axis < len(shape) else None
        self.spaces[tensor] = Space(tensor, axis, size if isinstance(size, int) else None)
        if not isinstance(size, int):
            self.lock(tensor, f"the channel count of {tensor!r} is unknown")
        if tensor in self.index.graph_inputs:
            self.lock(tensor, f"{tensor!r} is a graph input")
        if tensor in self.index.graph_outputs:
            self.lock(tensor, f"{tensor!r} is a graph output")
        if tensor in self.subgraph_reads:
            self.lock(tensor, f"{tensor!r} is read inside a subgraph")
        self.queue.append(tensor)
        return True

    def link(
        self,
        a: str,
        b: str,
        node: onnx.NodeProto,
        block_a: int = 1,
        block_b: int = 1,
        offset_b: int = 0,
    ) -> None:
        self.links.append(Link(a, b, self.position[id(node)], block_a, block_b, offset_b))

    def param(
        self,
        node: onnx.NodeProto,
        k: int,
        axis: int,
        space: str,
        role: str,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        """Record that constant input ``k`` of ``node`` is indexed on ``axis`` by ``space``."""
        value = self.const(node.input[k])
        if value is None:
            self.lock(space, f"input {k} ({node.input[k]!r}) of {self.name(node)} is not constant")
            return
        want = (stop - start) if stop is not None else self.spaces[space].size
        if value.ndim <= axis or value.shape[axis] != want:
            self.lock(
                space,
                f"input {k} of {self.name(node)} has shape {list(value.shape)}, "
                f"not {want} channels on axis {axis}",
            )
            return
        self.slices[ParamSlice(self.position[id(node)], k, axis, space, role, start, stop)] = None

    def operand(
        self,
        node: onnx.NodeProto,
        k: int,
        out: str,
        out_axis: int,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        """Couple input ``k`` of ``node`` with ``out``'s channels (numpy broadcasting)."""
        name = node.input[k]
        shape, out_shape = self.shape(name), self.shape(out)
        if shape is None or out_shape is None:
            self.lock(out, f"input {k} of {self.name(node)} has an unknown shape")
            return
        axis = out_axis - (len(out_shape) - len(shape))
        if axis < 0 or shape[axis] == 1:
            return  # broadcast along the channels: nothing to slice
        if self.const(name) is not None:
            self.param(node, k, axis, out, "param", start, stop)
        else:
            self.add_space(name, axis)
            self.link(name, out, node, offset_b=start)

    # -- driver ---------------------------------------------------------------------------

    def run(self) -> ChannelAnalysis:
        for node in self.nodes:
            self._seed(node)
        while self.queue:
            tensor = self.queue.popleft()
            producer = self.index.producer.get(tensor)
            if producer is not None:
                self.visit(producer, tensor)
            readers = {id(n): n for n in self.index.consumers.get(tensor, [])}
            for node in readers.values():
                self.visit(node, tensor)
        return self._groups()

    def _seed(self, node: onnx.NodeProto) -> None:
        """Every Conv/ConvTranspose/Gemm/MatMul with a constant weight opens a space."""
        op = node.op_type
        if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.domain not in (
            "",
            "ai.onnx",
        ):
            return
        weight = self.const(node.input[1])
        shape = self.shape(node.output[0])
        if weight is None or shape is None:
            return
        if op == "MatMul" and weight.ndim == 2:
            self.add_space(node.output[0], len(shape) - 1)
        elif op in ("Conv", "ConvTranspose") or (op == "Gemm" and not attr(node, "transA", 0)):
            self.add_space(node.output[0], 1)

    def visit(self, node: onnx.NodeProto, tensor: str) -> None:
        key = (self.position[id(node)], tensor)
        if key in self.visited:
            return
        self.visited.add(key)
        positions = [k for k, i in enumerate(node.input) if i == tensor]
        if tensor not in node.output and all((node.op_type, k) in META_INPUTS for k in positions):
            if node.op_type != "CastLike":  # CastLike reads only the element type
                self.lock(tensor, f"{self.name(node)} ({node.op_type}) reads the channel count")
            return
        rule = self.rules.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            self.lock(tensor, f"{self.name(node)}: no channel rule for op {node.op_type}")
            return
        rule(node, tensor)

    # -- rules ----------------------------------------------------------------------------

    def _conv(self, node: onnx.NodeProto, t: str) -> None:
        x, y = node.input[0], node.output[0]
        transpose = node.op_type == "ConvTranspose"
        weight = self.const(node.input[1])
        if t not in (x, y):
            self.lock(t, f"{t!r} is the weight or bias of {self.name(node)}")
            return
        if weight is None or self.spaces[t].axis != 1:
            self.lock(t, f"{self.name(node)}: weight not constant or channels not on axis 1")
            return
        groups = int(attr(node, "group", 1))
        c_in = weight.shape[0] if transpose else weight.shape[1] * groups
        c_out = weight.shape[1] * groups if transpose else weight.shape[0]
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if groups == 1:
            if t == y:
                self.param(node, 1, 1 if transpose else 0, y, "weight_out")
                if has_bias:
                    self.param(node, 2, 0, y, "bias")
            else:
                self.param(node, 1, 0 if transpose else 1, x, "weight_in")
            return
        self.add_space(x, 1)
        self.add_space(y, 1)
        self.link(x, y, node, c_in // groups, c_out // groups)
        if transpose:
            self.param(node, 1, 0, x, "weight_in")
        else:
            self.param(node, 1, 0, y, "weight_out")
        if has_bias:
            self.param(node, 2, 0, y, "bias")
        per_group = c_in // groups if transpose else c_out // groups
        self.updates[GroupUpdate(self.position[id(node)], x if transpose else y, per_group)] = None

    def _gemm(self, node: onnx.NodeProto, t: str) -> None:
        a, b, y = node.input[0], node.input[1], node.output[0]
        trans_b = int(attr(node, "transB", 0))
        if attr(node, "transA", 0) or t == b or self.const(b) is None:
            self.lock(t, f"{self.name(node)}: transA=1, or the weight is not constant")
            return
        if t == a:
            if self.spaces[t].axis != 1:  # Gemm contracts A's axis 1; axis 0 is the batch
                self.lock(t, f"{self.name(node)} contracts or batches over {t!r}'s channel axis")
                return
            self.param(node, 1, 1 if trans_b else 0, a, "weight_in")
            return
        self.add_space(y, 1)
        self.param(node, 1, 0 if trans_b else 1, y, "weight_out")
        if len(node.input) > 2 and node.input[2]:
            self.operand(node, 2, y, 1)

    def _matmul(self, node: onnx.NodeProto, t: str) -> None:
        a, b = node.input[0], node.input[1]
        weight = self.const(b)
        shape = self.shape(t)
        if t == b or weight is None or weight.ndim != 2:
            self.lock(t, f"{self.name(node)}: the right operand is not a constant 2-D weight")
            return
        if shape is None or self.spaces[t].axis != len(shape) - 1:
            self.lock(t, f"{self.name(node)} contracts or batches over {t!r}'s channel axis")
            return
        if t == a:
            self.param(node, 1, 0, a, "weight_in")
        else:
            self.param(node, 1, 1, t, "weight_out")

    def _same(self, node: onnx.NodeProto, t: str) -> tuple[str, str] | None:
        """Couple data input 0 and output 0 on the same axis; None (and a lock) if impossible."""
        x, y = node.input[0], node.output[0]
        if t not in (x, y):
            self.lock(t, f"{t!r} enters {self.name(node)} as a secondary input")
            return None
        if any(self.index.uses(o) for o in node.output[1:] if o):
            self.lock(t, f"{self.name(node)}: a secondary output is used")
            return None
        shape_x, shape_y = self.shape(x), self.shape(y)
        if shape_x is None or shape_y is None or len(shape_x) != len(shape_y):
            self.lock(t, f"{self.name(node)}: ranks unknown or different")
            return None
        self.add_space(x, self.spaces[t].axis)
        self.add_space(y, self.spaces[t].axis)
        self.link(x, y, node)
        return x, y

    def _unary(self, node: onnx.NodeProto, t: str) -> None:
        extras = [] if node.op_type == "CastLike" else node.input[1:]
        for extra in extras:
            shape = self.shape(extra) if extra else []
            if shape is None or math.prod(d if isinstance(d, int) else 2 for d in shape) != 1:
                self.lock(t, f"{self.name(node)}: input {extra!r} is not a scalar")
                return
        self._same(node, t)

    def _spatial(self, node: onnx.NodeProto, t: str) -> None:
        op = node.op_type
        if self.spaces[t].axis != 1:
            self.lock(
                t, f"{self.name(node)} treats axis 1 as channels, not axis {self.spaces[t].axis}"
            )
            return
        pair = self._same(node, t)
        if pair is None:
            return
        x, y = pair
        if op in ("BatchNormalization", "InstanceNormalization"):
            for k in range(1, len(node.input)):
                self.param(node, k, 0, x, "gamma" if k == 1 else "param")
        elif op in ("Resize", "Upsample"):
            self._resize(node, y)
        elif op == "Pad":
            self._pad(node, y)

    def _resize(self, node: onnx.NodeProto, y: str) -> None:
        scales_at = 1 if node.op_type == "Upsample" else 2
        inputs = list(node.input) + [""] * 4
        if inputs[scales_at]:
            scales = self.const(inputs[scales_at])
            if scales is None or (scales.size and scales.reshape(-1)[1] != 1):
                self.lock(y, f"{self.name(node)} scales the channel axis (or scales unknown)")
        if node.op_type == "Resize" and inputs[3]:
            sizes = self.const(inputs[3])
            if sizes is None or attr(node, "axes") is not None:
                self.lock(y, f"{self.name(node)}: sizes not constant, or given per axis")
            else:
                value = tuple(int(v) for v in sizes.reshape(-1))
                self.shape_inputs[ShapeInput(self.position[id(node)], 3, value, y, 1)] = None

    def _pad(self, node: onnx.NodeProto, y: str) -> None:
        rank = len(self.shape(y))
        pads = attr(node, "pads") if len(node.input) < 2 else self.const(node.input[1])
        axes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes.reshape(-1)]
        if pads is None:
            self.lock(y, f"{self.name(node)}: pads not constant")
            return
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        if 1 in axes:
            i = axes.index(1)
            if pads[i] or pads[i + len(axes)]:
                self.lock(y, f"{self.name(node)} pads the channel axis")

    def _elementwise(self, node: onnx.NodeProto, t: str) -> None:
        y = node.output[0]
        out_shape, shape = self.shape(y), self.shape(t)
        if out_shape is None or shape is None:
            self.lock(t, f"{self.name(node)}: shapes unknown")
            return
        axis = self.spaces[t].axis + len(out_shape) - len(shape)
        if t != y and self.spaces[t].size == 1 and out_shape[axis] != 1:
            return  # t's single channel broadcasts over y's channels: no coupling
        self.add_space(y, axis)
        for k, name in enumerate(node.input):
            if name:
                self.operand(node, k, y, axis)

    def _concat(self, node: onnx.NodeProto, t: str) -> None:
        y = node.output[0]
        out_shape = self.shape(y)
        axis = self.spaces[t].axis
        if out_shape is None:
            self.lock(t, f"{self.name(node)}: output shape unknown")
            return
        self.add_space(y, axis)
        if int(attr(node, "axis")) % len(out_shape) != axis:
            for k in range(len(node.input)):
                self.operand(node, k, y, axis)
            return
        offset = 0
        for k, name in enumerate(node.input):
            shape = self.shape(name)
            size = shape[axis] if shape else None
            if not isinstance(size, int):
                self.lock(y, f"{self.name(node)}: size of input {name!r} unknown")
                return
            self.operand(node, k, y, axis, offset, offset + size)
            offset += size

    def _flatten(self, node: onnx.NodeProto, t: str) -> None:
        x, y = node.input[0], node.output[0]
        shape = self.shape(x)
        if shape is None:
            self.lock(t, f"{self.name(node)}: input shape unknown")
            return
        start = int(attr(node, "axis", 1)) % max(len(shape), 1)
        axis = self.spaces[t].axis
        if (t == x and axis != start) or (t == y and axis != 1):
            self.lock(t, f"{self.name(node)} merges the channel axis with the axes before it")
            return
        self._merge(node, x, y, start, shape)

    def _reshape(self, node: onnx.NodeProto, t: str) -> None:
        x, y = node.input[0], node.output[0]
        shape, out_shape = self.shape(x), self.shape(y)
        axis = self.spaces[t].axis
        merged = shape[axis:] if shape is not None else [None]
        if (
            shape is None
            or out_shape is None
            or len(out_shape) != axis + 1
            or out_shape[:axis] != shape[:axis]
            or not all(isinstance(d, int) for d in merged)
            or out_shape[axis] != math.prod(merged)
        ):
            self.lock(
                t, f"{self.name(node)} is not a flatten of the channel axis and the axes after it"
            )
            return
        target = [d if isinstance(d, int) else 0 for d in out_shape[:axis]] + [-1]
        if attr(node, "allowzero", 0) and 0 in target:
            self.lock(t, f"{self.name(node)}: allowzero=1 with dynamic leading dims")
            return
        if self._merge(node, x, y, axis, shape):
            self.shape_inputs[ShapeInput(self.position[id(node)], 1, tuple(target), y)] = None

    def _merge(
        self, node: onnx.NodeProto, x: str, y: str, axis: int, shape: list[int | str | None]
    ) -> bool:
        """Couple channel c of x (axis ``axis``) with y's features [c*B, (c+1)*B)."""
        tail = shape[axis + 1 :]
        if not all(isinstance(d, int) for d in tail):
            self.lock(y, f"{self.name(node)}: spatial dims unknown")
            return False
        self.add_space(x, axis)
        self.add_space(y, axis if node.op_type == "Reshape" else 1)
        self.link(x, y, node, 1, math.prod(tail))
        return True

    def _move(self, node: onnx.NodeProto, t: str, mapping: dict[int, int]) -> None:
        """Couple x and y where x's axis i is y's axis ``mapping[i]`` (others vanish)."""
        x, y = node.input[0], node.output[0]
        axis = self.spaces[t].axis
        if t == x:
            other = mapping.get(axis)
        else:
            other = next((i for i, o in mapping.items() if o == axis), None)
        if other is None or t not in (x, y):
            self.lock(t, f"{self.name(node)} removes or mixes the channel axis")
            return
        self.add_space(x, axis if t == x else other)
        self.add_space(y, other if t == x else axis)
        self.link(x, y, node)

    def _axes(self, node: onnx.NodeProto, rank: int) -> list[int] | None:
        """The ``axes`` attribute or constant input 1, normalised; None if not constant."""
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = self.const(node.input[1])
            if value is None:
                return None
            axes = value.reshape(-1).tolist()
        return sorted(int(a) % rank for a in axes or [])

    def _reduce(self, node: onnx.NodeProto, t: str) -> None:
        rank = len(self.shape(node.input[0]) or [])
        axes = self._axes(node, max(rank, 1))
        if not rank or axes is None:
            self.lock(t, f"{self.name(node)}: rank or axes unknown")
            return
        if not axes and not attr(node, "noop_with_empty_axes", 0):
            axes = list(range(rank))
        kept = [i for i in range(rank) if i not in axes]
        keepdims = attr(node, "keepdims", 1)
        self._move(node, t, {i: (i if keepdims else j) for j, i in enumerate(kept)})

    def _squeeze(self, node: onnx.NodeProto, t: str) -> None:
        shape = self.shape(node.input[0])
        axes = self._axes(node, max(len(shape or []), 1))
        if shape is None or axes is None:
            self.lock(t, f"{self.name(node)}: shape or axes unknown")
            return
        axes = axes or [i for i, d in enumerate(shape) if d == 1]
        kept = [i for i in range(len(shape)) if i not in axes]
        self._move(node, t, {i: j for j, i in enumerate(kept)})

    def _unsqueeze(self, node: onnx.NodeProto, t: str) -> None:
        out_shape = self.shape(node.output[0])
        axes = self._axes(node, max(len(out_shape or []), 1))
        if out_shape is None or axes is None:
            self.lock(t, f"{self.name(node)}: shape or axes unknown")
            return
        kept = [i for i in range(len(out_shape)) if i not in axes]
        self._move(node, t, dict(enumerate(kept)))

    def _transpose(self, node: onnx.NodeProto, t: str) -> None:
        rank = len(self.shape(node.input[0]) or [])
        perm = attr(node, "perm") or list(reversed(range(rank)))
        self._move(node, t, {p: i for i, p in enumerate(perm)})

    def _softmax(self, node: onnx.NodeProto, t: str) -> None:
        shape = self.shape(t)
        axis = int(attr(node, "axis", -1)) % max(len(shape or []), 1)
        if shape is None or axis == self.spaces[t].axis or self.opset < 13:  # < 13: flattens
            self.lock(t, f"{self.name(node)} normalises over the channel axis")
            return
        self._same(node, t)

    # -- groups ---------------------------------------------------------------------------

    def _groups(self) -> ChannelAnalysis:
        graph = nx.Graph()
        order = {name: i for i, name in enumerate(self.spaces)}
        for name, space in self.spaces.items():
            graph.add_node(name, axis=space.axis, size=space.size)
        for link in self.links:
            graph.add_edge(link.a, link.b, node=self.name(self.nodes[link.node]))
        components = sorted(
            (sorted(c, key=order.__getitem__) for c in nx.connected_components(graph)),
            key=lambda c: order[c[0]],
        )
        group_of = {name: gid for gid, comp in enumerate(components) for name in comp}
        links_of: dict[int, list[Link]] = {}
        for link in self.links:
            links_of.setdefault(group_of[link.a], []).append(link)
        sources: dict[int, list[str]] = {}
        for s in self.slices:
            if s.role == "weight_out":
                names = sources.setdefault(group_of[s.space], [])
                if self.name(self.nodes[s.node]) not in names:
                    names.append(self.name(self.nodes[s.node]))
        groups = []
        for gid, comp in enumerate(components):
            reasons = [r for name in comp for r in self.locks.get(name, [])]
            reasons += self._check_links(links_of.get(gid, []))
            if gid not in sources:
                reasons.append("no Conv/Gemm/MatMul output channels to cut")
            group = ChannelGroup(gid, comp, sources.get(gid, []), list(dict.fromkeys(reasons)))
            if group.prunable:
                group.atoms, group.n_atoms = self._atoms(comp, links_of.get(gid, []))
            groups.append(group)
        return ChannelAnalysis(
            dict(self.spaces),
            graph,
            groups,
            group_of,
            list(self.slices),
            list(self.updates),
            list(self.shape_inputs),
            [self.name(n) for n in self.nodes],
        )

    def _check_links(self, links: list[Link]) -> list[str]:
        bad = []
        for link in links:
            size_a, size_b = self.spaces[link.a].size, self.spaces[link.b].size
            if size_a is None or size_b is None:
                continue  # already locked as unknown
            blocks = size_a // link.block_a
            if size_a % link.block_a or link.offset_b + blocks * link.block_b > size_b:
                bad.append(
                    f"{self.name(self.nodes[link.node])}: inconsistent channel counts "
                    f"({size_a} vs {size_b})"
                )
        return bad

    def _atoms(self, spaces: list[str], links: list[Link]) -> tuple[dict[str, np.ndarray], int]:
        """Union-find over single channels: atoms are the channel sets that go together."""
        base, total = {}, 0
        for name in spaces:
            base[name] = total
            total += self.spaces[name].size
        parent = list(range(total))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for link in links:
            start_b = base[link.b] + link.offset_b
            for j in range(self.spaces[link.a].size // link.block_a):
                first = base[link.a] + j * link.block_a
                members = [
                    *range(first + 1, first + link.block_a),
                    *range(start_b + j * link.block_b, start_b + (j + 1) * link.block_b),
                ]
                root = find(first)
                for m in members:
                    other = find(m)
                    if other != root:
                        parent[max(root, other)] = min(root, other)
                        root = min(root, other)
        roots = np.array([find(i) for i in range(total)], dtype=np.int64)
        _, first_seen, labels = np.unique(roots, return_index=True, return_inverse=True)
        renumber = np.argsort(np.argsort(first_seen))  # atom ids in order of first channel
        labels = renumber[labels]
        atoms = {name: labels[base[name] : base[name] + self.spaces[name].size] for name in spaces}
        return atoms, len(first_seen)
