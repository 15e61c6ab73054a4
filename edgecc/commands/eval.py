"""``edgecc eval``: accuracy of a source model, an ONNX graph or a compiled package on data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgecc.cli import _data_options, _emit, _examples, _global_flags, _input_values, _model_options


@click.command(
    "eval",
    epilog=_examples(
        "edgecc eval model.pt --input-shape x:1x1x28x28 --data fashion-mnist",
        "edgecc eval build/m --data test.npz --json",
        "edgecc eval build/m-int8 --data sentences.npz --reference model.onnx",
    ),
)
@_global_flags
@click.argument("model", type=click.Path(path_type=Path))
@_data_options
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    default=None,
    help="Float model to measure agreement against [default: the source model].",
)
@click.option(
    "--batch", type=click.IntRange(min=1), default=64, show_default=True, help="Samples per run."
)
@click.option(
    "--samples", type=click.IntRange(min=1), default=None, help="Use the first N samples only."
)
@click.option("--output", "output_name", default=None, help="Output to score [default: first].")
@_model_options
@click.option(
    "-t",
    "--target",
    default=None,
    help="Run a package as this target (built elsewhere) [default: its manifest's].",
)
def eval_cmd(
    model: Path,
    data: str | None,
    metric: str | None,
    reference: Path | None,
    batch: int,
    samples: int | None,
    output_name: str | None,
    input_shapes: tuple[str, ...],
    trust_code: bool,
    input_values: tuple[str, ...],
    target: str | None,
) -> None:
    """Accuracy of MODEL (.pt, .pt2, .onnx or a package folder) on --data."""
    from edgecc.errors import UserInputError
    from edgecc.evaluation import evaluate

    if data is None:
        raise UserInputError("eval needs --data DATA.npz|DIR|fashion-mnist|digits")
    result = evaluate(
        model,
        data,
        metric=metric,
        reference=reference,
        batch_size=batch,
        output=output_name,
        samples=samples,
        input_shapes=input_shapes,
        trust_code=trust_code,
        input_values=_input_values(input_values),
        target=target,
    )
    _emit(result, text(result))


def text(result: dict[str, Any]) -> str:
    """The readable form of an evaluation result."""
    lines = [f"{result['model']} on {result['data']}: {result['samples']} samples"]
    if "top1" in result:
        lines.append(f"top-1 {result['top1']:.2f} %, top-5 {result['top5']:.2f} %")
    agree = result.get("agreement")
    if agree:
        lines.append(
            f"agreement with {result.get('reference', 'the reference')}: "
            f"{'sentence-embedding ' if agree['pooled'] else ''}cosine {agree['cosine']:.6f} "
            f"(min {agree['cosine_min']:.6f}), max abs error {agree['max_abs_error']:.4g}"
            + (f", top-1 agreement {agree['top1']:.2f} %" if agree["top1"] is not None else "")
        )
    lines.append(f"{result['metric']}: {result['value']:.6g} ({result['seconds']:.1f} s)")
    return "\n".join(lines)
