"""The dump instrument: after every pass, the graph as ONNX and text, and one summary row.

``--dump-dir DIR`` writes ``000_input.onnx``, then ``NNN_<pass>.onnx`` (opens in Netron) and
``NNN_<pass>.txt`` (one line per node: name, op, inputs -> outputs with shapes, and where it
came from: ``# from input, rewritten by fold-bn, prune`` or ``# from qdq``)
after each pass, and ``summary.tsv`` / ``summary.json`` with a row per pass: nodes,
parameters, MACs, bytes, and max-abs-diff / cosine of the outputs against the float reference on
the probe input (run with ONNX Runtime, optimisations off).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, shape_inference

from edgecc.passes.manager import Instrument, PassContext, PassResult, PassSpec, node_origin
from edgecc.report.compare import compare_outputs, run_onnx
from edgecc.report.metrics import graph_stats

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = (
    "step",
    "pass",
    "modified",
    "nodes",
    "params",
    "macs",
    "bytes",
    "max_abs_diff",
    "cosine",
    "seconds",
)


def pass_row(
    step: str,
    model: onnx.ModelProto,
    reference: Mapping[str, np.ndarray] | None,
    probe: Mapping[str, np.ndarray] | None,
) -> dict[str, Any]:
    """Statistics of ``model`` and its agreement with ``reference`` on ``probe``."""
    stats = graph_stats(model)
    row: dict[str, Any] = {
        "step": step,
        **{k: stats[k] for k in ("nodes", "params", "macs", "bytes")},
    }
    row["max_abs_diff"] = row["cosine"] = None
    if reference is not None and probe is not None:
        try:
            cmp = compare_outputs(run_onnx(model, probe), reference)
            row["max_abs_diff"], row["cosine"] = cmp["max_abs_diff"], cmp["cosine"]
        except Exception as err:  # a graph ORT cannot run is still worth dumping
            logger.warning("%s: could not compare against the reference: %s", step, err)
    return row


def listing(model: onnx.ModelProto) -> str:
    """A readable text listing of the graph, one node per line, with shapes where known."""
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    shapes: dict[str, str] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        t = vi.type.tensor_type
        dims = [
            str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
            for d in t.shape.dim
        ]
        shapes[vi.name] = (
            f"{helper.tensor_dtype_to_np_dtype(t.elem_type).name}[{'x'.join(dims)}]"
            if t.elem_type
            else "?"
        )
    inits = {
        t.name: f"const {helper.tensor_dtype_to_np_dtype(t.data_type).name}"
        f"[{'x'.join(map(str, t.dims))}]"
        for t in g.initializer
    }
    shapes.update(inits)

    def fmt(names: Any) -> str:
        return ", ".join(f"{n}:{shapes.get(n, '?')}" if n else "<none>" for n in names)

    lines = [
        f"graph {g.name or '<unnamed>'}: {len(g.node)} nodes, {len(g.initializer)} initializers"
    ]
    lines += [f"input  {fmt([i.name])}" for i in g.input if i.name not in inits]
    for node in g.node:
        attrs = ", ".join(
            f"{a.name}={helper.get_attribute_value(a)}"
            for a in node.attribute
            if a.type
            in (
                onnx.AttributeProto.INT,
                onnx.AttributeProto.INTS,
                onnx.AttributeProto.FLOAT,
                onnx.AttributeProto.STRING,
            )
        )
        lines.append(
            f"{node.name} = {node.op_type}({fmt(node.input)}) -> {fmt(node.output)}"
            f"{' {' + attrs + '}' if attrs else ''}  # from {node_origin(node)}"
        )
    lines += [f"output {fmt([o.name])}" for o in g.output]
    return "\n".join(lines) + "\n"


class DumpInstrument(Instrument):
    """Writes the graph after every pass and a summary table (see module docstring).

    Args:
        directory: where to write; created if missing.
        reference: float reference outputs recorded by the frontend.
        write_graphs: False to collect only the summary rows (used for the package report).
    """

    def __init__(
        self,
        directory: Path | None,
        reference: Mapping[str, np.ndarray] | None = None,
        write_graphs: bool = True,
    ):
        self.directory = Path(directory) if directory else None
        self.reference = reference
        self.write_graphs = write_graphs and self.directory is not None
        self.rows: list[dict[str, Any]] = []
        self._probe: Mapping[str, np.ndarray] | None = None

    def _emit(
        self,
        step: str,
        name: str,
        model: onnx.ModelProto,
        modified: bool | None,
        seconds: float | None,
        info: dict[str, Any] | None = None,
    ) -> None:
        row = pass_row(step, model, self.reference, self._probe)
        row.update({"pass": name, "modified": modified, "seconds": seconds})
        if info:
            row["info"] = info
        self.rows.append(row)
        if self.write_graphs:
            self.directory.mkdir(parents=True, exist_ok=True)
            onnx.save(model, str(self.directory / f"{step}.onnx"))
            (self.directory / f"{step}.txt").write_text(listing(model))
            self.write_summary()

    def before_pipeline(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        self._probe = ctx.probe_inputs
        self._emit("000_input", "input", model, None, None)

    def after_pass(self, index: int, spec: PassSpec, result: PassResult, seconds: float) -> None:
        self._emit(
            f"{index:03d}_{spec.name}",
            spec.text(),
            result.model,
            result.modified,
            seconds,
            result.info,
        )

    def write_summary(self) -> None:
        """Write ``summary.tsv`` (readable) and ``summary.json`` (complete) to the dump dir."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "summary.tsv").write_text(format_table(self.rows, tsv=True))
        (self.directory / "summary.json").write_text(json.dumps(self.rows, indent=2, default=str))


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column == "cosine":
        return f"{value:.6f}"
    if column in ("max_abs_diff",):
        return f"{value:.3g}"
    if column == "seconds":
        return f"{value:.2f}"
    return str(value)


def format_table(rows: list[dict[str, Any]], tsv: bool = False) -> str:
    """The per-pass summary as a tab-separated or aligned text table.

    In the aligned table the ``pass`` text (as long as its options) is the last column, so a
    long one cannot push the numbers out of line; the step name is the first.
    """
    cols = [c for c in SUMMARY_COLUMNS if any(c in r for r in rows)]
    if not tsv and "pass" in cols:
        cols = [c for c in cols if c != "pass"] + ["pass"]
    cells = [[_cell(r.get(c), c) for c in cols] for r in rows]
    if tsv:
        return "\n".join("\t".join(r) for r in [list(cols), *cells]) + "\n"
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]

    def fmt_row(r: list[str]) -> str:
        texts = {0, len(cols) - 1} if cols[-1] == "pass" else {0}
        padded = [
            v.ljust(w) if i in texts else v.rjust(w)
            for i, (v, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join(fmt_row(r) for r in [list(cols), *cells]) + "\n"
