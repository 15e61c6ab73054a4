"""``fold-constants``: replace nodes computed from constants alone by initializers.

A node folds when every input is constant (an initializer that is not a graph input, a
``Constant`` node's output, or the output of a node folded before it) and it is evaluated once,
here, with ONNX's reference evaluator (ONNX Runtime as a fallback, on a one-node model carrying
the graph's opset imports). Its outputs become initializers of the same names, so consumers are
untouched. ``Shape`` and ``Size`` of a tensor whose shape is statically known (from shape
inference) fold too, whatever feeds it, which resolves the shape arithmetic exporters emit.
Constants that only folded nodes read are removed afterwards; nothing else is.

Declined, with the reason in ``info["declined"]``:

* non-deterministic ops (``RandomNormal``, ``RandomUniform``, ``*Like``, ``Multinomial``,
  ``Bernoulli``, ``Dropout``): folding would freeze one random draw;
* ``QuantizeLinear``/``DequantizeLinear``/``DynamicQuantizeLinear`` (option ``skip_ops``): a
  ``DequantizeLinear`` on int8 weights *is* the quantized model's weight format;
* outputs larger than ``max_elements`` (16M by default): folding would bloat the file (e.g.
  ``Expand`` or ``ConstantOfShape`` of a huge shape is cheaper to compute at run time);
* nodes whose output is a graph output (the output would become an initializer);
* nodes with subgraphs, ops of non-standard domains, non-tensor results, and ops neither
  evaluator can run.

An ``If`` whose condition is constant (a ``Constant``, an initializer, or a value folded before
it: exporters emit them for sample-rate or mode switches) is inlined: the taken branch's nodes
replace it, its initializers become ``Constant`` nodes, every tensor it defines is renamed to a
fresh name (also where nested subgraphs read it), and the branch outputs are renamed to the
``If``'s output names (an output that is an outer-scope tensor or a branch constant goes through
an ``Identity``, which ``remove-identity`` removes). The inlined nodes are then folded like any
others, so nested constant ``If``s inline too. Declined: a condition with more than one element,
and branches with sparse initializers.

Only the top-level graph is folded; other subgraphs are left as they are (their outer-scope reads
keep the constants they need alive).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecc.passes.eliminate_dead import graph_reads, subgraphs
from edgecc.passes.graph import attr, infer_types, remove_if_unused, static_shape
from edgecc.passes.manager import PassContext, PassResult, register

logger = logging.getLogger(__name__)

NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)
DEFAULT_SKIP = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


@register("fold-constants")
class FoldConstants:
    """Evaluate constant subexpressions once, at compile time.

    Args:
        max_elements: largest output (in elements) a folded node may produce.
        skip_ops: op types never folded (besides the non-deterministic ones).
    """

    def __init__(self, max_elements: int = 16_000_000, skip_ops: Sequence[str] = DEFAULT_SKIP):
        self.max_elements = int(max_elements)
        self.skip_ops = frozenset(skip_ops) | NONDETERMINISTIC

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        graph = model.graph
        types = infer_types(model)
        outputs = {o.name for o in graph.output}
        inputs = {i.name for i in graph.input}
        values: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name not in inputs
        }
        folded: list[onnx.NodeProto] = []
        declined: list[dict[str, str]] = []
        nodes = list(graph.node)
        inlined: list[str] = []  # conditions of the inlined Ifs
        k = 0
        while k < len(nodes):
            node = nodes[k]
            k += 1
            if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.input[0] in values:
                branch = _inline_if(node, values[node.input[0]], model)
                if isinstance(branch, str):
                    declined.append({"node": node.name, "op": "If", "reason": branch})
                    continue
                k -= 1
                nodes[k : k + 1] = branch  # its nodes are visited next, so they fold too
                inlined.append(node.input[0])
                continue
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_value(node)
                if value is not None:
                    values[node.output[0]] = value
                continue
            result = self._fold(node, values, types, outputs, model)
            if isinstance(result, str):
                if result:
                    declined.append({"node": node.name, "op": node.op_type, "reason": result})
                continue
            values.update(zip([o for o in node.output if o], result, strict=True))
            folded.append(node)
        info: dict[str, Any] = {
            "folded": len(folded),
            "ops": dict(Counter(n.op_type for n in folded)),
            "inlined_if": len(inlined),
            "declined": declined,
        }
        if not folded and not inlined:
            return PassResult(model, False, info, reason="no node with only constant inputs")
        self._rewrite(model, nodes, folded, values, inlined)
        if inlined:  # fold again with shapes inferred for the inlined tensors
            again = self(model, ctx)
            model = again.model
            info["folded"] += again.info["folded"]
            info["inlined_if"] += again.info["inlined_if"]
            info["ops"] = dict(Counter(info["ops"]) + Counter(again.info["ops"]))
            info["declined"] = again.info["declined"]
        return PassResult(model, True, info)

    def _fold(
        self,
        node: onnx.NodeProto,
        values: dict[str, np.ndarray],
        types: dict[str, onnx.TypeProto],
        graph_outputs: set[str],
        model: onnx.ModelProto,
    ) -> list[np.ndarray] | str:
        """The node's output values, or why it does not fold ('' when it is not constant)."""
        meta = _from_metadata(node, values, types)
        if meta is not None:
            result = [meta]
        else:
            real_inputs = [i for i in node.input if i]
            if not real_inputs or not all(i in values for i in real_inputs):
                return ""
            if node.op_type in self.skip_ops:
                return f"{node.op_type} is never folded"
            if node.domain not in ("", "ai.onnx"):
                return f"custom domain {node.domain}"
            if any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in node.attribute
            ):
                return "has subgraphs"
            predicted = [_size(static_shape(types, o)) for o in node.output if o]
            if any(p is not None and p > self.max_elements for p in predicted):
                return f"output larger than {self.max_elements} elements"
            result = _evaluate(node, {i: values[i] for i in real_inputs}, model)
            if isinstance(result, str):
                return result
            names = [o for o in node.output if o]
            result = [_as_declared(r, types.get(o)) for r, o in zip(result, names, strict=True)]
        if any(o in graph_outputs for o in node.output):
            return "output is a graph output"
        if any(r.size > self.max_elements for r in result):
            return f"output larger than {self.max_elements} elements"
        return result

    @staticmethod
    def _rewrite(
        model: onnx.ModelProto,
        nodes: list[onnx.NodeProto],
        folded: list[onnx.NodeProto],
        values: dict[str, np.ndarray],
        inlined: list[str],
    ) -> None:
        graph = model.graph
        gone = {id(n) for n in folded}
        keep = [n for n in nodes if id(n) not in gone]
        orphans = {i for n in folded for i in n.input if i} | set(inlined)
        copies = [onnx.NodeProto() for _ in keep]
        for copy, node in zip(copies, keep, strict=True):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)
        reads = graph_reads(graph) | {o.name for o in graph.output}
        existing = {t.name for t in graph.initializer}
        for node in folded:
            for name in node.output:
                if name and name in reads and name not in existing:
                    graph.initializer.append(numpy_helper.from_array(values[name], name))
        removed = remove_if_unused(model, orphans)
        # Folded tensors are initializers now, or gone: their value_info says nothing more.
        vanished = {o for n in folded for o in n.output} | set(removed)
        fresh = [v for v in graph.value_info if v.name not in vanished]
        del graph.value_info[:]
        graph.value_info.extend(fresh)
        logger.debug("folded %d nodes, removed %d orphaned constants", len(folded), len(removed))


