"""Small helpers passes share for reading and editing an ``onnx.ModelProto`` in place.

:class:`GraphIndex` maps tensor names to their producer and consumers and gives numpy views of
constants. It is a snapshot: rebuild it after structural edits (or use its update helpers).
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecc.errors import UserInputError

logger = logging.getLogger(__name__)


class GraphIndex:
    """Producer/consumer maps and constant access for one graph."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.graph_outputs = {o.name for o in self.graph.output}
        self.graph_inputs = {i.name for i in self.graph.input}
        self._names = (
            {n.name for n in self.graph.node}
            | set(self.producer)
            | set(self.initializers)
            | self.graph_inputs
        )

    def is_const(self, name: str) -> bool:
        """True when ``name`` is an initializer (not overridable as an input) or a Constant."""
        if name in self.initializers and name not in self.graph_inputs:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant"

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, or None when ``name`` is not constant."""
        if name in self.initializers and name not in self.graph_inputs:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def uses(self, name: str) -> int:
        """How many node inputs and graph outputs read ``name``."""
        return len(self.consumers.get(name, [])) + (name in self.graph_outputs)

    def unique(self, base: str) -> str:
        """A tensor/node name not used in the graph yet, derived from ``base``."""
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        """Replace (or add) the initializer ``name`` with ``value``."""
        tensor = numpy_helper.from_array(np.asarray(value, order="C"), name)  # 0-d stays 0-d
        if name in self.initializers:
            self.initializers[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.initializers[name] = self.graph.initializer[-1]
        self._names.add(name)

    def add_initializer(self, base: str, value: np.ndarray) -> str:
        """Add a new initializer under a fresh name derived from ``base``; returns the name."""
        name = self.unique(base)
        self.set_initializer(name, value)
        return name

    def make_node(
        self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs: object
    ) -> onnx.NodeProto:
        """Create a node with a fresh name (not yet inserted into the graph)."""
        return helper.make_node(op_type, inputs, outputs, name=self.unique(name), **attrs)


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of attribute ``name`` of ``node``, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def used_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name a node (or a node of a subgraph) reads, plus the graph outputs."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for n in model.graph.node:  # subgraphs read outer-scope names
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= {i for sn in a.g.node for i in sn.input}
    return used


def remove_unused_initializers(model: onnx.ModelProto) -> int:
    """Drop initializers no node or graph output reads; returns how many were removed."""
    used = used_names(model)
    keep = [t for t in model.graph.initializer if t.name in used]
    removed = len(model.graph.initializer) - len(keep)
    if removed:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return removed


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder ``model.graph.node`` topologically in place (stable for already-sorted graphs)."""
    graph = model.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progress = False
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
                progress = True
            else:
                rest.append(node)
        if not progress:
            raise ValueError(f"graph has a cycle or dangling inputs near node {rest[0].name!r}")
        pending = rest
    copies = [onnx.NodeProto() for _ in ordered]
    for c, n in zip(copies, ordered, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def remove_if_unused(model: onnx.ModelProto, names: Iterable[str]) -> list[str]:
    """Remove the initializers and Constant nodes among ``names`` that nothing reads any more.

    Unlike :func:`remove_unused_initializers` this touches only the tensors a pass orphaned, not
    ones that were already unused before it ran. Returns the names removed.
    """
    used = used_names(model)
    dead = set(names) - used
    removed = []
    for field, key in (
        (model.graph.initializer, lambda t: t.name),
        (model.graph.node, lambda n: n.output[0] if n.op_type == "Constant" else None),
    ):
        for i in reversed(range(len(field))):
            if key(field[i]) in dead:
                removed.append(key(field[i]))
                del field[i]
    return sorted(removed)


# Inputs that read only the shape or the element type of a tensor, never its values: a rewrite
# that keeps a tensor's values (or refreshes them consistently) need not treat them as uses.
META_INPUTS = frozenset({("Shape", 0), ("Size", 0), ("CastLike", 1)})
_NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)


