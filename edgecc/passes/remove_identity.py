"""``remove-identity``: remove nodes that pass their input through unchanged.

Removed: ``Identity``; ``Dropout`` in inference (no ``training_mode`` input, or a constant false
one, and its mask output unread); ``Cast`` to the element type its input already has, and
``CastLike`` whose two inputs have the same element type (types from shape inference).

Rewiring keeps graph output names fixed. For a node ``src -> dst``:

* ``dst`` is not a graph output: every reader of ``dst`` reads ``src`` instead;
* ``dst`` is a graph output and ``src`` is produced by a node (and is neither a graph input, an
  initializer nor another graph output): ``src`` is renamed ``dst`` everywhere, so its producer
  now writes the graph output directly;
* otherwise (an input or a constant passed straight to an output, or one tensor exposed as two
  outputs) the node is needed to keep the output names and stays; ``info["declined"]`` says why.

Chains (``Identity -> Identity -> output``) collapse, since nodes are processed in order on the
already rewired graph. Limits: only top-level nodes are removed; renaming also updates the
outer-scope reads of subgraphs, assuming no subgraph shadows the renamed name.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx

from edgecc.passes.eliminate_dead import graph_reads, subgraphs
from edgecc.passes.graph import attr, infer_types
from edgecc.passes.manager import PassContext, PassResult, register

STANDARD = ("", "ai.onnx")


@register("remove-identity")
class RemoveIdentity:
    """Remove Identity, inference Dropout and no-op Cast/CastLike nodes, keeping output names."""

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        graph = model.graph
        needs_types = any(n.op_type in ("Cast", "CastLike") for n in graph.node)
        types = infer_types(model) if needs_types else {}
        constants = {t.name: t for t in graph.initializer}
        removed: set[int] = set()
        ops: Counter[str] = Counter()
        declined: list[dict[str, str]] = []
        for idx, node in enumerate(graph.node):
            if not _passes_through(node, types, constants, graph):
                continue
            src, dst = node.input[0], node.output[0]
            outputs = {o.name for o in graph.output}
            if dst not in outputs:
                _rename_reads(graph, dst, src)
                gone = dst
            else:
                reason = _why_keep(graph, src, outputs, removed)
                if reason:
                    declined.append({"node": node.name, "op": node.op_type, "reason": reason})
                    continue
                _rename_everywhere(graph, src, dst)
                gone = src
            removed.add(idx)
            ops[node.op_type] += 1
            _drop_value_info(graph, gone)
        info: dict[str, Any] = {
            "removed": sum(ops.values()),
            "ops": dict(ops),
            "declined": declined,
        }
        if not removed:
            why = f"{len(declined)} no-op nodes declined" if declined else "no no-op node"
            return PassResult(model, False, info, reason=why)
        keep = [n for k, n in enumerate(graph.node) if k not in removed]
        copies = [onnx.NodeProto() for _ in keep]
        for copy, node in zip(copies, keep, strict=True):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)
        return PassResult(model, True, info)


def _passes_through(
    node: onnx.NodeProto,
    types: dict[str, onnx.TypeProto],
    constants: dict[str, onnx.TensorProto],
    graph: onnx.GraphProto,
) -> bool:
    """True when ``node``'s first output always equals its first input."""
    if node.domain not in STANDARD or not node.input or not node.input[0] or not node.output[0]:
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type == "Dropout":
        mask_read = (
            len(node.output) > 1
            and node.output[1]
            and (
                node.output[1] in graph_reads(graph)
                or node.output[1] in {o.name for o in graph.output}
            )
        )
        training = node.input[2] if len(node.input) > 2 else ""
        return not mask_read and (not training or _is_false(constants.get(training)))
    if node.op_type == "Cast":
        return _elem_type(types, node.input[0]) == attr(node, "to")
    if node.op_type == "CastLike" and len(node.input) > 1:
        source = _elem_type(types, node.input[0])
        return source is not None and source == _elem_type(types, node.input[1])
    return False


def _is_false(tensor: onnx.TensorProto | None) -> bool:
    return tensor is not None and not bool(np.any(onnx.numpy_helper.to_array(tensor)))


def _elem_type(types: dict[str, onnx.TypeProto], name: str) -> int | None:
    t = types.get(name)
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.elem_type:
        return None
    return t.tensor_type.elem_type


def _why_keep(graph: onnx.GraphProto, src: str, outputs: set[str], removed: set[int]) -> str:
    """Why ``src`` cannot be renamed to the graph output it feeds ('' when it can)."""
    if src in outputs:
        return f"{src!r} is itself a graph output"
    if src in {i.name for i in graph.input}:
        return f"graph input {src!r} passes straight to a graph output"
    if src in {t.name for t in graph.initializer}:
        return f"initializer {src!r} passes straight to a graph output"
    produced = any(src in n.output for k, n in enumerate(graph.node) if k not in removed)
    return "" if produced else f"{src!r} has no producer in the top-level graph"


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every reader of ``old`` (including subgraphs' outer-scope reads) read ``new``."""
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new
        for sub in subgraphs(node):
            _rename_reads(sub, old, new)
            for out in sub.output:
                if out.name == old:
                    out.name = new


def _rename_everywhere(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new``: its producer's output and all its readers."""
    for node in graph.node:
        for k, name in enumerate(node.output):
            if name == old:
                node.output[k] = new
    _rename_reads(graph, old, new)


def _drop_value_info(graph: onnx.GraphProto, name: str) -> None:
    keep = [v for v in graph.value_info if v.name != name]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)
