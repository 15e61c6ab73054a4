"""Metrics, numerical comparison, summaries, and the HTML report of compressed variants.

``edgecc.report(packages, out)`` writes the report page (:func:`write_report`): the module
itself is callable, so the API name and this package's name can be the same.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def write_report(
    packages: Sequence[str | Path],
    out: str | Path,
    *,
    evals: Mapping[str, str | Path] | Sequence[str] | None = None,
    sensitivity: Sequence[str | Path] = (),
    bench: bool = False,
    data: str | Path | None = None,
    title: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write one self-contained HTML page comparing the variants ``packages`` to ``out``.

    The page shows accuracy against size, latency as a ratio to ONNX Runtime (instruction
    counts for emulated packages), the per-layer sensitivity, and per package the pass table
    with the cosine after each pass and the layers kept float. The file is written atomically:
    a failure leaves no file, and an earlier one at ``out`` untouched.

    Args:
        packages: package folders (variants of one model: fp32, int8, pruned...).
        out: the HTML file to write (parent folders are created).
        evals: accuracy per package, ``edgecc eval --json`` files: ``["PKG=FILE.json"]`` or
            ``{PKG: FILE}`` (PKG: the path as given or the folder name); wins over the
            manifest's ``accuracy``.
        sensitivity: ``edgecc sensitivity --json`` files to chart.
        bench: time x86 packages that have no ``bench.json`` (saved as their ``bench.json``).
        data: evaluate packages without accuracy on this data (needs ``edgecc eval``).
        title: the page title.
        progress: called with one-line progress messages.

    Returns:
        The report's data (what ``edgecc --json report`` prints), with ``output``: the path.
    """
    from edgecc.report.html import render
    from edgecc.report.variants import collect, write_text_atomic

    report = collect(
        packages,
        evals=evals,
        sensitivity_files=sensitivity,
        bench=bench,
        data=data,
        title=title,
        progress=progress,
    )
    page = render(report)  # everything that can fail on bad input fails before the write
    out = Path(out)
    write_text_atomic(out, page)
    report["output"] = str(out)
    return report


class _CallableModule(types.ModuleType):
    """``edgecc.report(...)`` calls :func:`write_report`; submodules import as usual."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return write_report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