def _inline_if(
    node: onnx.NodeProto, cond: np.ndarray, model: onnx.ModelProto
) -> list[onnx.NodeProto] | str:
    """The nodes replacing ``node`` (an ``If`` with the constant condition ``cond``), or why not."""
    if cond.size != 1:
        return f"condition has {cond.size} elements"
    which = "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"
    branch = next(a.g for a in node.attribute if a.name == which)
    if branch.sparse_initializer:
        return "branch has sparse initializers"
    taken = _all_names(model.graph)
    prefix = f"{node.name or 'If'}/{which[:4]}"

    def fresh(base: str) -> str:
        name, i = f"{prefix}/{base}", 0
        while name in taken:
            i += 1
            name = f"{prefix}/{base}_{i}"
        taken.add(name)
        return name

    defined = {t.name for t in branch.initializer} | {o for n in branch.node for o in n.output if o}
    rename: dict[str, str] = {}
    tail: list[onnx.NodeProto] = []
    for out, target in zip(branch.output, node.output, strict=True):
        if not target:
            continue
        producer_output = any(out.name in n.output for n in branch.node)
        if producer_output and out.name not in rename:
            rename[out.name] = target  # its producer writes the If's output directly
        else:  # an outer-scope tensor, a branch constant, or an output listed twice
            tail.append(helper.make_node("Identity", [out.name], [target], name=fresh("Identity")))
    for name in sorted(defined - set(rename)):
        rename[name] = fresh(name)
    result = [
        helper.make_node("Constant", [], [t.name], name=fresh("Constant"), value=t)
        for t in branch.initializer
    ]
    for inner in branch.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(inner)
        copy.name = fresh(inner.name or inner.op_type)
        result.append(copy)
    result.extend(tail)
    for n in result:
        _rename_node(n, rename)
    return result


