"""``eliminate-dead``: remove what does not contribute to the graph outputs.

Walks back from the graph outputs through producers (a node with subgraphs also reads every
outer-scope name its subgraphs read) and removes:

* nodes none of whose outputs reach a graph output;
* initializers no remaining node, subgraph or graph output reads;
* ``value_info`` entries for tensors that no longer exist.

Kept on purpose: graph inputs (they are the model's interface, even when unused), initializers
that are also listed as graph inputs (removing the default would make the input required), and
everything inside subgraphs (only top-level nodes are removed). ONNX's standard ops have no side
effects, so a node is dead exactly when its outputs are unread.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import onnx

from edgecc.passes.manager import PassContext, PassResult, register


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (If branches, Loop/Scan bodies)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor name ``node`` reads: its inputs and its subgraphs' outer-scope reads."""
    reads = {i for i in node.input if i}
    for sub in subgraphs(node):
        defined = (
            {i.name for i in sub.input}
            | {t.name for t in sub.initializer}
            | {o for n in sub.node for o in n.output}
        )
        reads |= (graph_reads(sub) | {o.name for o in sub.output}) - defined
    return reads


def graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name the graph's nodes read, including inside subgraphs (recursively)."""
    return {name for node in graph.node for name in node_reads(node)}


@register("eliminate-dead")
class EliminateDead:
    """Remove dead nodes, unused initializers and stale value_info (top-level graph)."""

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        graph = model.graph
        producer = {o: node for node in graph.node for o in node.output if o}
        live: dict[int, onnx.NodeProto] = {}
        pending = [o.name for o in graph.output]
        while pending:
            node = producer.get(pending.pop())
            if node is not None and id(node) not in live:
                live[id(node)] = node
                pending.extend(node_reads(node))
        dead_ops = Counter(n.op_type for n in graph.node if id(n) not in live)
        if dead_ops:
            keep = [onnx.NodeProto() for n in graph.node if id(n) in live]
            for copy, node in zip(keep, (n for n in graph.node if id(n) in live), strict=True):
                copy.CopyFrom(node)
            del graph.node[:]
            graph.node.extend(keep)

        inputs = {i.name for i in graph.input}
        reads = graph_reads(graph) | {o.name for o in graph.output}
        unused = {t.name for t in graph.initializer if t.name not in reads and t.name not in inputs}
        if unused:
            kept = [t for t in graph.initializer if t.name not in unused]
            del graph.initializer[:]
            graph.initializer.extend(kept)

        existing = (
            inputs | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
        )
        stale = sum(v.name not in existing for v in graph.value_info)
        if stale:
            fresh = [v for v in graph.value_info if v.name in existing]
            del graph.value_info[:]
            graph.value_info.extend(fresh)

        info = {
            "nodes": sum(dead_ops.values()),
            "ops": dict(dead_ops),
            "initializers": len(unused),
            "value_info": stale,
        }
        return PassResult(
            model,
            bool(dead_ops or unused or stale),
            info,
            reason="no dead node, unused initializer or stale value_info",
        )
