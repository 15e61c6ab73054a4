"""Run an edgecc package's library: the standalone runner, shipped in every package as ``run.py``.

Needs only Python 3, numpy and the TVM runtime (no edgecc, no ONNX), because it runs wherever
the library runs: the host, an emulated aarch64 Python, a Raspberry Pi or a Jetson. In a
package folder::

    python3 run.py                              # the probe input recorded in reference.npz
    python3 run.py --input x.npz --output y.npz # your input (.npz by input name, or one .npy)
    python3 run.py --check                      # compare with reference.npz; exit 4 if off
    python3 run.py --check --min-cosine 0.99    # also fail below this agreement with the source
    python3 run.py --repeat 50 --warmup 5       # time it

It prints one JSON document on stdout: the outputs' shapes and dtypes, the timing and the
check. Before loading the library it verifies its sha256 against ``manifest.json``.

Options: ``--library`` (default: the manifest's library beside this script), ``--input``,
``--output``, ``--device cpu|cuda`` (default: the manifest's target device), ``--check``,
``--min-cosine X``, ``--repeat N``, ``--warmup W``, ``--timings t.json`` (also write the
timing there). Outputs are written by the manifest's output names (``out0``, ``out1``... for a
library without a manifest beside it), tuple outputs flattened depth-first. Inputs are fed in
the manifest's input order (file order without a manifest).

Timing: after the run that gives the outputs, ``main`` runs ``W`` times untimed, then ``N``
timed runs through the VM's ``time_evaluator`` (one call per sample, device synchronised). TVM
reads its thread count from ``TVM_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the cores.

The check (:func:`check`) compares the outputs with ``expected:*`` in reference.npz (ONNX
Runtime's outputs of model.onnx on the probe input) under the manifest's rule (``check``):

* ``fp32``: every output within ``max_rel_diff`` (max abs diff / max abs expected) and
  ``min_cosine``;
* ``quantized`` (the graph quantizes activations): every output within ``max_steps``
  quantization steps (``steps[name]``: the scale of the DequantizeLinear producing the output,
  else one int8 step of the output's range on the probe) and ``min_cosine``: a rounding tie
  that flips one quantized value by one step, amplified by the layers after it, is not a bug;
* always: a NaN or Inf where the expected output has none (or the other way) fails.

It also reports the agreement with ``reference:*`` (the source model's float outputs), which
lossy passes change by design; ``--min-cosine`` makes it a failure too.

Counting (for edgecc's instruction counts under qemu): ``--count-runs N [--count-windows K]``
runs ``main`` N more times after the output run, K times over, with a marker call
``lseek(-1, MARK_OFFSET, 0)`` before the first window and after each (it fails with EBADF and
does nothing); edgecc's qemu plugin records the instruction count at each marker. ``--info
info.json`` writes what the run used: ``threads`` (the TVM runtime's thread count), ``device``.

Stacked runs (``edgecc eval`` feeds many batches to one process): ``--stacked`` reads inputs with
one extra leading axis of ``K`` input sets, shape ``(K, *input shape)``, calls ``main`` once per
set and writes every output stacked the same way, ``(K, *output shape)``. It cannot be combined
with ``--check``, ``--repeat`` or ``--count-runs``.

Exit status: 0 success, 2 bad arguments or a missing, corrupt or modified file, 4 check failed,
1 any other failure; errors print one line on stderr.
"""

import hashlib
import json
import math
import os
import sys

EXIT_USER, EXIT_CHECK_FAILED = 2, 4
USAGE = (
    "usage: run.py [--library model.so] [--input x.npz|x.npy] [--output y.npz] "
    "[--device cpu|cuda] [--check] [--min-cosine X] [--repeat N] [--warmup W] "
    "[--timings t.json] [--count-runs N [--count-windows K]] [--info info.json] [--stacked]"
)
OPTIONS = {
    "--library": str,
    "--input": str,
    "--output": str,
    "--device": str,
    "--min-cosine": float,
    "--repeat": int,
    "--warmup": int,
    "--timings": str,
    "--count-runs": int,
    "--count-windows": int,
    "--info": str,
}
FLAGS = ("--check", "--stacked")
MARK_OFFSET = 0x656467656363  # "edgecc"; the instruction-counting plugin's MARK_OFFSET
# The rule of packages whose manifest has none (built before the rule was recorded).
FP32_RULE = {"kind": "fp32", "max_rel_diff": 1e-3, "min_cosine": 0.9999}