def _rename_node(node: onnx.NodeProto, rename: dict[str, str]) -> None:
    """Rename ``node``'s inputs and outputs, and the same names inside its subgraphs.

    ONNX names are unique across a model (subgraphs may not shadow outer names), so a name of
    ``rename`` found in a nested subgraph is always an outer-scope read of the renamed tensor.
    """
    node.input[:] = [rename.get(i, i) for i in node.input]
    node.output[:] = [rename.get(o, o) for o in node.output]
    for sub in subgraphs(node):
        for inner in sub.node:
            _rename_node(inner, rename)
        for out in sub.output:  # a subgraph may return an outer-scope tensor as it is
            out.name = rename.get(out.name, out.name)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name in ``graph`` and its subgraphs, recursively."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {o.name for o in graph.output} | {v.name for v in graph.value_info}
    for n in graph.node:
        names |= set(n.input) | set(n.output) | {n.name}
        for sub in subgraphs(n):
            names |= _all_names(sub)
    return names


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The tensor a ``Constant`` node holds (None for strings and sparse tensors)."""
    for a in node.attribute:
        if a.name == "value":
            value = numpy_helper.to_array(a.t)
            return None if value.dtype == object else value
        if a.name in ("value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(a), dtype=np.float32)
        if a.name in ("value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(a), dtype=np.int64)
    return None


def _from_metadata(
    node: onnx.NodeProto, values: dict[str, np.ndarray], types: dict[str, onnx.TypeProto]
) -> np.ndarray | None:
    """Value of a node that reads only the shape or element type of a non-constant input.

    ``Shape``/``Size`` of a statically shaped tensor, and ``CastLike`` of a constant to the
    known element type of any tensor (torch's exporter emits ``CastLike(0, x)`` for zero biases).
    """
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in ("Shape", "Size"):
        shape = static_shape(types, node.input[0])
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        if node.op_type == "Size":
            return np.asarray(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        start, end = attr(node, "start"), attr(node, "end")
        return np.asarray(shape[slice(start, end)], dtype=np.int64)
    if node.op_type == "CastLike" and node.input[0] in values and len(node.input) > 1:
        like = types.get(node.input[1])
        if like is None or not like.HasField("tensor_type") or not like.tensor_type.elem_type:
            return None
        return values[node.input[0]].astype(
            helper.tensor_dtype_to_np_dtype(like.tensor_type.elem_type)
        )
    return None


def _size(shape: list[int | str | None] | None) -> int | None:
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64))


def _evaluate(
    node: onnx.NodeProto, feeds: dict[str, np.ndarray], model: onnx.ModelProto
) -> list[np.ndarray] | str:
    """Run one node on constant inputs: reference evaluator first, ONNX Runtime second."""
    graph = helper.make_graph(
        [node],
        "fold",
        [
            helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for k, v in feeds.items()
        ],
        [helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o],
    )
    single = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    errors = []
    for runner in (_run_reference, _run_ort):
        try:
            out = runner(single, feeds)
        except Exception as err:  # an evaluator that cannot run this op: try the next one
            errors.append(f"{runner.__name__[5:]}: {type(err).__name__}: {err}".splitlines()[0])
            continue
        if all(isinstance(o, (np.ndarray, np.generic)) and o.dtype != object for o in out):
            return [np.asarray(o) for o in out]
        return "non-tensor result"
    return "cannot evaluate (" + "; ".join(errors) + ")"


def _as_declared(value: np.ndarray, declared: onnx.TypeProto | None) -> np.ndarray:
    """``value`` in the element type shape inference declared (evaluators may widen types)."""
    if (
        declared is None
        or not declared.HasField("tensor_type")
        or not declared.tensor_type.elem_type
    ):
        return value
    dtype = helper.tensor_dtype_to_np_dtype(declared.tensor_type.elem_type)
    return value if value.dtype == dtype else value.astype(dtype)


def _run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[Any]:
    from onnx.reference import ReferenceEvaluator

    return list(ReferenceEvaluator(model).run(None, feeds))


def _run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[Any]:
    from edgecc.report.compare import run_onnx

    return list(run_onnx(model, feeds).values())
