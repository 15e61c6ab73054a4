"""Per-layer int8 execution: which quantized ONNX node runs as integers, in which kernel.

A quantized node is a Conv / ConvTranspose / Gemm / MatMul with at least one input produced by
``DequantizeLinear``; Gathers of int8 tables (embeddings, ``gather_tables``) are listed apart, as
``tables``: they select int8 rows and dequantize them, no arithmetic to run as integers.

The Relax rewrite (:mod:`.anchors`) records one :class:`Decision` per
quantized conv/matmul in binding order, which is the ONNX node order the importer keeps; the
decisions of each op kind are matched to the quantized nodes of that kind in order (a count
mismatch, which would mean the importer split or merged nodes, leaves those nodes "unknown"
rather than guessing). Kernel names come from the fused module (:func:`integer_kernels`), in the
order the main function calls them.

This module does not import TVM except in :func:`integer_kernels`.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import onnx

KIND = {"Conv": "conv2d", "ConvTranspose": "conv2d_transpose", "Gemm": "matmul", "MatMul": "matmul"}
# The op of a fused kernel, from its name (FuseOps joins the names of the ops it fused, in order;
# a kernel holds at most one conv/matmul).
KERNEL_OP = re.compile(r"(?:^|_)(conv2d_transpose|conv2d|matmul)\d*(?:_|$)")


def quantized_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv/ConvTranspose/Gemm/MatMul nodes reading at least one DequantizeLinear output."""
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [
        n
        for n in model.graph.node
        if n.op_type in KIND and any(i in dq_outputs for i in n.input[:2])
    ]


def table_gathers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Gather nodes reading their table through DequantizeLinear (``gather_tables``)."""
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in dq_outputs]


def _tables(model: onnx.ModelProto, decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per int8-table Gather, matched in order to the lowering's ``take`` decisions
    (``unknown`` when the counts differ: TVM's importer folded a Gather of constant indices)."""
    nodes, takes = table_gathers(model), [d for d in decisions if d["op"] == "take"]
    entries = []
    for i, node in enumerate(nodes):
        entry: dict[str, Any] = {"node": node.name or node.output[0], "op": "Gather"}
        if len(takes) != len(nodes):
            entry.update(execution="unknown", detail="the lowering's lookups do not match")
        else:
            entry["execution"] = "int8 table" if takes[i]["integer"] else "float"
            entry["detail"] = takes[i]["detail"]
        entries.append(entry)
    return entries


class KernelCall(NamedTuple):
    """One call of an integer kernel: its name, and whether an 8-bit operand is a constant (a
    weight; False for attention's activation x activation matmuls)."""

    name: str
    weights: bool


def integer_kernels(mod: Any) -> list[KernelCall]:
    """The fused kernels of ``mod`` holding an integer conv/matmul, in the order ``main`` calls
    them (one entry per call). Run on the fused module, before the VM lowering: a kernel counts
    when its name holds a conv2d / conv2d_transpose / matmul and it is called with an int8/uint8
    argument."""
    import tvm
    from tvm import relax

    from edgecc.lower.int8.qparams import dtype_of

    calls: list[KernelCall] = []

    def visit(expr: Any) -> None:
        if not isinstance(expr, relax.Call) or getattr(expr.op, "name", "") != "relax.call_tir":
            return
        name = getattr(expr.args[0], "name_hint", "")
        args = getattr(expr.args[1], "fields", [])
        eight = [a for a in args if dtype_of(a) in ("int8", "uint8")]
        if KERNEL_OP.search(name) and eight:
            weights = any(isinstance(a, tvm.ir.expr.Constant) for a in eight)
            calls.append(KernelCall(name, weights))

    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function) and gvar.name_hint == "main":
            relax.analysis.post_order_visit(func.body, visit)
    return calls