def value_consumers(index: GraphIndex, name: str) -> list[onnx.NodeProto]:
    """Consumers of ``name`` that read its values (not only its shape or element type)."""
    out: list[onnx.NodeProto] = []
    for node in index.consumers.get(name, []):
        reads = any(
            i == name and (node.op_type, k) not in META_INPUTS for k, i in enumerate(node.input)
        )
        if reads and not any(n is node for n in out):
            out.append(node)
    return out


def infer_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Name -> inferred type (element type and shape) of every tensor shape inference reaches.

    Inference starts afresh (see :func:`infer_shapes_copy`); a stored ``value_info`` is used
    only for tensors inference cannot type.
    """
    g = infer_shapes_copy(model).graph
    types = {vi.name: vi.type for vi in model.graph.value_info}
    types.update((vi.name, vi.type) for vi in list(g.input) + list(g.output) + list(g.value_info))
    for t in model.graph.initializer:
        types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
    return types


def infer_shapes_copy(model: onnx.ModelProto, max_elements: int = 64) -> onnx.ModelProto:
    """A shape-inferred copy of ``model``, ignoring its (possibly stale) ``value_info``.

    Small integer tensors computed from constants (Reshape targets, Reduce axes built from
    ``Constant`` nodes, as torch's exporter writes them) are first materialised as initializers
    in the copy, so the ops reading them get full shapes where ONNX's data propagation stops.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    del work.graph.value_info[:]
    first = _infer_or_same(work)
    types = {vi.name: vi.type for vi in first.graph.value_info}
    index = GraphIndex(work)
    values: dict[str, str | None] = {}
    for node in work.graph.node:
        for k, name in enumerate(node.input):
            if name not in values:
                values[name] = _materialise(index, name, types, max_elements)
            if values[name] is not None:
                node.input[k] = values[name]
    return _infer_or_same(work) if any(values.values()) else first


def _materialise(
    index: GraphIndex, name: str, types: dict[str, onnx.TypeProto], max_elements: int
) -> str | None:
    """The name of a new initializer holding ``name``'s value, if small, integer and constant."""
    if not name or name in index.initializers or name not in index.producer:
        return None
    shape = static_shape(types, name)
    elem = types[name].tensor_type.elem_type if name in types else 0
    if (
        shape is None
        or not all(isinstance(d, int) for d in shape)
        or math.prod(shape) > max_elements
        or elem not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    ):
        return None
    value = const_value(index, name, types)
    return None if value is None else index.add_initializer(f"{name}_const", value)


def _infer_or_same(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as err:  # best effort: an op without a shape function leaves the rest
        logger.info("shape inference failed: %s", err)
        return model


def static_shape(types: dict[str, onnx.TypeProto], name: str) -> list[int | str | None] | None:
    """The shape of ``name`` (ints, dim_param strings or None per dim), or None if rank unknown."""
    t = types.get(name)
    if t is None or not t.tensor_type.HasField("shape"):
        return None
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in t.tensor_type.shape.dim
    ]


def const_value(
    index: GraphIndex, name: str, types: dict[str, onnx.TypeProto] | None = None
) -> np.ndarray | None:
    """The value of ``name`` when it is computable from constants alone, else None.

    Beyond :meth:`GraphIndex.const`, this evaluates the constant subgraph feeding ``name`` (with
    ONNX's reference evaluator), e.g. the ``Expand(CastLike(0, x), Shape(W))`` zero bias torch's
    exporter emits for bias-free convolutions. Inputs that read only a shape or an element type
    (``Shape``, ``CastLike``'s second input) may come from activations when ``types`` gives their
    static shape.
    """
    value = index.const(name)
    if value is not None or not name:
        return value
    nodes: set[int] = set()
    inits: set[str] = set()
    feeds: dict[str, np.ndarray] = {}
    needed, meta = set(), set()
    stack = [(name, False)]
    while stack:
        tensor, meta_only = stack.pop()
        if not tensor or tensor in needed or (meta_only and tensor in meta):
            continue
        if index.is_const(tensor) and tensor in index.initializers:
            inits.add(tensor)
            needed.add(tensor)
            continue
        node = index.producer.get(tensor)
        shape = static_shape(types or {}, tensor) if meta_only else None
        if shape is not None and all(isinstance(d, int) for d in shape):
            meta.add(tensor)  # only its shape or type matters: a zero tensor stands in for it
            continue
        if (
            node is None
            or node.op_type in _NONDETERMINISTIC
            or node.domain not in ("", "ai.onnx")
            or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute
            )
        ):
            return None
        needed.add(tensor)
        nodes.add(id(node))
        stack.extend((i, (node.op_type, k) in META_INPUTS) for k, i in enumerate(node.input))
    for tensor in meta - needed:
        shape = static_shape(types or {}, tensor)
        dtype = helper.tensor_dtype_to_np_dtype(types[tensor].tensor_type.elem_type)
        feeds[tensor] = np.zeros(shape, dtype)
    graph = helper.make_graph(
        [n for n in index.graph.node if id(n) in nodes],
        "const",
        [
            helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for k, v in feeds.items()
        ],
        [helper.make_value_info(name, onnx.TypeProto())],
        [index.initializers[i] for i in sorted(inits)],
    )
    sub = helper.make_model(
        graph, opset_imports=index.model.opset_import, ir_version=index.model.ir_version
    )
    try:
        from onnx.reference import ReferenceEvaluator

        return np.asarray(ReferenceEvaluator(sub).run(None, feeds)[0])
    except Exception:  # anything the reference evaluator cannot run is simply "not constant"
        return None


