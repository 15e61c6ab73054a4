"""The ``edgecc`` command line: a thin layer over :mod:`edgecc.api`.

Errors a user can cause print one line (``edgecc: error: ...``) on stderr and exit with the code
of their class (see :mod:`edgecc.errors`); ``--debug`` adds the traceback and the rest of a
multi-line message. ``--json`` prints one JSON document on stdout and nothing else there; progress
goes to stderr. The global flags (``--debug``, ``--json``, ``-q``, ``-v``) are accepted before and
after the command name. SIGINT and SIGTERM end a command with exit code 130 and keep an earlier
package (see :mod:`edgecc.interrupt`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from edgecc import interrupt
from edgecc.errors import (
    EXIT_CHECK_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USER,
    EdgeccError,
    UserInputError,
    as_user_error,
    first_line,
)


class _State:
    debug = False
    json = False
    quiet = False
    verbose = False


STATE = _State()


def _progress(msg: str) -> None:
    interrupt.check()  # a signal TVM swallowed stops the compile at its next step
    if not STATE.quiet:
        click.echo(f"edgecc: {msg}", err=True)


def _emit(data: dict[str, Any], text: str) -> None:
    """Print ``data`` as JSON with --json, else the readable ``text``."""
    if STATE.json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo(text.rstrip("\n"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgecc")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@click.option("-v", "--verbose", is_flag=True, help="Log what each pass does.")
def cli(debug: bool, as_json: bool, quiet: bool, verbose: bool) -> None:
    """edgecc: compile PyTorch/ONNX models for edge devices through graph passes and TVM.

    \b
    Example:
      edgecc compile model.onnx --target rpi4 -o build/m
      edgecc run build/m --check
    """
    STATE.debug, STATE.json, STATE.quiet = debug, as_json, quiet
    STATE.verbose = verbose
    _configure_logging()


def _configure_logging() -> None:
    level = logging.DEBUG if STATE.debug else logging.INFO if STATE.verbose else logging.WARNING
    logging.basicConfig(level=level, format="edgecc: %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)


def _set_flag(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        setattr(STATE, str(param.name), True)
        _configure_logging()


def _global_flags(command: Any) -> Any:
    """Accept the global flags after the command name too (``edgecc compile -q ...``)."""
    for decls, name, text in reversed(
        [
            (("--debug",), "debug", "Show tracebacks and debug logs (global flag)."),
            (("--json",), "json", "Print machine-readable JSON on stdout (global flag)."),
            (("-q", "--quiet"), "quiet", "No progress messages (global flag)."),
            (("-v", "--verbose"), "verbose", "Log what each pass does (global flag)."),
        ]
    ):
        command = click.option(
            *decls, name, is_flag=True, expose_value=False, callback=_set_flag, help=text
        )(command)
    return command


def _examples(*lines: str) -> str:
    """A help epilog of example command lines (kept as written by ``\\b``)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def _target_names() -> str:
    from edgecc.targets import all_targets

    return ", ".join(t.name for t in all_targets())


