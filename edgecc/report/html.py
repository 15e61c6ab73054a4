"""Render the report's data (:func:`edgecc.report.variants.collect`, the JSON ``edgecc --json
report`` prints) as one self-contained HTML page.

The page has no script and loads nothing: styles are inline, charts are inline SVG
(:mod:`edgecc.report.charts`), and a Content-Security-Policy of ``default-src 'none'`` makes the
browser refuse any load or script should one slip in. Every text that comes from a package
(model, node and layer names, pipelines, paths) is HTML-escaped. Sections: a summary table and
the charts comparing the variants (accuracy vs size, latency ratio to ONNX Runtime or
instruction counts), the per-layer sensitivity, and per package the pass table (nodes,
parameters, MACs, bytes, cosine vs the float model after each pass) and what was kept float or
spared. Missing facts read "not measured".
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

from edgecc.report import charts

NOT_MEASURED = "not measured"
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
STYLE = """
body{font-family:sans-serif;margin:1.5em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right;vertical-align:top}
th{background:#f0f0f0}th.t,td.t{text-align:left}td.t{overflow-wrap:anywhere}th{white-space:nowrap}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
svg.chart{max-width:100%;height:auto}
.na{color:#888;font-style:italic}.notes li{color:#8a4b00}
code{font-size:.9em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _na() -> str:
    return f'<span class="na">{NOT_MEASURED}</span>'


def _num(value: float | None, fmt: str = ".4g") -> str:
    return _na() if value is None else _e(format(value, fmt))


def _bytes(value: int | None) -> str:
    if value is None:
        return _na()
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f}&nbsp;{unit}"
    return f"{value}&nbsp;B"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], text_cols: set[int]) -> str:
    """A table of already-escaped cells; columns in ``text_cols`` are left-aligned."""

    def cls(i: int) -> str:
        return ' class="t"' if i in text_cols else ""

    out = ["<table><tr>" + "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(head)) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>")
    return "\n".join(out) + "</table>"


def _accuracy_cell(acc: dict[str, Any] | None) -> str:
    if not acc:
        return _na()
    text = f"{_e(acc['metric'])} {_num(acc['final'])}"
    if acc.get("drop") is not None:
        text += f" (drop {_num(acc['drop'], '.3g')}"
        if acc.get("max_drop") is not None:
            text += f", budget {_num(acc['max_drop'], '.3g')}"
        text += ")"
    return text


def _latency_cell(lat: dict[str, Any] | None) -> str:
    if not lat:
        return _na()
    if lat["kind"] == "instructions":
        return f"{lat['instructions_per_inference'] / 1e6:.4g}M instructions/inference (emulated)"
    text = f"{lat['ratio']:.2f}x ONNX Runtime"
    if lat.get("edgecc_ms") is not None and lat.get("onnxruntime_ms") is not None:
        text += f" ({lat['edgecc_ms']:.3g} vs {lat['onnxruntime_ms']:.3g} ms"
        text += f", {lat['threads']} threads)" if lat.get("threads") else ")"
    return text


def _summary(variants: Sequence[dict[str, Any]]) -> str:
    head = ["package", "target", "pipeline", "accuracy", "samples", "model.so", "model.onnx"]
    head += ["params", "cosine vs float", "latency"]
    rows = []
    for v in variants:
        s, acc = v["sizes"], v["accuracy"]
        params = _num(s["params"], ",d") if s["params"] is not None else _na()
        if s["params"] is not None and s["source_params"]:
            params += f" ({s['params'] / s['source_params']:.0%} of source)"
        rows.append(
            [
                _e(v["name"]),
                _e(v["target"]),
                f"<code>{_e(v['pipeline'] or '(none)')}</code>",
                _accuracy_cell(acc),
                _num(acc.get("samples"), "d") if acc and acc.get("samples") is not None else "",
                _bytes(s["library_bytes"]),
                _bytes(s["onnx_bytes"]),
                params,
                _num(v["cosine"], ".6f"),
                _latency_cell(v["latency"]),
            ]
        )
    return _table(head, rows, {0, 1, 2, 3, 9})


def _figure(svg: str, caption: str, ident: str) -> str:
    return f'<figure id="{ident}">{svg}<figcaption>{caption}</figcaption></figure>'


def _comparison_charts(variants: Sequence[dict[str, Any]]) -> str:
    parts = []
    with_acc = [v for v in variants if v["accuracy"]]
    metrics = sorted({v["accuracy"]["metric"] for v in with_acc})
    if with_acc:
        metric = metrics[0]
        points = [
            {
                "name": v["name"],
                "bytes": v["sizes"]["library_bytes"],
                "accuracy": v["accuracy"]["final"],
                "label": f"{v['latency']['ratio']:.2f}x ORT"
                if v["latency"] and v["latency"]["kind"] == "ratio"
                else "",
            }
            for v in with_acc
            if v["accuracy"]["metric"] == metric
        ]
        caption = f"{_e(metric)} against the library's size, one point per package"
        if len(metrics) > 1:
            caption += f" (packages measured with {_e(', '.join(metrics[1:]))} are in the table)"
        parts.append(_figure(charts.accuracy_vs_size(points, metric), caption, "fig-accuracy"))
    else:
        parts.append(
            f"<p>Accuracy: {_na()} for any package (no <code>accuracy</code> in the "
            "manifests, no <code>--eval</code>).</p>"
        )
    timed = [v for v in variants if v["latency"] and v["latency"]["kind"] == "ratio"]
    if timed:
        svg = charts.latency_ratios(
            [v["name"] for v in timed], [v["latency"]["ratio"] for v in timed]
        )
        caption = (
            "median time of the compiled library over ONNX Runtime's on the same graph, "
            "same run (edgecc bench); below 1 is faster than ONNX Runtime"
        )
        parts.append(_figure(svg, caption, "fig-latency"))
    counted = [v for v in variants if v["latency"] and v["latency"]["kind"] == "instructions"]
    if counted:
        svg = charts.instructions(
            [v["name"] for v in counted],
            [v["latency"]["instructions_per_inference"] for v in counted],
        )
        caption = (
            "executed instructions per inference under qemu (emulated aarch64 packages: "
            "their times say nothing about the board)"
        )
        parts.append(_figure(svg, caption, "fig-instructions"))
    if not timed and not counted:
        parts.append(
            f"<p>Latency: {_na()} (run <code>edgecc bench PKG</code> or "
            "<code>edgecc report --bench</code>).</p>"
        )
    return "\n".join(parts)


