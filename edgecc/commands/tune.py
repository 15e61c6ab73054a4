"""``edgecc tune``: MetaSchedule tuning on top of the schedule rules, into a record folder.

The command compiles MODEL as ``edgecc compile`` does (the same model, shape and pass options,
taken from that command) with every kernel tuned first (:mod:`edgecc.lower.tune`): ``--trials``
measured candidates per kernel, after the rule's schedule, measured once as the baseline. The
records go to ``--records DIR`` (default: the target's cache ``~/.cache/edgecc/tuning/<target>``,
``$EDGECC_CACHE`` if set); kernels that already have ``--trials`` + 1 records there are not
measured again. The tuned package is written to ``-o`` when given (otherwise it is only checked
and dropped). Ctrl-C keeps the records measured so far (exit 130).

With ``--rpc-tracker HOST:PORT --rpc-key KEY`` the candidates are timed on the boards registered
under KEY (``edgecc.rpc.make_runner``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click

from edgecc.cli import _emit, _examples, _global_flags, _input_values, _progress, compile_cmd
from edgecc.errors import UserInputError

# compile's options that say what the model is, how to load it and which passes run
SHARED_OPTIONS = (
    "model",
    "target",
    "input_shapes",
    "passes",
    "disabled",
    "no_cleanup",
    "probe",
    "trust_code",
    "input_values",
    "seed",
)
RPC_TIMEOUT_SECONDS = 60.0


def rpc_runner(tracker: str | None, key: str | None, timeout: float = RPC_TIMEOUT_SECONDS) -> Any:
    """The MetaSchedule runner timing candidates on the boards under ``key`` (None: locally).

    Raises:
        UserInputError: only one of the two options, or the RPC support is missing.
    """
    if tracker is None and key is None:
        return None
    if tracker is None or key is None:
        raise UserInputError("--rpc-tracker HOST:PORT and --rpc-key KEY go together")
    try:
        from edgecc.rpc import make_runner
    except ImportError as err:
        if getattr(err, "name", None) not in ("edgecc.rpc", None) and "make_runner" not in str(err):
            raise
        raise UserInputError(
            "RPC support is not installed (edgecc.rpc is missing): tune on this host "
            "without --rpc-tracker/--rpc-key"
        ) from err
    return make_runner(tracker, key, timeout)


@click.command(
    "tune",
    epilog=_examples(
        "edgecc tune model.onnx --target x86 --trials 16",
        "edgecc tune model.onnx --records tuning/ -o build/m-tuned",
        "edgecc compile model.onnx --tuning-records tuning/ -o build/m",
    ),
)
@_global_flags
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Measured MetaSchedule candidates per kernel (the rule's schedule is measured on top).",
)
@click.option(
    "--records",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="DIR",
    help="Record folder (MetaSchedule JSON database) [default: ~/.cache/edgecc/tuning/<target>].",
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    default=None,
    help="Also keep the tuned package here.",
)
@click.option("--rpc-tracker", default=None, metavar="HOST:PORT", help="Time on RPC boards.")
@click.option("--rpc-key", default=None, metavar="KEY", help="Board key on the tracker.")
@click.option(
    "--rpc-timeout",
    type=click.FloatRange(min=1.0),
    default=RPC_TIMEOUT_SECONDS,
    show_default=True,
    help="Seconds a board may take per candidate.",
)
def tune_cmd(
    trials: int,
    records: Path | None,
    out: Path | None,
    rpc_tracker: str | None,
    rpc_key: str | None,
    rpc_timeout: float,
    **options: Any,
) -> None:
    """Tune MODEL's kernels for a target; the records make later compiles faster
    (`edgecc compile --tuning-records DIR`)."""
    from edgecc.api import compile as compile_model

    runner = rpc_runner(rpc_tracker, rpc_key, rpc_timeout)
    with tempfile.TemporaryDirectory(prefix="edgecc-tune-") as scratch:
        pkg = compile_model(
            options["model"],
            options["target"],
            out=out or Path(scratch) / "package",
            input_shapes=options["input_shapes"],
            passes=options["passes"],
            disable_passes=options["disabled"],
            cleanup=not options["no_cleanup"],
            trust_code=options["trust_code"],
            input_values=_input_values(options["input_values"]),
            seed=options["seed"],
            probe=options["probe"],
            progress=_progress,
            tuning_records=records,
            tune_trials=trials,
            tuning_runner=runner,
        )
        facts = pkg.manifest["library"]["tuning"]
    text = (
        f"tuned {options['model']} for {pkg.manifest['target']['name']}: "
        f"{len(facts['kernels_tuned'])} kernels from records, "
        f"{len(facts['kernels_rules'])} by the rules; {facts.get('measured', 0)} candidates "
        f"and {facts.get('baselines_measured', 0)} rule baselines measured, "
        f"{facts.get('kernels_reused', 0)} kernels reused existing records, "
        f"{facts['seconds']:.0f} s\nrecords in {facts['records']}"
        + (f"\npackage {out}" if out else "")
    )
    _emit({"tuning": facts, "package": str(out) if out else None}, text)


tune_cmd.params[:0] = [p for p in compile_cmd.params if p.name in SHARED_OPTIONS]