def _model_options(command: Any) -> Any:
    """How to load a model: ``--input-shape``, ``--trust-code``, ``--input-value`` (compile, eval,
    sensitivity share them; the command receives ``input_shapes``, ``trust_code`` and
    ``input_values``)."""
    options = [
        click.option(
            "--input-shape",
            "input_shapes",
            multiple=True,
            metavar="NAME:1x3x224x224[:DTYPE]",
            help="Input name, shape and dtype where the model does not record them (repeatable).",
        ),
        click.option(
            "--trust-code",
            "--trust-pickle",
            "trust_code",
            is_flag=True,
            help="Load a file that runs its own code: a pickled nn.Module, pickled .pt2 members, "
            "TorchScript calling file or network operators.",
        ),
        click.option(
            "--input-value",
            "input_values",
            multiple=True,
            metavar="NAME=VALUE",
            help="Constant value of a non-tensor forward argument, e.g. sr=16000 (repeatable).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _data_options(command: Any) -> Any:
    """``--data`` and ``--metric`` (compile, eval, sensitivity)."""
    options = [
        click.option(
            "--data",
            metavar="DATA.npz|DIR|fashion-mnist|digits",
            default=None,
            help="Evaluation data: arrays named like the inputs plus 'labels', or a folder "
            "(see README 'Evaluation').",
        ),
        click.option(
            "--metric",
            type=click.Choice(["top1", "top5", "agreement"]),
            default=None,
            help="top1/top5 in percent (needs labels) or agreement (cosine vs the float model) "
            "[default: top1 with labels, else agreement].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command(
    "compile",
    epilog=_examples(
        "edgecc compile model.onnx --target rpi4 -o build/m",
        "edgecc compile model.pt --input-shape x:1x3x224x224 --passes 'fold-bn,qdq' --calib random",
    ),
)
@_global_flags
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "-t",
    "--target",
    default="x86",
    show_default=True,
    help=f"Target name: {_target_names()} (details: `edgecc targets`).",
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    help="Package folder [default: build/<model>-<target>].",
)
@_model_options
@click.option(
    "--passes",
    default=None,
    help="Pipeline text, e.g. 'fold-bn,prune(ratio=0.3),qdq'; replaces the target's default "
    "pipeline (see `edgecc targets`), it does not add to it.",
)
@click.option(
    "--disable-pass", "disabled", multiple=True, metavar="NAME", help="Skip a pass (repeatable)."
)
@click.option(
    "--dump-dir",
    type=click.Path(path_type=Path, file_okay=False, writable=True),
    help="Write the graph after every pass and a summary table here.",
)
@click.option(
    "--no-cleanup",
    "no_cleanup",
    is_flag=True,
    help="Do not run fold-constants,remove-identity,eliminate-dead before the pipeline.",
)
@click.option("--time-passes", is_flag=True, help="Print the time each pass took.")
@click.option(
    "--calib", default=None, metavar="DATA.npz|DIR|random", help="Calibration data for qdq."
)
@click.option(
    "--calib-samples", type=int, default=None, help="Use at most this many calibration samples."
)
@click.option(
    "--train",
    "train_data",
    type=click.Path(path_type=Path),
    default=None,
    help="Training data for distill: .npz with arrays named like the inputs, optional labels.",
)
@click.option(
    "--probe",
    type=click.Path(path_type=Path),
    help="Input (.npy/.npz) the reference and per-pass comparisons use [default: seeded N(0,1)].",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the probe input and random calibration.",
)
@click.option(
    "--min-cosine",
    type=float,
    default=None,
    help="Exit 4 (no package) when the cosine vs the source model's float output is below this.",
)
@_data_options
@click.option(
    "--max-drop",
    type=float,
    default=None,
    help="Accuracy budget on --data: keep the most sensitive qdq layers float (spare prune/"
    "lowrank layers) until the drop is at most this (top1: points; agreement: 1 - cosine); "
    "exit 4 if even all of them cannot.",
)
@click.option(
    "--tuning-records",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="DIR",
    help="Apply these tuning records (`edgecc tune`); kernels without one use the rules.",
)
@click.option(
    "--tune-trials",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="Tune each kernel with N measured candidates first, into --tuning-records DIR or "
    "the target's cache (~/.cache/edgecc/tuning/<target>).",
)
def compile_cmd(
    model: Path,
    target: str,
    out: Path | None,
    input_shapes: tuple[str, ...],
    passes: str | None,
    disabled: tuple[str, ...],
    dump_dir: Path | None,
    no_cleanup: bool,
    time_passes: bool,
    calib: str | None,
    calib_samples: int | None,
    train_data: Path | None,
    probe: Path | None,
    trust_code: bool,
    input_values: tuple[str, ...],
    seed: int,
    min_cosine: float | None,
    data: str | None,
    metric: str | None,
    max_drop: float | None,
    tuning_records: Path | None,
    tune_trials: int,
) -> None:
    """Compile MODEL (.pt, .pt2, .onnx) into a package for a target."""
    from edgecc.api import compile as compile_model
    from edgecc.passes.dump import format_table

    out = out or Path("build") / f"{model.stem}-{target}"
    if dump_dir is not None:
        _check_writable_dir(dump_dir, "--dump-dir")
    pkg = compile_model(
        model,
        target,
        out=out,
        input_shapes=input_shapes,
        passes=passes,
        disable_passes=disabled,
        cleanup=not no_cleanup,
        calib=calib,
        calib_samples=calib_samples,
        dump_dir=dump_dir,
        trust_code=trust_code,
        input_values=_input_values(input_values),
        seed=seed,
        probe=probe,
        min_cosine=min_cosine,
        progress=_progress,
        data=data,
        metric=metric,
        max_drop=max_drop,
        tuning_records=tuning_records,
        tune_trials=tune_trials,
        train_data=train_data,
    )
    rep, man = pkg.report, pkg.manifest
    rows = rep["passes"]
    table = format_table(
        [
            {k: v for k, v in r.items() if k != "info" and (time_passes or k != "seconds")}
            for r in rows
        ]
    )
    g = rep["graph_vs_reference"]
    text = (
        f"compiled {model} for {man['target']['name']} -> {pkg.path}\n"
        f"{table}"
        f"against the source model's float reference: max_abs_diff {g['max_abs_diff']:.3g}, "
        f"cosine {g['cosine']:.6f}\n"
        f"{_sizes(rep)}\n"
        f"library sha256 {man['library']['sha256'][:12]}, "
        f"compiled in {rep['compile_seconds']:.1f}s, total {rep['total_seconds']:.1f}s"
        + (f"\ndumps in {dump_dir}" if dump_dir else "")
        + (
            f"\nCUDA device code: {man['library']['cuda_code']}"
            if man["library"].get("cuda_code")
            else ""
        )
        + _tuning_line(man["library"].get("tuning"))
        + "".join(f"\nnote: {n}" for n in man["library"].get("notes", []))
        + _accuracy_text(man)
    )
    _emit({"package": str(pkg.path), "manifest": man, "report": rep}, text)


def _accuracy_text(manifest: dict[str, Any]) -> str:
    """The accuracy lines of a compile with --data (and --max-drop)."""
    acc = manifest.get("accuracy")
    if not acc:
        return ""
    budget = f" (max {acc['max_drop']:g})" if acc.get("max_drop") is not None else ""
    text = (
        f"\n{acc['metric']} on {acc['samples']} samples: float {acc['float']:.6g}, final "
        f"{acc['final']:.6g}, drop {acc['drop']:.4g}{budget}"
    )
    if "kept_float" in manifest:
        kept = manifest["kept_float"]
        text += f"\nkept float: {len(kept)} layers" + (f" ({', '.join(kept)})" if kept else "")
    if "spared" in manifest:
        spared = [s["layer"] for s in manifest["spared"]]
        text += f"\nspared: {len(spared)} layers" + (f" ({', '.join(spared)})" if spared else "")
    return text


def _tuning_line(tuning: dict[str, Any] | None) -> str:
    """The summary line of a build that used tuning records (empty without)."""
    if not tuning:
        return ""
    return (
        f"\ntuning records {tuning['records']}: {len(tuning['kernels_tuned'])} kernels from "
        f"records, {len(tuning['kernels_rules'])} by the rules"
        + (f", {tuning['measured']} candidates measured" if tuning.get("measured") else "")
    )


def _input_values(items: tuple[str, ...]) -> dict[str, Any]:
    """``NAME=VALUE`` texts -> values (int, float, true/false, else the text)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise UserInputError(f"bad --input-value {item!r}: expected NAME=VALUE, e.g. sr=16000")
        text = text.strip()
        value: Any = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(text)
                    break
                except ValueError:
                    continue
        out[name.strip()] = value
    return out


def _sizes(report: dict[str, Any]) -> str:
    """One line: the package's ONNX bytes (and the source's) beside the library's bytes."""
    sizes = report.get("sizes", {})
    src = sizes.get("source_onnx_bytes")
    return (
        f"bytes: model.onnx {sizes.get('onnx_bytes', '?')}"
        + (f" (source {src})" if src else "")
        + f", model.so {sizes.get('library_bytes', '?')}"
    )


def _check_writable_dir(path: Path, option: str) -> None:
    """Fail before any work if ``path`` cannot be created or written (as a folder)."""
    import os

    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"{option} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{option} {path}: {existing} is not writable")