def set_const_input(
    index: GraphIndex,
    node: onnx.NodeProto,
    position: int,
    value: np.ndarray,
    base: str | None = None,
) -> str:
    """Make input ``position`` of ``node`` the constant ``value``; returns the tensor name.

    An initializer whose values only this input reads is overwritten in place (its name kept),
    provided readers of its shape or type see no change; otherwise a new initializer (named from
    ``base``) is added and the input rewired, so other readers of the old tensor are untouched.
    The index's consumer map follows the rewiring.
    """
    old = node.input[position] if position < len(node.input) else ""
    if old and _sole_reader(index, old, value):
        index.set_initializer(old, value)
        return old
    name = index.add_initializer(base or old or f"{node.name}_in{position}", value)
    while len(node.input) <= position:
        node.input.append("")
    node.input[position] = name
    if old:
        index.consumers[old] = [n for n in index.consumers[old] if n is not node]
    index.consumers[name].append(node)
    return name


def _sole_reader(index: GraphIndex, name: str, value: np.ndarray) -> bool:
    """True when one node input reads the initializer ``name``'s values and overwriting it with
    ``value`` is invisible to everything else (readers of its shape or type see no change)."""
    init = index.initializers.get(name)
    if init is None or name in index.graph_inputs or name in index.graph_outputs:
        return False
    readers = {id(n): n for n in index.consumers.get(name, [])}.values()
    reads = [(n.op_type, k) for n in readers for k, i in enumerate(n.input) if i == name]
    value_reads = sum(r not in META_INPUTS for r in reads)
    same = list(init.dims) == list(
        value.shape
    ) and init.data_type == helper.np_dtype_to_tensor_dtype(value.dtype)
    return value_reads == 1 and (same or len(reads) == 1)


def remove_dead_nodes(model: onnx.ModelProto, names: Iterable[str]) -> set[str]:
    """Remove the nodes producing ``names`` when nothing reads them any more, and so on upwards.

    Only chains a pass orphaned go (e.g. the ``Shape -> Expand`` feeding a bias it replaced),
    not nodes that were already dead before it ran. Returns the names the removed nodes read,
    for :func:`remove_if_unused` to drop the initializers among them.
    """
    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    reads = Counter(i for n in graph.node for i in n.input)
    pinned = used_names(model) - set(reads)  # graph outputs and names subgraphs read
    dead: set[int] = set()
    read: set[str] = set()
    pending = list(names)
    while pending:
        i = producer.get(pending.pop())
        if i is None or i in dead or any(reads[o] or o in pinned for o in graph.node[i].output):
            continue
        dead.add(i)
        reads.subtract(graph.node[i].input)
        read.update(graph.node[i].input)
        pending.extend(graph.node[i].input)
    if dead:
        keep = [n for k, n in enumerate(graph.node) if k not in dead]
        copies = [onnx.NodeProto() for _ in keep]
        for c, n in zip(copies, keep, strict=True):
            c.CopyFrom(n)
        del graph.node[:]
        graph.node.extend(copies)
    return read