def record_kernels_pass(calls: list[str]) -> Any:
    """A module pass (after fusion) that fills ``calls`` with :func:`integer_kernels`."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="EdgeccInt8Kernels")
    def _record(mod, _ctx):  # noqa: ANN001, ANN202
        calls[:] = integer_kernels(mod)
        return mod

    return _record


def assign_kernels(decisions: list[dict[str, Any]], kernels: list[KernelCall]) -> None:
    """Add ``kernel`` to each integer decision (in place), by kind, by weight or activation
    operands (the call order of attention's matmuls differs from the graph's), and by order;
    nothing when the counts of such a group differ."""
    for kind in ("conv2d", "conv2d_transpose", "matmul"):
        for weights in (True, False):
            mine = [
                d
                for d in decisions
                if d["integer"] and d["op"] == kind and d.get("weights", True) == weights
            ]
            names = [
                k.name
                for k in kernels
                if KERNEL_OP.search(k.name).group(1) == kind and k.weights == weights
            ]
            if len(mine) == len(names):
                for decision, name in zip(mine, names, strict=True):
                    decision["kernel"] = name


def _rule(rules: dict[str, Any], kernel: str) -> str:
    """The schedule rule of ``kernel`` (the schedules pass may append a digit to its name)."""
    if kernel in rules:
        return rules[kernel] or "none"
    for name, rule in rules.items():
        if name.startswith(kernel) and name[len(kernel) :].isdigit():
            return rule or "none"
    return "none"


def int8_execution(
    model: onnx.ModelProto,
    decisions: list[dict[str, Any]],
    schedules: dict[str, Any] | None,
    dynamic: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest's ``int8_execution``: a summary line and one entry per quantized node.

    Args:
        model: the ONNX graph that was lowered.
        decisions: ``library.int8_ops`` of the build (dicts of :class:`Decision`, plus kernel).
        schedules: ``library.schedules`` (kernel -> rule), to name the rule of each kernel.
        dynamic: ``library.int8_dynamic`` (weight-only graphs): its MatMul/Gemm nodes run as
            dynamic int8 kernels, whatever the static rewrite recorded for them.

    Returns:
        ``{"summary": str, "layers": [{"node", "op", "execution", "kernel"?, "rule"?,
        "detail"}], "tables"?: [{"node", "op", "execution", "detail"}]}``; a layer's
        ``execution`` is ``integer``, ``float`` or ``unknown``; ``tables`` (Gathers of int8
        tables, when there are any) say ``int8 table``, ``float`` or ``unknown``.
    """
    rules = (schedules or {}).get("kernels", {})
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in decisions:
        by_kind.setdefault(d["op"], []).append(d)
    nodes = quantized_nodes(model)
    counts = {k: sum(KIND[n.op_type] == k for n in nodes) for k in set(KIND.values())}
    taken = dict.fromkeys(counts, 0)
    layers = []
    for node in nodes:
        kind = KIND[node.op_type]
        entry: dict[str, Any] = {"node": node.name or node.output[0], "op": node.op_type}
        mine = by_kind.get(kind, [])
        if len(mine) != counts[kind]:
            entry.update(execution="unknown", detail="the lowering's ops do not match the graph's")
        else:
            d = mine[taken[kind]]
            taken[kind] += 1
            entry["execution"] = "integer" if d["integer"] else "float"
            if d.get("kernel"):
                entry["kernel"] = d["kernel"]
                entry["rule"] = _rule(rules, d["kernel"])
            entry["detail"] = d["detail"]
        layers.append(entry)
    _mark_dynamic(layers, dynamic)
    integer = sum(e["execution"] == "integer" for e in layers)
    summary = (
        f"{integer} of {len(layers)} quantized layers run as integer kernels "
        "(int8/uint8 operands, int32 accumulation, requantize fused), weights stored as int8"
        if layers
        else "no quantized Conv/Gemm/MatMul layers"
    )
    if integer < len(layers):
        summary += f"; {len(layers) - integer} fall back to float (see layers)"
    tables = _tables(model, decisions)
    if not tables:
        return {"summary": summary, "layers": layers}
    stored = sum(t["execution"] == "int8 table" for t in tables)
    summary += (
        f"; {stored} of {len(tables)} Gather tables stored as int8, only the gathered rows "
        "dequantized (see tables)"
    )
    return {"summary": summary, "layers": layers, "tables": tables}


def _mark_dynamic(layers: list[dict[str, Any]], dynamic: dict[str, Any] | None) -> None:
    """Layers the dynamic int8 rewrite ran as integer matmuls (in place)."""
    rows = {r["node"]: r for r in (dynamic or {}).get("layers", [])}
    for entry in layers:
        row = rows.get(entry["node"])
        if row is None:
            continue
        entry.update(
            execution="integer",
            detail=f"{row.get('mode', 'dynamic-int8')}: activations quantized to uint8 at run "
            f"time, u8 x s8 -> int32, {row.get('weight', '')} weights",
        )
        for key in ("kernel", "rule"):
            if row.get(key):
                entry[key] = row[key]


def compact_lines(execution: dict[str, Any] | str) -> list[str]:
    """``inspect``'s view: the summary, then one line per layer (``node op: kernel [rule]``)."""
    if isinstance(execution, str):  # packages written before per-layer records
        return [execution]
    lines = [execution["summary"]]
    for e in execution.get("layers", []):
        where = (
            f"{e['kernel']} [{e.get('rule', 'none')}]" if e.get("kernel") else e.get("detail", "")
        )
        lines.append(f"  {e['node']} ({e['op']}): {e['execution']}, {where}")
    for e in execution.get("tables", []):
        lines.append(f"  {e['node']} (Gather): {e['execution']}, {e['detail']}")
    return lines