@cli.command(
    "run",
    epilog=_examples(
        "edgecc run build/m --check", "edgecc run build/m -i inputs.npz -o outputs.npz"
    ),
)
@_global_flags
@click.argument("package", type=click.Path(path_type=Path))
@click.option(
    "-i",
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    help="x.npy (single input) or inputs.npz (by name); default: the recorded probe input.",
)
@click.option(
    "-o",
    "--output",
    "output_path",
    type=click.Path(path_type=Path),
    help="Write outputs to this .npz.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Compare with ONNX Runtime on the package graph; exit 4 on mismatch.",
)
@click.option(
    "--min-cosine",
    type=float,
    default=None,
    help="With --check: also exit 4 when the cosine vs the source model's output is below this.",
)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="TVM threads [default: cores]."
)
@click.option("--rpc-tracker", metavar="HOST:PORT", help="Run on a board of this RPC tracker.")
@click.option("--rpc-key", metavar="KEY", help="The boards' key at --rpc-tracker (e.g. rpi4).")
def run_cmd(
    package: Path,
    input_path: Path | None,
    output_path: Path | None,
    check: bool,
    min_cosine: float | None,
    threads: int | None,
    rpc_tracker: str | None,
    rpc_key: str | None,
) -> None:
    """Run a compiled PACKAGE (x86 natively, aarch64 under qemu-user emulation, or on a board
    over TVM RPC with --rpc-tracker/--rpc-key)."""
    import numpy as np

    from edgecc.package import WARN_COSINE, Package, read_arrays

    if min_cosine is not None and not check:
        raise UserInputError("--min-cosine needs --check")
    pkg = Package(package)
    inputs = read_arrays(input_path) if input_path else None
    feeds = pkg.prepare_inputs(inputs) if inputs is not None else pkg.probe_inputs()
    facts: dict[str, Any] = {}
    if rpc_tracker or rpc_key:
        from edgecc.rpc import run_package

        outputs = run_package(pkg, feeds, rpc_tracker, rpc_key, threads=threads, facts=facts)
    else:
        outputs = pkg.run(feeds, progress=_progress, threads=threads, facts=facts)
    if output_path:
        tmp = output_path.with_name(output_path.name + ".tmp.npz")
        try:
            np.savez(tmp, **outputs)
            with interrupt.commit():
                tmp.replace(output_path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if not isinstance(err, OSError):
                raise
            raise UserInputError(f"cannot write {output_path}: {err.strerror or err}") from err
    data: dict[str, Any] = {
        "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outputs.items()},
        "threads": facts.get("threads"),
    }
    lines = [
        f"{k}: {v.dtype}{list(v.shape)} mean {float(np.mean(v)):.6g}" for k, v in outputs.items()
    ]
    if output_path:
        lines.append(f"outputs written to {output_path}")
    if "board" in facts:
        data["board"] = facts["board"]
        lines.append(f"ran on board {facts['board']} (key {facts['key']})")
    if check:
        res = pkg.check(outputs, feeds, min_cosine=min_cosine)
        data["check"] = res
        lines += _check_lines(res, WARN_COSINE)
    _emit(data, "\n".join(lines))
    if check and not data["check"]["passed"]:
        sys.exit(EXIT_CHECK_FAILED)


def _check_lines(res: dict[str, Any], warn_below: float) -> list[str]:
    """The readable lines of a :meth:`Package.check` result."""
    e, rule = res["vs_expected"], res["rule"]
    if rule["kind"] == "quantized":
        steps = max((m.get("steps", 0.0) for m in e["per_output"].values()), default=0.0)
        limit = (
            f"{steps:.3g} quantization steps (limit {rule['max_steps']:g}), "
            f"cosine {e['cosine']:.6f} (limit {rule['min_cosine']})"
        )
    else:
        limit = (
            f"max_rel_diff {e['max_rel_diff']:.3g} (limit {rule['max_rel_diff']}), "
            f"cosine {e['cosine']:.6f} (limit {rule['min_cosine']})"
        )
    lines = [
        f"check {'PASSED' if res['passed'] else 'FAILED'} against ONNX Runtime on the package "
        f"graph ({rule['kind']} rule): max_abs_diff {e['max_abs_diff']:.3g}, {limit}"
    ]
    lines += [f"  {f}" for f in res["failures"]]
    r = res.get("vs_reference")
    if r:
        where = "" if res.get("reference_source", "").startswith("these") else " (at compile)"
        lines.append(
            f"against the source model's float reference{where}: "
            f"max_abs_diff {r['max_abs_diff']:.3g}, cosine {r['cosine']:.6f}"
            + (f" (min {res['min_cosine']})" if res.get("min_cosine") is not None else "")
        )
        if not r["cosine"] >= warn_below:
            lines.append(
                f"warning: cosine below {warn_below} against the source model: lossy passes "
                "changed the outputs (gate with --min-cosine)"
            )
    return lines


@cli.command("bench", epilog=_examples("edgecc bench build/m --repeat 100 --threads 4"))
@_global_flags
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--repeat", type=int, default=50, show_default=True, help="Timed runs.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs first.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads for both [default: the target's cores; 1 for instruction counts].",
)
@click.option("--rpc-tracker", metavar="HOST:PORT", help="Time on a board of this RPC tracker.")
@click.option("--rpc-key", metavar="KEY", help="The boards' key at --rpc-tracker (e.g. rpi4).")
def bench_cmd(
    package: Path,
    repeat: int,
    warmup: int,
    threads: int | None,
    rpc_tracker: str | None,
    rpc_key: str | None,
) -> None:
    """Time a PACKAGE against ONNX Runtime on its own graph, in the same run (a ratio).

    Emulated (aarch64) packages: executed instructions per inference under qemu instead.
    The result is saved as PACKAGE/bench.json (for `edgecc report`).
    With --rpc-tracker/--rpc-key: timed on a board (no ratio), its outputs checked."""
    from edgecc.package import Package
    from edgecc.report.variants import save_bench

    if rpc_tracker or rpc_key:
        from edgecc.commands.rpc import bench_on_board

        bench_on_board(Package(package), rpc_tracker, rpc_key, repeat, warmup, threads)
        return
    pkg = Package(package)
    res = pkg.benchmark(repeat, warmup, threads)
    save_bench(pkg, res)
    if res.get("emulated"):  # instruction counts, not times (edgecc.runtime.instructions)
        from edgecc.runtime.instructions import summary_text

        _emit(res, summary_text(res["edgecc"]))
        return
    threads = res["threads"]
    e, o = res["edgecc"], res["onnxruntime"]
    text = (
        f"edgecc/TVM {e['median_ms']:.3f} ms (IQR {e['q1_ms']:.3f}-{e['q3_ms']:.3f}), "
        f"ONNX Runtime {o['median_ms']:.3f} ms (IQR {o['q1_ms']:.3f}-{o['q3_ms']:.3f}), "
        f"{threads} threads: "
        + (
            "no ratio: edgecc ran under qemu emulation, so its time says nothing about the "
            "board (run the package's run.py --repeat N on the board)"
            if res["ratio"] is None
            else f"edgecc/ORT = {res['ratio']:.2f}x"
        )
    )
    _emit(res, text)


@cli.command("inspect", epilog=_examples("edgecc inspect build/m", "edgecc --json inspect build/m"))
@_global_flags
@click.argument("package", type=click.Path(path_type=Path))
def inspect_cmd(package: Path) -> None:
    """Show a package's manifest and report."""
    from edgecc.package import Package
    from edgecc.passes.dump import format_table

    pkg = Package(package)
    m, r = pkg.manifest, pkg.report

    def io(items: list[dict[str, Any]]) -> str:
        return ", ".join(
            f"{i['name']}:{'x'.join(map(str, i['shape']))}:{i['dtype']}" for i in items
        )

    lib, t, src = m["library"], m["target"], m.get("source", {})
    text = "\n".join(
        [
            f"package   {pkg.path}",
            f"target    {t.get('name', '?')}: {t.get('description', '?')}",
            f"runs on   {t.get('runtime_needs', '?')}",
            f"inputs    {io(m['inputs'])}",
            f"outputs   {io(m['outputs'])}",
            f"source    {src.get('format', '?')} sha256 {src.get('sha256', '?')}",
            f"pipeline  {m.get('pipeline') or '(none)'}",
            f"library   {lib['file']} sha256 {lib['sha256']}"
            + (f", CUDA code: {lib['cuda_code']}" if lib.get("cuda_code") else ""),
            *(f"note      {n}" for n in lib.get("notes", [])),
            f"sizes     {_sizes(r)}",
            *(_int8_lines(m["int8_execution"]) if pkg.uses_int8() else []),
            *_int8_dynamic_lines(lib.get("int8_dynamic")),
            f"check     {_rule_text(m.get('check'))}",
            "versions  " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()),
            "",
            format_table(
                [{k: v for k, v in row.items() if k != "info"} for row in r.get("passes", [])]
            ),
        ]
    )
    _emit({"manifest": m, "report": r}, text)