class UsageError(Exception):
    """Bad arguments or a missing, corrupt or modified file (exit 2)."""


# --------------------------------------------------------------------------------------------
# Comparison (numpy only; edgecc.report.compare uses the same functions)


def compare_arrays(out, ref):
    """Agreement of one output with its reference.

    Returns ``max_abs_diff``, ``max_rel_diff`` (divided by the reference's max magnitude),
    ``cosine`` and ``nonfinite``: the number of elements where exactly one side is NaN/Inf, or
    both are but differ (NaN vs Inf, +Inf vs -Inf). With any such element, the diffs are
    ``inf`` and the cosine ``nan``: NaN must never read as a perfect match.
    """
    import numpy as np

    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape {list(out.shape)} != reference {list(ref.shape)}")
    fin_o, fin_r = np.isfinite(out), np.isfinite(ref)
    same_special = ~fin_o & ~fin_r & ((np.isnan(out) & np.isnan(ref)) | (out == ref))
    nonfinite = int(np.count_nonzero(~(fin_o & fin_r) & ~same_special))
    if nonfinite:
        return {
            "max_abs_diff": math.inf,
            "max_rel_diff": math.inf,
            "cosine": math.nan,
            "nonfinite": nonfinite,
        }
    both = fin_o & fin_r
    o, r = out[both], ref[both]
    diff = float(np.max(np.abs(o - r))) if o.size else 0.0
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    return {
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale if scale else diff,
        "cosine": cosine(o, r),
        "nonfinite": 0,
    }


def cosine(a, b):
    """Cosine similarity of two tensors, flattened (1.0 for two zero tensors; NaN with NaNs)."""
    import numpy as np

    a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    if math.isnan(na) or math.isnan(nb) or math.isinf(na) or math.isinf(nb):
        return math.nan
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a64 @ b64 / (na * nb))


def worst(per_output):
    """The worst figures over outputs (max diffs, min cosine, summed non-finite), NaN-aware:
    Python's ``min``/``max`` would drop a NaN cosine."""
    total = {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "cosine": 1.0, "nonfinite": 0}
    for m in per_output.values():
        for key in ("max_abs_diff", "max_rel_diff"):
            total[key] = m[key] if m[key] > total[key] or math.isnan(m[key]) else total[key]
        c = m["cosine"]
        total["cosine"] = c if math.isnan(c) or c < total["cosine"] else total["cosine"]
        total["nonfinite"] += m["nonfinite"]
    return total


def compare_named(outputs, reference):
    """Per-output and worst-case agreement of ``outputs`` with ``reference`` (dicts by name;
    matched by name, else by order)."""
    ref_items, out_items = list(reference.items()), list(outputs.items())
    if len(ref_items) != len(out_items):
        raise ValueError(f"{len(out_items)} outputs but {len(ref_items)} reference outputs")
    by_name = all(name in outputs for name, _ in ref_items)
    per_output = {}
    for i, (name, ref) in enumerate(ref_items):
        out = outputs[name] if by_name else out_items[i][1]
        try:
            per_output[name] = compare_arrays(out, ref)
        except ValueError as err:
            raise ValueError(f"output {name!r}: {err}") from err
    return {**worst(per_output), "per_output": per_output}


