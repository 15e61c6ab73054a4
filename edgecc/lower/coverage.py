"""Operator coverage of TVM's Relax ONNX importer, and the import quirks edgecc smooths over.

The importer (``tvm.relax.frontend.onnx``) converts a node by looking its ``op_type`` up in a
converter map and ignores the node's domain. edgecc is stricter: an op is convertible when its
name is in the map and its domain is the standard one (``""``/``ai.onnx``) or ``com.microsoft``
(whose contrib ops the map also names, e.g. ``SkipLayerNormalization``); an op of any other
domain is a custom op the importer would silently mistake for a standard op of the same name.
Nodes inside ``If`` branches and inside model-local functions are checked too. Ops the importer
lacks but an edgecc pass rewrites into supported ones (:data:`EXPANDED_BY`: LSTM/GRU/RNN by
``expand-rnn``, which the cleanup stage runs) pass the early check when that pass is in the
pipeline; the check before import (after the passes) still reports any the pass declined.

Known gaps the coverage check cannot see, because they depend on attributes or shapes rather than
op names, surface at import and are reported as :class:`OperatorConversionError`: e.g. ``Expand``
whose input is a shape computed by ``Shape`` (unfolded shape arithmetic, as
``torch.onnx.export(..., optimize=False)`` emits; constant folding removes it).
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from collections.abc import Collection, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgecc.errors import UnsupportedOperatorError

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})
# The importer handles these outside its converter map.
BUILTIN_OPS = frozenset({"If", "Constant"})
# Ops TVM's importer lacks that an edgecc pass expands into convertible ops: op -> pass name.
EXPANDED_BY = {
    "LSTM": "expand-rnn",
    "GRU": "expand-rnn",
    "RNN": "expand-rnn",
    **dict.fromkeys(
        ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"), "qlinear-to-qdq"
    ),
}
_CONSTANT_ATTRS = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


class OperatorConversionError(UnsupportedOperatorError):
    """An operator passed the coverage check but TVM's importer failed to convert it."""

    def __init__(self, op_type: str, nodes: list[str], reason: str):
        super().__init__([(op_type, len(nodes), nodes)])
        self.args = (
            f"TVM's ONNX importer cannot convert {op_type} "
            f"(e.g. {', '.join(nodes[:3]) or '?'}): {reason}",
        )


@functools.cache
def convertible_ops() -> frozenset[str]:
    """Op types TVM's Relax ONNX importer has a converter for (imports TVM: ~3 s the first time)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map()) | BUILTIN_OPS


def check_coverage(model: onnx.ModelProto, passes: Collection[str] = ()) -> None:
    """Raise if ``model`` uses operators TVM's ONNX importer cannot convert.

    Cheap (a walk over the nodes): call it before any pass or compile work.

    Args:
        model: the ONNX model to lower.
        passes: names of the passes that will run first; ops one of them expands
            (:data:`EXPANDED_BY`) are not reported.

    Raises:
        UnsupportedOperatorError: with ``(op_type, count, first node names)`` per unsupported
            op, in order of first appearance; custom-domain ops are shown as ``domain::op``.
    """
    known = convertible_ops()
    counts: Counter[str] = Counter()
    names: dict[str, list[str]] = defaultdict(list)
    for node in _all_nodes(model):
        label = _unsupported_label(node, known)
        if label and EXPANDED_BY.get(label) in passes:
            continue
        if label:
            counts[label] += 1
            if len(names[label]) < 3:
                names[label].append(node.name or (node.output[0] if node.output else "?"))
    if counts:
        err = UnsupportedOperatorError([(op, counts[op], names[op]) for op in counts])
        hints = sorted({f"{EXPANDED_BY[op]} expands {op}" for op in counts if op in EXPANDED_BY})
        if hints:  # the pass did not run (--no-cleanup) or declined (its reason is in the log)
            err.args = (
                f"{err}; {', '.join(hints)} when its sequence length is static "
                "(a warning gives the reason it declined)",
            )
        raise err


def _unsupported_label(node: onnx.NodeProto, known: frozenset[str]) -> str | None:
    """The name to report ``node`` under if it cannot be converted, else None."""
    if node.domain not in STANDARD_DOMAINS:
        return f"{node.domain}::{node.op_type}"
    if node.op_type not in known:
        return node.op_type
    if node.op_type == "Constant":
        attr = node.attribute[0].name if node.attribute else "<none>"
        if attr != "value" and attr not in _CONSTANT_ATTRS:
            return f"Constant({attr})"
    return None


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node the importer will see: graph, ``If`` branches, bodies of called local functions.

    A call to a model-local function is replaced by the function's body (as
    :func:`canonicalize` inlines it), not reported as an op.
    """
    functions = {(f.domain, f.name): f for f in model.functions}
    seen: set[tuple[str, str]] = set()

    def walk(nodes) -> Iterator[onnx.NodeProto]:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in functions:
                if key not in seen:  # one body check per function is enough
                    seen.add(key)
                    yield from walk(functions[key].node)
                continue
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g.node)
                for graph in attr.graphs:
                    yield from walk(graph.node)

    yield from walk(model.graph.node)


def canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in the form TVM's importer accepts; ``model`` is left unchanged.

    Semantics are preserved exactly:
        * model-local functions are inlined (the importer does not look them up);
        * ``Constant`` nodes given as ``value_float(s)``/``value_int(s)`` are rewritten to the
          equivalent ``value`` tensor (the importer reads only ``value``).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if out.functions:
        from onnx import inliner

        out = inliner.inline_local_functions(out)
    for node in _all_nodes(out):
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name in _CONSTANT_ATTRS:
                value = np.array(helper.get_attribute_value(attr), _CONSTANT_ATTRS[attr.name])
                del node.attribute[:]
                tensor = numpy_helper.from_array(value)
                node.attribute.append(helper.make_attribute("value", tensor))
    return out
