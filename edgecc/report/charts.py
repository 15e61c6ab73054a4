"""The report's charts as inline SVG text, drawn with matplotlib (no JavaScript, no network).

matplotlib renders on the host at report time, so the page needs nothing but the browser: no
plotting library's JavaScript to embed, no CDN, and the charts print and archive as they are.
Each chart is a :class:`matplotlib.figure.Figure` (no pyplot: no global state, no GUI backend)
saved as SVG with text kept as ``<text>`` (``svg.fonttype: none``, small and searchable) and
math parsing off (layer names such as ``/blocks.0/Conv$1`` are shown as written). The SVG is
made embeddable (:func:`_inline`): no XML prologue, DOCTYPE or namespace URLs, and every
``id`` prefixed by the chart's name so that several charts in one page cannot collide.
Labels are cut to :data:`LABEL_CHARS` characters (the tables give them whole); matplotlib
escapes the text it writes.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

LABEL_CHARS = 40
# The sensitivity chart shows this many of the most damaging layers (the table lists all).
MAX_BARS = 25
COLOUR = "#3465a4"
ACCENT = "#cc0000"


def _short(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "\u2026"


def _figure(width: float, height: float, left: float = 0.8) -> Any:
    """A figure with margins in inches (``left`` for the y labels): a fixed layout is 5x
    faster to draw than matplotlib's constrained one, which measures every text."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(
        left=left / width, right=1 - 0.25 / width, bottom=0.55 / height, top=1 - 0.15 / height
    )
    return fig


def _svg(fig: Any, name: str) -> str:
    import matplotlib

    buf = io.StringIO()
    rc = {"svg.fonttype": "none", "svg.hashsalt": name, "text.parse_math": False}
    with matplotlib.rc_context(rc):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None})
    return _inline(buf.getvalue(), name)


def _inline(svg: str, name: str) -> str:
    """matplotlib's SVG document as an element to place in HTML (see the module docstring)."""
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg, count=2)
    svg = svg.replace("xlink:href=", "href=")
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    ids = set(re.findall(r'\bid="([^"]+)"', svg))

    def prefix(m: re.Match[str]) -> str:
        head, ident, tail = m.group(1), m.group(2), m.group(3)
        return f"{head}{name}-{ident}{tail}" if ident in ids else m.group(0)

    svg = re.sub(r'(\bid=")([^"]+)(")', prefix, svg)
    svg = re.sub(r"(url\(#)([^)]+)(\))", prefix, svg)
    svg = re.sub(r'(href="#)([^"]+)(")', prefix, svg)
    return svg.replace("<svg ", f'<svg class="chart" role="img" aria-label="{name}" ', 1)


def accuracy_vs_size(points: Sequence[dict[str, Any]], metric: str) -> str:
    """Scatter of accuracy (y) against library bytes (x), one labelled point per variant.

    Args:
        points: ``{"name", "bytes", "accuracy", "label"}`` (label: an extra line, e.g. the
            latency ratio).
        metric: the y axis' name.
    """
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot()
    xs = [p["bytes"] / 1e6 for p in points]
    ys = [p["accuracy"] for p in points]
    ax.scatter(xs, ys, s=40, color=COLOUR, zorder=3)
    for p, x, y in zip(points, xs, ys, strict=True):
        text = _short(p["name"]) + (f"\n{p['label']}" if p.get("label") else "")
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("model.so size (MB)")
    ax.set_ylabel(metric)
    ax.set_xlim(left=0, right=max(xs) * 1.35 if max(xs) > 0 else 1)
    ax.margins(y=0.25)
    ax.grid(True, alpha=0.3)
    return _svg(fig, "chart-accuracy")


def _barh(
    labels: Sequence[str], values: Sequence[float], xlabel: str, name: str, line: float | None
) -> str:
    shown = [_short(s) for s in labels]
    # about 0.06 in per character of an 8 pt label, plus the tick
    fig = _figure(6.4, 0.9 + 0.3 * len(labels), 0.2 + 0.06 * max(map(len, shown), default=1))
    ax = fig.add_subplot()
    ys = list(range(len(labels)))
    colours = [ACCENT if line is not None and v > line else COLOUR for v in values]
    ax.barh(ys, values, color=colours, zorder=3)
    ax.set_yticks(ys, shown, fontsize=8)
    ax.invert_yaxis()  # the first row on top, as in the table
    ax.set_xlabel(xlabel)
    if line is not None:
        ax.axvline(line, color="#555555", linestyle="--", linewidth=1, zorder=4)
    for y, v in zip(ys, values, strict=True):
        ax.annotate(f"{v:.3g}", (v, y), textcoords="offset points", xytext=(3, -3), fontsize=7)
    ax.margins(x=0.15)
    ax.grid(True, axis="x", alpha=0.3)
    return _svg(fig, name)


def latency_ratios(names: Sequence[str], ratios: Sequence[float]) -> str:
    """Bars of edgecc time / ONNX Runtime time per variant (dashed line at 1: parity)."""
    return _barh(names, ratios, "edgecc / ONNX Runtime time (lower is faster)", "chart-latency", 1)


def instructions(names: Sequence[str], counts: Sequence[float]) -> str:
    """Bars of executed instructions per inference (emulated aarch64 variants), in millions."""
    return _barh(
        names,
        [c / 1e6 for c in counts],
        "million instructions per inference (aarch64 under qemu)",
        "chart-instructions",
        None,
    )


def sensitivity(layers: Sequence[dict[str, Any]], metric: str, index: int) -> str:
    """Bars of the metric drop when only that layer is compressed (largest first)."""
    shown = list(layers[:MAX_BARS])
    return _barh(
        [r["layer"] for r in shown],
        [r["drop"] for r in shown],
        f"{metric} drop when only this layer is compressed",
        f"chart-sensitivity-{index}",
        None,
    )