def check(outputs, expected, rule=None, reference=None, min_cosine=None):
    """Apply the check ``rule`` (see the module docstring) to ``outputs`` against ``expected``.

    Args:
        outputs: the library's outputs by name.
        expected: ONNX Runtime's outputs of the package graph on the same inputs, by name.
        rule: the manifest's ``check`` entry (default: the fp32 rule).
        reference: the source model's float outputs on the same inputs, or None.
        min_cosine: fail when the cosine against ``reference`` is below it (needs reference).

    Returns:
        ``passed``, ``rule``, ``vs_expected`` (with ``per_output``), ``failures`` (one line
        each), and with ``reference``: ``vs_reference``.
    """
    rule = rule or FP32_RULE
    vs = compare_named(outputs, expected)
    failures = []
    for name, m in vs["per_output"].items():
        if m["nonfinite"]:
            failures.append(f"{name}: {m['nonfinite']} NaN/Inf values where expected has none")
            continue
        if not m["cosine"] >= rule["min_cosine"]:
            failures.append(f"{name}: cosine {m['cosine']:.6f} < {rule['min_cosine']}")
        if rule["kind"] == "quantized":
            step = float(rule["steps"].get(name, 0.0))
            limit = rule["max_steps"] * step
            diff = m["max_abs_diff"]
            m["steps"] = diff / step if step else (math.inf if diff else 0.0)
            if m["max_abs_diff"] > limit:
                failures.append(
                    f"{name}: max abs diff {m['max_abs_diff']:.3g} = {m['steps']:.3g} "
                    f"quantization steps of {step:.3g} > {rule['max_steps']}"
                )
        elif m["max_rel_diff"] > rule["max_rel_diff"]:
            failures.append(
                f"{name}: max rel diff {m['max_rel_diff']:.3g} > {rule['max_rel_diff']}"
            )
    result = {"rule": rule, "vs_expected": vs}
    if reference is not None:
        result["vs_reference"] = compare_named(outputs, reference)
        cos = result["vs_reference"]["cosine"]
        if min_cosine is not None and not cos >= min_cosine:
            failures.append(
                f"cosine {cos:.6f} against the source model's float reference < {min_cosine}"
            )
    result["min_cosine"] = min_cosine
    result["failures"] = failures
    result["passed"] = not failures
    return result


# --------------------------------------------------------------------------------------------
# Running


def _flatten(value, out):
    """Append the tensors of a (possibly nested) VM result to ``out`` in order."""
    if hasattr(value, "numpy"):
        out.append(value.numpy())
    else:  # a tuple of results (tvm_ffi Array)
        for item in value:
            _flatten(item, out)
    return out


def parse(argv):
    """The options as a dict (``--min-cosine`` -> ``min_cosine``); UsageError when bad."""
    options = {}
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        if arg in FLAGS:
            options[arg[2:].replace("-", "_")] = True
        elif arg in OPTIONS:
            value = next(args, None)
            try:
                options[arg[2:].replace("-", "_")] = OPTIONS[arg](value)
            except (TypeError, ValueError):
                raise UsageError(f"{arg} needs a value; {USAGE}") from None
        else:
            raise UsageError(f"unknown argument {arg!r}; {USAGE}")
    if options.get("repeat", 1) < 1 or options.get("warmup", 0) < 0:
        raise UsageError("--repeat must be >= 1 and --warmup >= 0")
    if ("warmup" in options or "timings" in options) and "repeat" not in options:
        raise UsageError(f"--warmup and --timings need --repeat; {USAGE}")
    if options.get("device", "cpu") not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda; {USAGE}")
    if "min_cosine" in options and not options.get("check"):
        raise UsageError("--min-cosine needs --check")
    if options.get("count_runs", 1) < 1 or options.get("count_windows", 1) < 1:
        raise UsageError("--count-runs and --count-windows must be >= 1")
    if options.get("stacked") and {"check", "repeat", "count_runs"} & set(options):
        raise UsageError("--stacked cannot be combined with --check, --repeat or --count-runs")
    return options