def _int8_lines(execution: Any) -> list[str]:
    from edgecc.lower.int8.layers import compact_lines

    return [f"int8      {line}" for line in compact_lines(execution)]


def _int8_dynamic_lines(facts: dict[str, Any] | None) -> list[str]:
    """``inspect`` lines for MatMuls lowered as dynamic int8 (edgecc.lower.int8_dynamic)."""
    if not facts:
        return []
    lines = [
        f"int8 dyn  {facts['int8_matmuls']} MatMul/Gemm as u8 x s8 -> i32 kernels, activations "
        f"quantized {facts['activations']} at run time, {len(facts['declined'])} left float"
    ]
    lines += [
        f"          {r['node']}: {r['kernel']} ({r.get('rule', '?')})" for r in facts["layers"]
    ]
    lines += [f"          float: {d['node']}: {d['reason']}" for d in facts["declined"]]
    return lines


def _rule_text(rule: dict[str, Any] | None) -> str:
    if not rule:
        return "fp32 rule (recorded before rules were stored)"
    if rule.get("kind") == "quantized":
        return (
            f"quantized rule: <= {rule['max_steps']:g} quantization steps per output, "
            f"cosine >= {rule['min_cosine']}"
        )
    kind = rule.get("kind", "fp32")
    return f"{kind} rule: max_rel_diff <= {rule['max_rel_diff']}, cosine >= {rule['min_cosine']}"


