"""Speed of edgecc's x86 libraries as ratios to ONNX Runtime and PyTorch, measured in one run.

For each model the script exports the torch module to ONNX once (edgecc's frontend), compiles that
ONNX file for ``x86`` with the target's default passes (and, for the CNNs, a ``qdq`` int8 variant
calibrated on 32 random samples), then times, in the same process run and on the same inputs:

``edgecc``  the package's library through :func:`edgecc.runtime.bench.benchmark_library` (the
            runner process times the VM's ``main`` only; TVM_NUM_THREADS = ``--threads``);
``ort``     ONNX Runtime, default graph optimisations, ``intra_op_num_threads = --threads``, on the
            same source ONNX (fp32 rows) or on the package's QDQ graph (int8 rows: ORT fuses it
            into integer kernels such as QLinearConv);
``torch``   the torch module in eager mode (``torch.set_num_threads(--threads)``, no_grad); fp32
            also on int8 rows (torch eager has no int8 path here);
``rules off`` with ``--before``: the package's graph lowered without edgecc's schedule rules
            (TVM 0.27's unscheduled default: the build before the rules), timed like ``edgecc``;
``dynamic`` (transformers, unless ``--no-dynamic``) default passes + ``dynamic-quant``: int8
            weights, activations quantized per row at run time, integer matmuls
            (:mod:`edgecc.lower.int8_dynamic`); the peer is ONNX Runtime on its own
            ``quantize_dynamic`` model of the source ONNX (per-channel int8 weights), and the row
            also gives ``edgecc dynamic / edgecc fp32`` (the fp32 library timed in the same rounds);
``tuned``   with ``--tune-trials N[,M...]``: the package's graph lowered by
            :func:`edgecc.lower.tune.lower_tuned` (MetaSchedule, N measured schedules per fused
            kernel), timed like ``edgecc`` (rows ``fp32 tuned xN``, ``int8 tuned xN``).

Engines are timed in ``--rounds`` interleaved rounds (edgecc, tuned, ort, torch, then again), so
load from other processes falls on all of them alike; the samples of all rounds are pooled. Each
engine gets up to ``--repeat`` samples, fewer when a call is slow (about ``--budget`` seconds per
engine and round, at least 3 samples per round). Only ratios are reported in the table (absolute
times drift between runs and machines): ``edgecc / ort`` and ``edgecc / torch`` of the medians,
with a range from the quartiles (q1/q3 .. q3/q1). Every output is checked against ONNX Runtime
(cosine) so the timed code is known to compute the model.

Usage::

    python scripts/benchmark.py [--models resnetish,mobilenetv2ish,tiny_transformer,resnet18,
        mobilenetv2,efficientnet_lite0,minilm]
        [--no-int8] [--no-dynamic] [--before] [--tune-trials N] [--repeat 30] [--warmup 3]
        [--rounds 3] [--threads 2]
        [--json [PATH]] [--markdown docs/benchmark.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/models.py holds the reference architectures

import edgecc  # noqa: E402
from edgecc.frontend import load_model  # noqa: E402
from edgecc.report.compare import compare_outputs, ort_session  # noqa: E402
from edgecc.runtime import run_library  # noqa: E402
from edgecc.runtime.bench import benchmark_library  # noqa: E402
from edgecc.targets import get_target  # noqa: E402
from tests.models import load_minilm, make_model  # noqa: E402

log = logging.getLogger("benchmark")

WORK_DIR = ROOT / "build" / "benchmark"
TARGET = "x86"
CALIB_SAMPLES = 32
MIN_SAMPLES_PER_ROUND = 3
ALL_MODELS = (
    "resnetish",
    "mobilenetv2ish",
    "tiny_transformer",
    "resnet18",
    "mobilenetv2",
    "efficientnet_lite0",
    "minilm",
)
EXTRA_MODELS = ("resnet34",)  # on request only: ResNet-18's kernels, for record reuse
INT8_MODELS = ("resnetish", "mobilenetv2ish", "resnet18", "mobilenetv2", "efficientnet_lite0")
DYNAMIC_MODELS = ("tiny_transformer", "minilm")
FP32_PEER = "fp32 edgecc"  # the fp32 library, timed beside the dynamic one
MINILM_SEQ = 128

Inputs = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]
Libraries = dict[str, tuple[Path, dict[str, Any]]]  # engine name -> (library, tuning facts)


def build_model(name: str) -> tuple[nn.Module, Inputs]:
    """The eval-mode torch module and its example inputs (positional tuple or keyword dict)."""
    if name == "minilm":
        return load_minilm(seq_len=MINILM_SEQ)
    model = make_model(name)
    return model, model.example_inputs()


@dataclass
class Engine:
    """One way of running a model: ``measure(n, warmup)`` returns ``n`` times in milliseconds."""

    name: str
    measure: Callable[[int, int], list[float]]
    estimate_ms: float


def timed_calls(call: Callable[[], Any], n: int, warmup: int) -> list[float]:
    """``n`` perf_counter timings (ms) of ``call`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def in_process_engine(name: str, call: Callable[[], Any]) -> Engine:
    """An engine timed here with perf_counter (ORT, torch); its estimate from two warm calls."""
    return Engine(
        name, lambda n, warmup: timed_calls(call, n, warmup), min(timed_calls(call, 2, 1))
    )


def library_engine(name: str, library: Path, feeds: dict[str, np.ndarray], threads: int) -> Engine:
    """An edgecc library timed in its runner process; its estimate from one probe run."""
    target = get_target(TARGET)

    def measure(n: int, warmup: int) -> list[float]:
        return benchmark_library(library, target, feeds, repeat=n, warmup=warmup, threads=threads)[
            "times_ms"
        ]

    return Engine(name, measure, measure(1, 1)[0])


def torch_call(model: nn.Module, inputs: Inputs) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return model(**inputs) if isinstance(inputs, dict) else model(*inputs)

    return call


def summary(times: list[float]) -> dict[str, Any]:
    q1, median, q3 = (float(v) for v in np.percentile(times, [25, 50, 75]))
    return {"n": len(times), "median_ms": median, "q1_ms": q1, "q3_ms": q3}


def ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Median ratio a/b with the range from the quartiles (q1a/q3b .. q3a/q1b)."""
    return {
        "ratio": a["median_ms"] / b["median_ms"],
        "low": a["q1_ms"] / b["q3_ms"],
        "high": a["q3_ms"] / b["q1_ms"],
    }


def measure(engines: list[Engine], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Interleaved rounds over ``engines``; pooled sample statistics per engine."""
    samples: dict[str, list[float]] = {e.name: [] for e in engines}
    for round_ in range(args.rounds):
        for engine in engines:
            per_round = max(1, args.repeat // args.rounds)
            budget = int(args.budget * 1e3 / max(engine.estimate_ms, 1e-3))
            n = max(MIN_SAMPLES_PER_ROUND, min(per_round, budget))
            log.info("  round %d: %s x%d", round_ + 1, engine.name, n)
            samples[engine.name] += engine.measure(n, args.warmup)
    return {name: summary(times) for name, times in samples.items()}


def compile_variants(
    name: str, source: Path, work: Path, int8: bool, qdq: str = ""
) -> dict[str, Any]:
    """The fp32 (default passes) and optional int8 (default + ``qdq(<qdq>)``) packages."""
    target = get_target(TARGET)
    packages = {"fp32": edgecc.compile(source, TARGET, out=work / "fp32")}
    if int8:
        packages["int8"] = edgecc.compile(
            source,
            TARGET,
            out=work / "int8",
            passes=f"{target.default_passes},qdq" + (f"({qdq})" if qdq else ""),
            calib="random",
            calib_samples=CALIB_SAMPLES,
        )
    for variant, pkg in packages.items():
        log.info("%s %s: compiled in %.1f s", name, variant, pkg.report["compile_seconds"])
    return packages


def tuned_library(
    pkg: Any, work: Path, trials: int, records: Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """The package's graph lowered with MetaSchedule tuning (:mod:`edgecc.lower.tune`) into
    ``records`` (shared by the models of the run), else into fresh records of its own."""
    from edgecc.lower.tune import lower_tuned

    model = onnx.load(str(pkg.path / "model.onnx"))
    shapes = {i["name"]: tuple(i["shape"]) for i in pkg.manifest["inputs"]}
    dtypes = {i["name"]: i["dtype"] for i in pkg.manifest["inputs"]}
    if records is None:
        records = work / "tuning"
        shutil.rmtree(records, ignore_errors=True)  # records of earlier runs would add trials
    lib = lower_tuned(
        model,
        get_target(TARGET),
        shapes,
        dtypes,
        work / "tuned.so",
        trials_per_task=trials,
        work_dir=records,
    )
    return lib.path, {**lib.details["tuning"], "compile_seconds": round(lib.compile_seconds, 1)}


def rules_off_library(pkg: Any, work: Path) -> tuple[Path, dict[str, Any]]:
    """The package's graph lowered without edgecc's schedule rules: TVM's default build, i.e.
    what ``edgecc compile`` produced before the rules (``lower(schedules=False)``)."""
    from edgecc.lower import lower

    model = onnx.load(str(pkg.path / "model.onnx"))
    shapes = {i["name"]: tuple(i["shape"]) for i in pkg.manifest["inputs"]}
    dtypes = {i["name"]: i["dtype"] for i in pkg.manifest["inputs"]}
    work.mkdir(parents=True, exist_ok=True)
    lib = lower(model, get_target(TARGET), shapes, dtypes, work / "rules-off.so", schedules=False)
    return lib.path, {"compile_seconds": round(lib.compile_seconds, 1)}


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows (fp32, int8, tuned) for one model."""
    work = WORK_DIR / name
    work.mkdir(parents=True, exist_ok=True)
    module, inputs = build_model(name)
    loaded = load_model(module, example_inputs=inputs)
    source = work / "source.onnx"
    onnx.save(loaded.model, str(source))
    values = inputs.values() if isinstance(inputs, dict) else inputs
    feeds = {spec.name: t.numpy() for spec, t in zip(loaded.inputs, values, strict=True)}
    packages = compile_variants(name, source, work, args.int8 and name in INT8_MODELS, args.qdq)
    torch.set_num_threads(args.threads)
    torch_engine = in_process_engine("torch", torch_call(module, inputs))
    rows = []
    for variant, pkg in packages.items():
        # fp32: ORT on the source ONNX; int8: on the package's QDQ graph (ORT's integer kernels).
        graph = loaded.model if variant == "fp32" else onnx.load(str(pkg.path / "model.onnx"))
        libraries: Libraries = {"edgecc": (pkg.library, {})}
        if args.before:
            libraries["rules off"] = rules_off_library(pkg, work / f"{variant}-rules-off")
        for trials in args.tune_trials:
            libraries[f"tuned x{trials}"] = tuned_library(
                pkg, work / f"{variant}-tuned{trials}", trials, args.tuning_records
            )
        rows += time_variant(name, variant, pkg, libraries, graph, torch_engine, feeds, args)
    if args.dynamic and name in DYNAMIC_MODELS:
        pkg = edgecc.compile(
            source,
            TARGET,
            out=work / "dynamic",
            passes=f"{get_target(TARGET).default_passes},dynamic-quant",
        )
        libraries = {"edgecc": (pkg.library, {}), FP32_PEER: (packages["fp32"].library, {})}
        rows += time_variant(
            name,
            "dynamic",
            pkg,
            libraries,
            ort_quantize_dynamic(source, work),
            torch_engine,
            feeds,
            args,
        )
    return rows


def ort_quantize_dynamic(source: Path, work: Path) -> onnx.ModelProto:
    """ONNX Runtime's ``quantize_dynamic`` model of ``source`` (per-channel int8 weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / "ort-dynamic.onnx"
    quantize_dynamic(str(source), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return onnx.load(str(out))


def time_variant(
    model: str,
    variant: str,
    pkg: Any,
    libraries: Libraries,
    graph: onnx.ModelProto,
    torch_engine: Engine,
    feeds: dict[str, np.ndarray],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Time ``libraries`` against ORT on ``graph`` and torch; one row per library."""
    session = ort_session(graph, args.threads, optimise=True)
    expected = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True)
    )
    engines = [
        library_engine(engine, path, feeds, args.threads) for engine, (path, _) in libraries.items()
    ]
    engines += [in_process_engine("ort", lambda: session.run(None, feeds)), torch_engine]
    log.info("%s %s: timing %s", model, variant, ", ".join(e.name for e in engines))
    stats = measure(engines, args)
    rows = []
    for engine, (path, tuning) in libraries.items():
        outputs = run_library(path, pkg.target(), feeds, pkg.output_names)
        rows.append(
            {
                "model": model,
                "variant": variant if engine == "edgecc" else f"{variant} {engine}",
                "inputs": {k: list(v.shape) for k, v in feeds.items()},
                "passes": pkg.manifest["pipeline"],
                "vs_ort": ratio(stats[engine], stats["ort"]),
                "vs_torch": ratio(stats[engine], stats["torch"]),
                "ort_vs_torch": ratio(stats["ort"], stats["torch"]),
                **(
                    {"vs_edgecc_fp32": ratio(stats[engine], stats[FP32_PEER])}
                    if FP32_PEER in stats and engine != FP32_PEER
                    else {}
                ),
                "check_vs_ort": compare_outputs(outputs, expected),
                "times": {"edgecc": stats[engine], "ort": stats["ort"], "torch": stats["torch"]},
                "build_seconds": tuning.get(
                    "compile_seconds", round(pkg.report["compile_seconds"], 1)
                ),
                "loadavg_1min": round(os.getloadavg()[0], 2),  # other processes on the machine
                **({"tuning": tuning} if "trials_per_kernel" in tuning else {}),
            }
        )
    return rows


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cpus_available": len(os.sched_getaffinity(0)),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    dists = ("edgecc", "apache-tvm", "onnxruntime", "torch", "onnx")
    return {"python": platform.python_version(), **{d: version(d) for d in dists}}


def fmt(r: dict[str, float]) -> str:
    digits = 2 if r["ratio"] < 10 else 1 if r["ratio"] < 100 else 0
    return f"{r['ratio']:.{digits}f} ({r['low']:.{digits}f}-{r['high']:.{digits}f})"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | input | variant | edgecc / ORT | edgecc / torch | ORT / torch "
        "| cosine vs ORT | build s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        shapes = ", ".join("x".join(map(str, s)) for s in row["inputs"].values())
        lines.append(
            f"| {row['model']} | {shapes} | {row['variant']} | {fmt(row['vs_ort'])} | "
            f"{fmt(row['vs_torch'])} | {fmt(row['ort_vs_torch'])} | "
            f"{row['check_vs_ort']['cosine']:.6f} | {row['build_seconds']:.0f} |"
        )
    lines += [
        f"\n{row['model']} dynamic: edgecc dynamic-quant / edgecc fp32 = "
        f"{fmt(row['vs_edgecc_fp32'])}"
        for row in rows
        if "vs_edgecc_fp32" in row
    ]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    m = result["machine"]
    return f"""# Speed: edgecc vs ONNX Runtime and PyTorch (x86, ratios)

Produced by `scripts/benchmark.py`; every figure comes from one run of:

```
{result["command"]}
```

Ratios of median latencies measured in the same run (lower is better for edgecc; 1.0 = as fast
as the peer). In brackets, the range from the quartiles (q1/q3 .. q3/q1) of the pooled samples.
Every engine used {s["threads"]} threads; {s["rounds"]} interleaved rounds; up to {s["repeat"]}
samples per engine. Machine: {m["cpu"]}, {m["cpus_available"]} CPUs, shared with other jobs
(1-minute load average {result["loadavg_before"]} before the run, {result["loadavg_after"]} after
it, per row in the JSON): ratios carry over, absolute times do not.

{table(result["rows"])}

* `fp32`: the target's default passes (`{result["rows"][0]["passes"] if result["rows"] else ""}`),
  ONNX Runtime on the same source ONNX. `int8`: default passes + `qdq` (calibrated on
  {CALIB_SAMPLES} random samples); ONNX Runtime runs the same QDQ graph (its integer kernels);
  torch stays fp32. `tuned xN`: the same graph lowered by `edgecc.lower.tune.lower_tuned`
  (MetaSchedule, N measured schedules per fused kernel; tuning seconds in the JSON), not
  edgecc's default build (see [tvm-cpu-speed.md](tvm-cpu-speed.md)). `dynamic`: default
  passes + `dynamic-quant` (integer matmuls, activations quantized per row at run time); ONNX
  Runtime runs its own `quantize_dynamic` model (per-channel int8 weights, per-tensor dynamic
  activations); `dynamic fp32 edgecc` is the fp32 library timed against that same peer.
* `cosine vs ORT`: edgecc's output against ONNX Runtime's on the timed inputs. `build s`: TVM
  lowering and build (and tuning, for the tuned rows) in seconds.
* Absolute medians and sample counts are in the JSON output (`--json`); they drift between runs.
""" + "".join(f"* **{name} failed**: {error}\n" for name, error in result["errors"].items())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        default=",".join(ALL_MODELS),
        help=f"comma-separated, from {', '.join(ALL_MODELS + EXTRA_MODELS)}",
    )
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 rows")
    p.add_argument(
        "--qdq",
        default="",
        metavar="OPTIONS",
        help="options of the int8 rows' qdq pass, e.g. 'reduce_range=true' (7-bit weights) or "
        "'activation=int8'",
    )
    p.add_argument(
        "--no-dynamic",
        dest="dynamic",
        action="store_false",
        help="skip the dynamic-quant rows (transformers)",
    )
    p.add_argument(
        "--before",
        action="store_true",
        help="also time the build without schedule rules (TVM's default, as before)",
    )
    p.add_argument(
        "--tune-trials",
        type=lambda text: [int(t) for t in text.split(",")],
        default=[],
        metavar="N[,M...]",
        help="also time MetaSchedule-tuned libraries (measured trials per kernel)",
    )
    p.add_argument(
        "--tuning-records",
        type=Path,
        default=None,
        help="one record folder for every tuned model of the run (later models reuse "
        "the kernels of earlier ones); default: fresh records per model",
    )
    p.add_argument("--repeat", type=int, default=30, help="max samples per engine (all rounds)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per engine and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all engines")
    p.add_argument(
        "--budget",
        type=float,
        default=3.0,
        help="seconds per engine and round that bound the sample count",
    )
    p.add_argument("--threads", type=int, default=2, help="threads for every engine")
    p.add_argument(
        "--int8-layers",
        default="",
        metavar="L1,L2",
        help="also time single int8 layers (int8 edgecc vs ORT QLinearConv vs fp32 edgecc; "
        "scripts/benchmark_int8_layers.py names them; 'all' for every one)",
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the JSON result to PATH (stdout without PATH) instead of the table",
    )
    p.add_argument("--markdown", type=Path, help="write the table and the command here")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(ALL_MODELS) - set(EXTRA_MODELS)
    if unknown:
        p.error(
            f"unknown models {sorted(unknown)}; choose from {', '.join(ALL_MODELS + EXTRA_MODELS)}"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("edgecc", "tvm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    command = "python scripts/benchmark.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    load_before = round(os.getloadavg()[0], 2)
    rows = []
    errors = {}
    for name in args.models.split(","):
        try:
            rows += bench_model(name, args)
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001 (load_minilm skips with pytest's exception)
            log.exception("%s failed", name)
            errors[name] = f"{type(err).__name__}: {err}"
    layer_rows = []
    if args.int8_layers:
        from scripts.benchmark_int8_layers import LAYERS, bench_layers

        names = list(LAYERS) if args.int8_layers == "all" else args.int8_layers.split(",")
        layer_rows = bench_layers(names, TARGET, args.threads, args.rounds)
    result = {
        "command": command.strip(),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": round(os.getloadavg()[0], 2),
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
        "rows": rows,
        "int8_layers": layer_rows,
        "errors": errors,
    }
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(result))
    if args.json == "-":
        print(json.dumps(result, indent=2, default=str))
    else:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"CPU: {result['machine']['cpu']}, {args.threads} threads per engine")
        print(table(rows))
        if layer_rows:
            from scripts.benchmark_int8_layers import table as layer_table

            print(layer_table(layer_rows))


if __name__ == "__main__":
    main()