def _sensitivity(results: Sequence[dict[str, Any]]) -> str:
    if not results:
        return f"<p>Sensitivity: {_na()} (<code>edgecc sensitivity</code>).</p>"
    parts = []
    for i, s in enumerate(results):
        metric = s["metric"] or "metric"
        title = " ".join(x for x in (s["model"], f"pass {s['pass']}" if s["pass"] else None) if x)
        parts.append(f"<h3>{_e(title or s['source'])}</h3>")
        if s["baseline"] is not None:
            parts.append(f"<p>float {_e(metric)}: {_num(s['baseline'])}</p>")
        if s["layers"]:
            caption = f"{_e(metric)} drop per layer, largest first"
            if len(s["layers"]) > charts.MAX_BARS:
                caption += f" ({charts.MAX_BARS} of {len(s['layers'])} layers shown; all below)"
            svg = charts.sensitivity(s["layers"], metric, i)
            parts.append(_figure(svg, caption, f"fig-sensitivity-{i}"))
        rows = [
            [
                _e(r["layer"]),
                _e(r["op"] or ""),
                _num(r["metric"]),
                _num(r["drop"], ".3g"),
                _num(r["params"], ",d") if r["params"] is not None else "",
            ]
            for r in s["layers"]
        ]
        parts.append(_table(["layer", "op", _e(metric), "drop", "params"], rows, {0, 1}))
    return "\n".join(parts)


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column == "cosine":
        return _e(f"{value:.6f}")
    if column == "max_abs_diff":
        return _e(f"{value:.3g}")
    if column in ("params", "macs", "bytes", "nodes") and isinstance(value, int):
        return f"{value:,}"
    return _e(value)


def _package(v: dict[str, Any]) -> str:
    from edgecc.report.variants import PASS_COLUMNS

    parts = [
        f"<h3>{_e(v['name'])}</h3>",
        f"<p>{_e(v['path'])}: {_e(v['target'])}, pipeline "
        f"<code>{_e(v['pipeline'] or '(none)')}</code></p>",
    ]
    acc = v["accuracy"]
    if acc:
        facts = [f"{_e(acc['metric'])} {_num(acc['final'])}"]
        if acc.get("float") is not None:
            facts.append(f"float {_num(acc['float'])}")
        if acc.get("drop") is not None:
            facts.append(f"drop {_num(acc['drop'], '.3g')}")
        if acc.get("max_drop") is not None:
            within = acc["drop"] is not None and acc["drop"] <= acc["max_drop"]
            facts.append(
                f"budget {_num(acc['max_drop'], '.3g')} ({'met' if within else 'NOT met'})"
            )
        if acc.get("top5") is not None:
            facts.append(f"top5 {_num(acc['top5'])}")
        if acc.get("samples") is not None:
            facts.append(f"{acc['samples']} samples")
        if acc.get("data"):
            facts.append(f"data {_e(acc['data'])}")
        parts.append(f"<p>Accuracy ({_e(v['accuracy_source'])}): {', '.join(facts)}</p>")
    else:
        parts.append(f"<p>Accuracy: {_na()}</p>")
    rows = [[_cell(r.get(c), c) for c in PASS_COLUMNS] for r in v["passes"]]
    if rows:
        parts.append(_table(list(PASS_COLUMNS), rows, {0, 1}))
    else:
        parts.append(f"<p>Per-pass table: {_na()} (no report.json rows)</p>")
    kept = v["kept_float"]
    if kept is None:
        parts.append(f"<p>Kept float: {_na()} (no accuracy budget)</p>")
    elif not kept:
        parts.append("<p>Kept float: none (every quantizable layer is int8)</p>")
    else:
        items = "".join(f"<li><code>{_e(n)}</code></li>" for n in kept)
        parts.append(f"<p>Kept float ({len(kept)}):</p><ul>{items}</ul>")
    if v["spared"]:
        rows = [[_e(s["layer"]), _num(s["ratio"], ".3g")] for s in v["spared"]]
        parts.append("<p>Spared (compressed less than asked):</p>")
        parts.append(_table(["layer", "ratio"], rows, {0}))
    return "\n".join(parts)


def render(data: dict[str, Any]) -> str:
    """The HTML page of the report ``data`` (see the module docstring)."""
    variants = data["variants"]
    notes = data.get("notes") or []
    body = [
        f"<h1>{_e(data['title'])}</h1>",
        "<h2>Variants</h2>",
        _summary(variants),
    ]
    if notes:
        body.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    body += [
        "<h2>Accuracy, size and speed</h2>",
        _comparison_charts(variants),
        "<h2>Per-layer sensitivity</h2>",
        _sensitivity(data.get("sensitivity") or []),
        "<h2>Packages: passes, cosine per pass, what was kept float</h2>",
        "<p>cosine: the graph's outputs after each pass against the source model's float "
        "outputs on the probe input (ONNX Runtime, optimisations off).</p>",
        *(_package(v) for v in variants),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{_e(data['title'])}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