def sha256(path):
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder):
    """The package manifest in ``folder``, or None when there is none."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: corrupt manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("library"), dict):
        raise UsageError(f"{path}: not an edgecc manifest (no library entry)")
    return manifest


def verify_library(library, manifest):
    """UsageError unless ``library``'s sha256 is the manifest's."""
    want = manifest["library"].get("sha256")
    got = sha256(library)
    if want != got:
        raise UsageError(
            f"{library}: sha256 {got[:12]}... does not match the manifest's {str(want)[:12]}...: "
            "the library was modified or replaced; rebuild or recopy the package"
        )


def load_arrays(path, allow_pickle=False):
    """``{name: array}`` from a .npz, or ``{"": array}`` from a .npy."""
    import numpy as np

    if not os.path.isfile(path):
        raise UsageError(f"{path} does not exist")
    try:
        if path.endswith(".npy"):
            return {"": np.load(path, allow_pickle=allow_pickle)}
        with np.load(path, allow_pickle=allow_pickle) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:  # numpy raises several kinds for a damaged file
        raise UsageError(f"cannot read {path}: {err}") from None


def _section(arrays, prefix):
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def _same(a, b):
    import numpy as np

    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def ordered_inputs(arrays, manifest):
    """The input arrays in the model's order, checked against the manifest when there is one."""
    import numpy as np

    if manifest is None:
        return list(arrays.values())
    specs = manifest.get("inputs", [])
    names = [s["name"] for s in specs]
    if "" in arrays:
        if len(names) != 1 or len(arrays) != 1:
            raise UsageError(f"the model takes inputs {names}: pass a .npz with those names")
        arrays = {names[0]: arrays[""]}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UsageError(f"missing inputs {missing}; the package takes {names}")
    out = []
    for spec in specs:
        a = np.asarray(arrays[spec["name"]])
        if list(a.shape) != list(spec["shape"]):
            raise UsageError(
                f"input {spec['name']!r} has shape {list(a.shape)}, the package takes "
                f"{spec['shape']}"
            )
        out.append(a.astype(spec["dtype"], copy=False))
    return out


def _time(vm, device, device_kind, args, repeat, warmup):
    """Timing statistics (milliseconds) of ``repeat`` calls of ``main`` after ``warmup`` calls."""
    import tvm

    for _ in range(warmup):
        vm["main"](*args)
    result = vm.time_evaluator("main", device, number=1, repeat=repeat)(*args)
    times = [float(t) * 1e3 for t in result.results]
    return timing_stats(times, warmup, int(tvm.runtime.num_threads()), device_kind)


def timing_stats(times, warmup, threads, device_kind):
    """The timing report of samples ``times`` (milliseconds, in order); edgecc's RPC bench
    reports board timings with the same fields."""
    import numpy as np

    q1, median, q3 = (float(q) for q in np.percentile(times, [25, 50, 75]))
    return {
        "repeat": len(times),
        "warmup": warmup,
        "threads": threads,
        "device": device_kind,
        "median_ms": median,
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "min_ms": min(times),
        "max_ms": max(times),
        "mean_ms": float(np.mean(times)),
        "times_ms": times,
    }


def _mark():
    """The marker call the counting plugin records (a failing lseek: no effect otherwise)."""
    try:  # noqa: SIM105  (no contextlib: the runner keeps to few imports)
        os.lseek(-1, MARK_OFFSET, 0)
    except OSError:
        pass


def _count(vm, args, runs, windows):
    """``windows`` windows of ``runs`` calls of ``main``, a marker before and after each."""
    _mark()
    for _ in range(windows):
        for _ in range(runs):
            vm["main"](*args)
        _mark()


