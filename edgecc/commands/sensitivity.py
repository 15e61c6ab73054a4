"""``edgecc sensitivity``: the metric drop of a lossy pass applied to one layer at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgecc.cli import (
    _check_writable_dir,
    _data_options,
    _emit,
    _examples,
    _global_flags,
    _input_values,
    _model_options,
    _progress,
)


@click.command(
    "sensitivity",
    epilog=_examples(
        "edgecc sensitivity model.pt --input-shape x:1x1x28x28 --data fashion-mnist "
        "--calib calib.npz --passes qdq -o sens.json",
        "edgecc sensitivity model.onnx --data test.npz --passes 'prune(ratio=0.5)'",
    ),
)
@_global_flags
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@_data_options
@click.option(
    "--passes",
    default="qdq",
    show_default=True,
    help="The pass to study (qdq, prune(...), lowrank(...)); earlier entries run first on "
    "every layer, e.g. 'fold-bn,qdq'.",
)
@click.option(
    "--calib", default=None, metavar="DATA.npz|DIR|random", help="Calibration data for qdq."
)
@click.option(
    "--calib-samples", type=int, default=None, help="Use at most this many calibration samples."
)
@click.option(
    "--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Samples per run."
)
@click.option(
    "--samples", type=click.IntRange(min=1), default=None, help="Use the first N samples only."
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the table as JSON here.",
)
@_model_options
@click.option(
    "-t", "--target", default=None, help="Target whose pass defaults apply (qdq activations)."
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
def sensitivity_cmd(
    model: Path,
    data: str | None,
    metric: str | None,
    passes: str,
    calib: str | None,
    calib_samples: int | None,
    batch: int,
    samples: int | None,
    out: Path | None,
    input_shapes: tuple[str, ...],
    trust_code: bool,
    input_values: tuple[str, ...],
    target: str | None,
    seed: int,
) -> None:
    """Per-layer sensitivity of MODEL to one pass, sorted by damage."""
    from edgecc.errors import UserInputError
    from edgecc.evaluation.sensitivity import sensitivity
    from edgecc.package import write_json

    if data is None:
        raise UserInputError("sensitivity needs --data DATA.npz|DIR|fashion-mnist|digits")
    if out is not None:
        _check_writable_dir(out.parent if str(out.parent) else Path("."), "-o")
    result = sensitivity(
        model,
        data,
        passes,
        calib=calib,
        calib_samples=calib_samples,
        metric=metric,
        batch_size=batch,
        samples=samples,
        input_shapes=input_shapes,
        trust_code=trust_code,
        input_values=_input_values(input_values),
        target=target,
        seed=seed,
        progress=_progress,
    )
    if out is not None:
        write_json(out, result)
    _emit(result, text(result) + (f"\nwritten to {out}" if out else ""))


def text(result: dict[str, Any]) -> str:
    """The table, most damaging layer first."""
    header = ["layer", "op", result["metric"], "drop", "params"]
    cells = [
        [r["layer"], r["op"], f"{r['metric']:.6g}", f"{r['drop']:.4g}", f"{r['params']:,}"]
        for r in result["layers"]
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *cells]
    ]
    return (
        f"{result['pass']} on {result['model']}, {result['metric']} baseline "
        f"{result['baseline']:.6g} on {result['samples']} samples ({result['seconds']:.1f} s)\n"
        + "\n".join(lines)
    )
