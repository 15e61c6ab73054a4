"""``edgecc report PKG... -o report.html``: one offline HTML page comparing variants of a model."""

from __future__ import annotations

from pathlib import Path

import click

from edgecc.cli import _emit, _examples, _global_flags, _progress


@click.command(
    "report",
    epilog=_examples(
        "edgecc report build/m-fp32 build/m-int8 build/m-pruned -o report.html",
        "edgecc report build/m-int8 --eval build/m-int8=e.json --sensitivity sens.json --bench",
    ),
)
@_global_flags
@click.argument("packages", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("report.html"),
    show_default=True,
    help="The HTML file to write (atomically).",
)
@click.option(
    "--eval",
    "evals",
    multiple=True,
    metavar="PKG=FILE.json",
    help="Accuracy of a package: `edgecc eval --json` output (repeatable; wins over the "
    "manifest's accuracy).",
)
@click.option(
    "--sensitivity",
    "sensitivity",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="SENS.json",
    help="`edgecc sensitivity --json` output to chart (repeatable).",
)
@click.option(
    "--bench",
    is_flag=True,
    help="Time x86 packages without a bench.json against ONNX Runtime (saved as bench.json).",
)
@click.option(
    "--data",
    default=None,
    metavar="DATA",
    help="Evaluate packages that have no accuracy on this labelled data (edgecc eval).",
)
@click.option("--title", default=None, help="Page title [default: the package names].")
def report_cmd(
    packages: tuple[Path, ...],
    out: Path,
    evals: tuple[str, ...],
    sensitivity: tuple[Path, ...],
    bench: bool,
    data: str | None,
    title: str | None,
) -> None:
    """Write one self-contained HTML page comparing PACKAGES (variants of one model).

    \b
    It shows accuracy vs size, latency as a ratio to ONNX Runtime (from each package's
    bench.json, written by `edgecc bench`; instruction counts for emulated packages), the
    per-layer sensitivity chart, and per package the pass table with the cosine after each pass
    and the layers kept float. Charts are inline SVG: the page loads nothing from the network.
    """
    from edgecc.report import write_report

    res = write_report(
        packages,
        out,
        evals=evals,
        sensitivity=sensitivity,
        bench=bench,
        data=data,
        title=title,
        progress=_progress,
    )
    missing = [v["name"] for v in res["variants"] if not v["accuracy"]]
    lines = [f"wrote {out}: {len(res['variants'])} packages"]
    if missing:
        lines.append(f"accuracy not measured: {', '.join(missing)}")
    lines += [f"note: {n}" for n in res["notes"]]
    _emit(res, "\n".join(lines))