@cli.command("targets", epilog=_examples("edgecc targets", "edgecc --json targets"))
@_global_flags
def targets_cmd() -> None:
    """List every target with its TVM configuration."""
    from edgecc.targets import all_targets

    targets = all_targets()
    blocks = []
    for t in targets:
        blocks.append(
            "\n".join(
                [
                    f"{t.name}" + (f" (aliases: {', '.join(t.aliases)})" if t.aliases else ""),
                    f"  {t.description}",
                    f"  tvm target:     {json.dumps(t.tvm_target)}",
                    *([f"  tvm host:       {json.dumps(t.tvm_host)}"] if t.tvm_host else []),
                    f"  compiler:       {t.cross_compiler or 'host gcc'}"
                    + (f" + nvcc ({t.cuda_arch})" if t.cuda_arch else ""),
                    f"  device needs:   {t.runtime_needs}",
                    f"  default passes: {t.default_passes}",
                ]
            )
        )
    _emit({"targets": [t.to_dict() for t in targets]}, "\n\n".join(blocks))


def _first_line(doc: str | None, name: str) -> str:
    """A docstring's first line without a leading ``name:`` label."""
    line = (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""
    return re.sub(rf"^`*{re.escape(name)}`*\s*:\s*", "", line)


@cli.command(
    "passes",
    epilog=_examples("edgecc passes", "edgecc compile m.onnx --passes 'fold-bn,prune(ratio=0.3)'"),
)
@_global_flags
def passes_cmd() -> None:
    """List the graph passes usable in --passes."""
    from edgecc.passes import registered_passes

    passes = registered_passes()
    summary = {
        n: _first_line(sys.modules[c.__module__].__doc__ or c.__doc__, n) for n, c in passes.items()
    }
    width = max(map(len, summary), default=0)
    _emit({"passes": summary}, "\n".join(f"{n.ljust(width)}  {d}" for n, d in summary.items()))


from edgecc.commands.eval import eval_cmd  # noqa: E402  (needs the helpers above)
from edgecc.commands.report import report_cmd  # noqa: E402
from edgecc.commands.rpc import rpc_group  # noqa: E402
from edgecc.commands.sensitivity import sensitivity_cmd  # noqa: E402

cli.add_command(eval_cmd)
cli.add_command(report_cmd)
cli.add_command(rpc_group)
cli.add_command(sensitivity_cmd)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI and maps errors to one line and an exit code.

    A SIGINT/SIGTERM before the package is written gives ``edgecc: interrupted`` and 130 whatever
    the exception it caused (TVM turns some into ``RuntimeError``) or if it was swallowed.
    """
    STATE.debug = STATE.json = STATE.quiet = STATE.verbose = False
    with interrupt.installed():
        code = _main(argv)
        if interrupt.received() is not None:
            if not interrupt.committed():
                click.echo("edgecc: interrupted", err=True)
                return EXIT_INTERRUPTED
            if code == 0:
                click.echo("edgecc: a signal arrived after the output was written", err=True)
        return code


def _error(prefix: str, message: str, hint: str = "") -> None:
    """One line on stderr; the whole message with --debug."""
    line, more = first_line(message)
    if STATE.debug and more:
        line = str(message).strip()
    elif more and not hint:
        hint = " (more with --debug)"
    click.echo(f"edgecc: {prefix}{line}{hint}", err=True)


def _main(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="edgecc", standalone_mode=False)
        return 0
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.ClickException as err:
        _error("error: ", err.format_message())
        return EXIT_USER
    except (click.exceptions.Abort, KeyboardInterrupt):
        return EXIT_INTERRUPTED  # main() prints the line
    except SystemExit as err:
        return int(err.code or 0) if not isinstance(err.code, str) else EXIT_INTERNAL
    except Exception as err:  # noqa: BLE001  (every error becomes one line and an exit code)
        if interrupt.received() is not None:
            return EXIT_INTERRUPTED
        if STATE.debug:
            traceback.print_exc()
        user = err if isinstance(err, EdgeccError) else as_user_error(err)
        if user is not None:
            _error("error: ", str(user))
            return user.exit_code
        # a bug: one line, and the traceback with --debug
        _error(
            "internal error: ",
            f"{type(err).__name__}: {err}",
            "" if STATE.debug else " (rerun with --debug for the traceback)",
        )
        return EXIT_INTERNAL


def run() -> None:
    """Console-script entry point."""
    try:
        code = main()
    except KeyboardInterrupt:  # before the handler was installed
        click.echo("edgecc: interrupted", err=True)
        code = EXIT_INTERRUPTED
    sys.exit(code)


from edgecc.commands.tune import tune_cmd  # noqa: E402  (needs the commands above)

cli.add_command(tune_cmd)

if __name__ == "__main__":
    run()
