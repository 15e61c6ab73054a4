"""The ``edgecc`` command line: a thin layer over :mod:`edgecc.api`.

Errors a user can cause print one line (``edgecc: error: ...``) on stderr and exit with the code
of their class (see :mod:`edgecc.errors`); ``--debug`` adds the traceback. ``--json`` prints one
JSON document on stdout and nothing else there; progress goes to stderr.
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
import numpy as np

from edgecc.errors import (
    EXIT_CHECK_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USER,
    EdgeccError,
    UserInputError,
)


class _State:
    debug = False
    json = False
    quiet = False


STATE = _State()


def _progress(msg: str) -> None:
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
    """edgecc: compile PyTorch/ONNX models for edge devices through graph passes and TVM."""
    STATE.debug, STATE.json, STATE.quiet = debug, as_json, quiet
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="edgecc: %(name)s: %(message)s", stream=sys.stderr)


@cli.command("compile")
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "-t", "--target", default="x86", show_default=True, help="Target name (see `edgecc targets`)."
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    help="Package folder [default: build/<model>-<target>].",
)
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME:1x3x224x224[:DTYPE]",
    help="Input name, shape and dtype where the model does not record them (repeatable).",
)
@click.option(
    "--passes",
    default=None,
    help="Pipeline text, e.g. 'fold-bn,prune(ratio=0.3),qdq'; default: the target's.",
)
@click.option(
    "--disable-pass", "disabled", multiple=True, metavar="NAME", help="Skip a pass (repeatable)."
)
@click.option(
    "--dump-dir",
    type=click.Path(path_type=Path),
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
    "--probe",
    type=click.Path(path_type=Path),
    help="Input (.npy/.npz) the reference and per-pass comparisons use [default: seeded N(0,1)].",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow loading a pickled nn.Module (runs code from the file).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the probe input and random calibration.",
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
    probe: Path | None,
    trust_pickle: bool,
    seed: int,
) -> None:
    """Compile MODEL (.pt, .pt2, .onnx) into a package for a target."""
    from edgecc.api import compile as compile_model
    from edgecc.passes.dump import format_table

    out = out or Path("build") / f"{model.stem}-{target}"
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
        trust_pickle=trust_pickle,
        seed=seed,
        probe=probe,
        progress=_progress,
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
        f"graph vs source reference: max_abs_diff {g['max_abs_diff']:.3g}, "
        f"cosine {g['cosine']:.6f}\n"
        f"library {rep['sizes']['library_bytes']} bytes ({man['library']['sha256'][:12]}), "
        f"compiled in {rep['compile_seconds']:.1f}s, total {rep['total_seconds']:.1f}s"
        + (f"\ndumps in {dump_dir}" if dump_dir else "")
        + (
            f"\nCUDA device code: {man['library']['cuda_code']}"
            if man["library"].get("cuda_code")
            else ""
        )
    )
    _emit({"package": str(pkg.path), "manifest": man, "report": rep}, text)


@cli.command("run")
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
    "--threads", type=click.IntRange(min=1), default=None, help="TVM threads [default: cores]."
)
def run_cmd(
    package: Path,
    input_path: Path | None,
    output_path: Path | None,
    check: bool,
    threads: int | None,
) -> None:
    """Run a compiled PACKAGE (x86 natively, aarch64 under qemu-user emulation)."""
    from edgecc.package import Package, read_arrays

    pkg = Package(package)
    inputs = read_arrays(input_path) if input_path else None
    feeds = pkg.prepare_inputs(inputs) if inputs is not None else pkg.probe_inputs()
    facts: dict[str, Any] = {}
    outputs = pkg.run(feeds, progress=_progress, threads=threads, facts=facts)
    if output_path:
        tmp = output_path.with_name(output_path.name + ".tmp.npz")
        try:
            np.savez(tmp, **outputs)
            tmp.replace(output_path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
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
    if check:
        res = pkg.check(outputs, feeds)
        data["check"] = res
        e = res["vs_expected"]
        lines.append(
            f"check {'PASSED' if res['passed'] else 'FAILED'} "
            "against ONNX Runtime on the package graph: "
            f"max_abs_diff {e['max_abs_diff']:.3g}, max_rel_diff {e['max_rel_diff']:.3g} "
            f"(limit {res['tolerance']['max_rel_diff']}), cosine {e['cosine']:.6f} "
            f"(limit {res['tolerance']['cosine']})"
        )
        if "vs_reference" in res:
            r = res["vs_reference"]
            lines.append(
                "against the source model's float reference: "
                f"max_abs_diff {r['max_abs_diff']:.3g}, "
                f"cosine {r['cosine']:.6f}"
            )
    _emit(data, "\n".join(lines))
    if check and not data["check"]["passed"]:
        sys.exit(EXIT_CHECK_FAILED)


@cli.command("bench")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--repeat", type=int, default=50, show_default=True, help="Timed runs.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed runs first.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads for both [default: the target's cores; 1 for instruction counts].",
)
def bench_cmd(package: Path, repeat: int, warmup: int, threads: int | None) -> None:
    """Time a PACKAGE against ONNX Runtime on its own graph, in the same run (a ratio).

    Emulated (aarch64) packages: executed instructions per inference under qemu instead."""
    from edgecc.package import Package

    res = Package(package).benchmark(repeat, warmup, threads)
    if res.get("emulated"):  # instruction counts, not times (edgecc.runtime.instructions)
        from edgecc.runtime.instructions import summary_text

        _emit(res, summary_text(res["edgecc"]))
        return
    threads = res["threads"]
    e, o = res["edgecc"], res["onnxruntime"]
    text = (
        f"edgecc/TVM {e['median_ms']:.3f} ms (IQR {e['q1_ms']:.3f}-{e['q3_ms']:.3f}), "
        f"ONNX Runtime {o['median_ms']:.3f} ms (IQR {o['q1_ms']:.3f}-{o['q3_ms']:.3f}), "
        f"{threads} threads: edgecc/ORT = {res['ratio']:.2f}x"
    )
    if e.get("emulated"):
        text += "\n(edgecc ran under qemu emulation: its time says nothing about the board)"
    _emit(res, text)


@cli.command("inspect")
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

    lib = m["library"]
    text = "\n".join(
        [
            f"package   {pkg.path}",
            f"target    {m['target']['name']}: {m['target']['description']}",
            f"runs on   {m['target']['runtime_needs']}",
            f"inputs    {io(m['inputs'])}",
            f"outputs   {io(m['outputs'])}",
            f"source    {m['source']['format']} sha256 {m['source']['sha256']}",
            f"pipeline  {m['pipeline'] or '(none)'}",
            f"library   {lib['file']} sha256 {lib['sha256']}"
            + (f", CUDA code: {lib['cuda_code']}" if lib.get("cuda_code") else ""),
            f"int8      {m['int8_execution']}",
            "versions  " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
            "",
            format_table(
                [{k: v for k, v in row.items() if k != "info"} for row in r.get("passes", [])]
            ),
        ]
    )
    _emit({"manifest": m, "report": r}, text)


@cli.command("targets")
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


@cli.command("passes")
def passes_cmd() -> None:
    """List the graph passes usable in --passes."""
    from edgecc.passes import registered_passes

    passes = registered_passes()
    summary = {
        n: _first_line(sys.modules[c.__module__].__doc__ or c.__doc__, n) for n, c in passes.items()
    }
    width = max(map(len, summary), default=0)
    _emit({"passes": summary}, "\n".join(f"{n.ljust(width)}  {d}" for n, d in summary.items()))


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI and maps errors to one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="edgecc", standalone_mode=False)
        return 0
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.ClickException as err:
        click.echo(f"edgecc: error: {err.format_message()}", err=True)
        return EXIT_USER
    except click.exceptions.Abort:
        click.echo("edgecc: interrupted", err=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        click.echo("edgecc: interrupted", err=True)
        return EXIT_INTERRUPTED
    except EdgeccError as err:
        if STATE.debug:
            traceback.print_exc()
        click.echo(f"edgecc: error: {err}", err=True)
        return err.exit_code
    except SystemExit as err:
        return int(err.code or 0)
    except Exception as err:  # a bug: one line, and the traceback with --debug
        if STATE.debug:
            traceback.print_exc()
        click.echo(
            f"edgecc: internal error: {type(err).__name__}: {err} (rerun with --debug for the "
            "traceback)",
            err=True,
        )
        return EXIT_INTERNAL


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
