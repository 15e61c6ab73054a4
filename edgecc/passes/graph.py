"""Small helpers passes share for reading and editing an ``onnx.ModelProto`` in place.

:class:`GraphIndex` maps tensor names to their producer and consumers and gives numpy views of
constants. It is a snapshot: rebuild it after structural edits (or use its update helpers).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper


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
        self._names = ({n.name for n in self.graph.node} | set(self.producer)
                       | set(self.initializers) | self.graph_inputs)

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
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
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

    def make_node(self, op_type: str, inputs: list[str], outputs: list[str], name: str,
                  **attrs: object) -> onnx.NodeProto:
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
    for field, key in ((model.graph.initializer, lambda t: t.name),
                       (model.graph.node,
                        lambda n: n.output[0] if n.op_type == "Constant" else None)):
        for i in reversed(range(len(field))):
            if key(field[i]) in dead:
                removed.append(key(field[i]))
                del field[i]
    return sorted(removed)