def run(options):
    """Run the library as ``options`` say; return ``(report dict, exit status)``."""
    import numpy as np

    here = os.path.dirname(os.path.abspath(__file__))
    library = options.get("library")
    folder = os.path.dirname(os.path.abspath(library)) if library else here
    manifest = read_manifest(folder)
    if library is None:
        if manifest is None:
            raise UsageError(f"no manifest.json beside {__file__}: pass --library model.so")
        library = os.path.join(folder, manifest["library"].get("file", "model.so"))
    if not os.path.isfile(library):
        raise UsageError(f"library {library} does not exist")
    if manifest is not None:
        verify_library(library, manifest)
    ref_path = os.path.join(folder, "reference.npz")
    recorded = load_arrays(ref_path) if manifest is not None and os.path.isfile(ref_path) else {}
    probe = _section(recorded, "input:")
    if "input" in options:
        given = load_arrays(options["input"])
    elif probe:
        given = probe
    else:
        raise UsageError(f"no --input and no probe input in {ref_path}")
    if options.get("stacked"):
        sets = {len(a) for a in given.values()}
        if len(sets) != 1:
            raise UsageError(f"--stacked inputs disagree on the number of sets: {sorted(sets)}")
        count = sets.pop()
        stacked = [
            ordered_inputs({k: a[i] for k, a in given.items()}, manifest) for i in range(count)
        ]
        args_np = stacked[0] if stacked else []
    else:
        stacked = None
        args_np = ordered_inputs(given, manifest)
    device_kind = options.get("device") or (
        "cuda" if manifest and manifest.get("target", {}).get("device") == "cuda" else "cpu"
    )

    import tvm
    from tvm import relax

    device = tvm.device(device_kind, 0)
    if not device.exist:
        raise RuntimeError(f"no {device_kind} device available to run {library}")
    vm = relax.VirtualMachine(tvm.runtime.load_module(library), device)

    def call(arrays):
        tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays]
        return tensors, _flatten(vm["main"](*tensors), [])

    if stacked is not None:  # one call per input set; outputs stacked along a new axis 0
        results = [call(arrays)[1] for arrays in stacked]
        values = [np.stack(column) for column in zip(*results, strict=True)] if results else []
        args = []
    else:
        args, values = call(args_np)
    names = [o["name"] for o in (manifest or {}).get("outputs", [])]
    if len(names) != len(values):
        names = [f"out{i}" for i in range(len(values))]
    outputs = dict(zip(names, values, strict=True))
    report = {
        "library": library,
        "device": device_kind,
        "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outputs.items()},
    }
    if "output" in options:
        np.savez(options["output"], **outputs)
        report["written"] = options["output"]
    if "repeat" in options:
        report["timing"] = _time(
            vm, device, device_kind, args, options["repeat"], options.get("warmup", 0)
        )
        if "timings" in options:
            with open(options["timings"], "w") as f:
                json.dump(report["timing"], f)
    if "count_runs" in options:
        _count(vm, args, options["count_runs"], options.get("count_windows", 1))
    if "info" in options:
        info = {
            "threads": int(tvm.runtime.num_threads()),
            "device": device_kind,
            "count_runs": options.get("count_runs", 0),
            "count_windows": options.get("count_windows", 0) if "count_runs" in options else 0,
        }
        with open(options["info"], "w") as f:
            json.dump(info, f)
    status = 0
    if options.get("check"):
        expected = _section(recorded, "expected:")
        if not expected:
            raise UsageError(f"--check needs {ref_path} with the expected outputs")
        named = {k: v for k, v in given.items()}
        if "" in named and len(probe) == 1:
            named = {next(iter(probe)): named[""]}
        if not _same(named, probe):
            raise UsageError(
                "--check compares with the outputs recorded for the probe input in "
                "reference.npz: run it without --input (or with that input)"
            )
        result = check(
            outputs,
            expected,
            (manifest or {}).get("check"),
            _section(recorded, "reference:") or None,
            options.get("min_cosine"),
        )
        report["check"] = result
        status = 0 if result["passed"] else EXIT_CHECK_FAILED
    return report, status


def main(argv):
    try:
        report, status = run(parse(argv))
    except UsageError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return EXIT_USER
    except Exception as err:  # the TVM runtime's errors are long: keep the last line
        lines = str(err).strip().splitlines() or [type(err).__name__]
        print(f"run.py: error: {type(err).__name__}: {lines[-1]}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, default=str))
    if status:
        print("run.py: check FAILED: " + "; ".join(report["check"]["failures"]), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