def refresh_shapes(model: onnx.ModelProto) -> None:
    """Replace every (stale) ``value_info`` with freshly inferred shapes, in place."""
    produced = {o for n in model.graph.node for o in n.output}
    inferred = infer_shapes_copy(model).graph.value_info
    del model.graph.value_info[:]
    model.graph.value_info.extend(vi for vi in inferred if vi.name in produced)


def fold_shape_reads(model: onnx.ModelProto, names: Iterable[str]) -> int:
    """Replace each ``Shape`` node reading one of the constant tensors ``names`` by an
    initializer holding that shape; returns how many were replaced.

    A pass that replaced a weight calls this so a ``Shape(W)`` (torch's exporter builds the zero
    bias of a bias-free convolution from one) no longer keeps the old weight alive.
    """
    index = GraphIndex(model)
    dead: set[int] = set()
    for name in set(names):
        value = index.const(name)
        for node in index.consumers.get(name, []) if value is not None else []:
            if node.op_type == "Shape" and id(node) not in dead:
                start, end = attr(node, "start", 0), attr(node, "end", None)
                index.set_initializer(node.output[0], np.array(value.shape[start:end], np.int64))
                dead.add(id(node))
    for i in reversed(range(len(model.graph.node))):
        if id(model.graph.node[i]) in dead:
            del model.graph.node[i]
    return len(dead)


WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_QUANTIZED_OPS = frozenset(
    {"MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear"}
)


def quantized_weights(model: onnx.ModelProto) -> int:
    """How many weight ops read an already quantized weight (a DequantizeLinear output) or are
    integer ops (``MatMulInteger``, ``QLinearConv``...): what ``qdq``/``dynamic-quant`` leave."""
    index = GraphIndex(model)
    count = 0
    for node in model.graph.node:
        if node.op_type in _QUANTIZED_OPS:
            count += 1
        elif node.op_type in WEIGHT_OPS and len(node.input) > 1:
            producer = index.producer.get(node.input[1])
            count += producer is not None and producer.op_type == "DequantizeLinear"
    return count


def why_unchanged(
    model: onnx.ModelProto, pass_name: str, declined: list[dict], nothing: str
) -> str:
    """One line saying why a pass changed nothing, for :attr:`PassResult.reason`.

    Args:
        model: the pass's input.
        pass_name: the pass, for the advice "run it before qdq".
        declined: the pass's ``info["declined"]`` entries (each with a ``reason``).
        nothing: what to say when there was nothing to match at all.
    """
    if quantized_weights(model):
        advice = (
            "by an earlier qdq/dynamic-quant"
            if pass_name in ("qdq", "dynamic-quant")
            else f"(DequantizeLinear or integer ops); run {pass_name} before qdq/dynamic-quant"
        )
        return f"the weights are already quantized {advice}"
    if not declined:
        return nothing
    first = declined[0]
    where = first.get("node") or ", ".join(first.get("sources", [])) or "?"
    return f"all {len(declined)} candidates declined (first: {where}: {first.get('reason')})"


def check_names(
    model: onnx.ModelProto, option: str, names: Iterable[str], op_types: bool = True
) -> None:
    """Refuse names in a pass option (``qdq(keep_float=...)``, ``skip=...``) that match no node
    (nor, with ``op_types``, any op type) of the graph: a typo would otherwise do nothing.

    Raises:
        UserInputError: naming the option and the unmatched names.
    """
    known = {n.name for n in model.graph.node}
    if op_types:
        known |= {n.op_type for n in model.graph.node}
    unknown = sorted(set(names) - known)
    if unknown:
        what = "node or op type" if op_types else "node"
        raise UserInputError(f"{option}: no {what} named {', '.join(map(repr, unknown))}")
