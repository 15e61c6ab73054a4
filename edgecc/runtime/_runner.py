"""Run an edgecc library: ``python _runner.py library.so inputs.npz outputs.npz [device]``.

Standalone: imports only TVM and numpy, because it runs wherever the library runs (the host, an
emulated aarch64 Python, a board). Inputs are passed to the VM's ``main`` in the order they are
stored in ``inputs.npz`` (the model's input order); outputs are written as ``out0``, ``out1``...
with tuple outputs flattened depth-first in order. ``device`` is ``cpu`` (default) or ``cuda``.
Exit status 0 on success; on failure the last stderr line says why.

Timing (optional): ``--repeat N [--warmup W] --timings timings.json`` after the positional
arguments. After the run that writes the outputs, ``main`` runs ``W`` more times untimed, then
``N`` timed runs through the VM's ``time_evaluator`` (one call per sample, device synchronised;
it adds one discarded call of its own). ``timings.json`` holds every sample and their median,
quartiles and IQR in milliseconds, and the TVM runtime's thread count (TVM reads
``TVM_NUM_THREADS``, else ``OMP_NUM_THREADS``, else uses the physical cores).

Counting (optional): ``--count-runs N [--count-windows K]`` runs ``main`` N more times after the
output run, K times over (default 1), with a marker call ``lseek(-1, MARK_OFFSET, 0)`` before the
first window and after each (they fail with EBADF and do nothing). Under qemu with edgecc's
instruction-counting plugin (:mod:`edgecc.runtime.instructions`) each marker records the guest
instructions executed so far, so consecutive markers differ by N inferences' worth; without the
plugin the markers are harmless.

Facts (optional): ``--info info.json`` writes what the run used: ``threads`` (the TVM runtime's
thread count), ``device`` and ``count_runs``.
"""

import os
import sys

USAGE = (
    "usage: _runner.py library.so inputs.npz outputs.npz [cpu|cuda] "
    "[--repeat N --warmup W --timings timings.json] [--count-runs N [--count-windows K]] "
    "[--info info.json]"
)
OPTIONS = {
    "--repeat": int,
    "--warmup": int,
    "--timings": str,
    "--count-runs": int,
    "--count-windows": int,
    "--info": str,
}
TIMING = ("repeat", "warmup", "timings")
MARK_OFFSET = 0x656467656363  # "edgecc"; the plugin's MARK_OFFSET


def _flatten(value, out):
    """Append the tensors of a (possibly nested) VM result to ``out`` in order."""
    if hasattr(value, "numpy"):
        out.append(value.numpy())
    else:  # a tuple of results (tvm_ffi Array)
        for item in value:
            _flatten(item, out)
    return out


def _parse(argv):
    """Split ``argv`` into positional arguments and the timing options (a dict)."""
    positional, options = [], {}
    args = iter(argv)
    for arg in args:
        if arg in OPTIONS:
            value = next(args, None)
            try:
                options[arg[2:].replace("-", "_")] = OPTIONS[arg](value)
            except (TypeError, ValueError):
                sys.exit(f"{arg} needs a value; {USAGE}")
        else:
            positional.append(arg)
    if len(positional) not in (3, 4):
        sys.exit(USAGE)
    timing = any(k in options for k in TIMING)
    if timing and ("repeat" not in options or "timings" not in options):
        sys.exit(f"timing needs both --repeat and --timings; {USAGE}")
    if options.get("repeat", 1) < 1 or options.get("warmup", 0) < 0:
        sys.exit("--repeat must be >= 1 and --warmup >= 0")
    if options.get("count_runs", 1) < 1 or options.get("count_windows", 1) < 1:
        sys.exit("--count-runs and --count-windows must be >= 1")
    return positional, options


def _to_json(value):
    """JSON text of numbers, short ASCII strings and lists of them (no ``json`` import: the
    runner keeps to sys, numpy and TVM)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}": {_to_json(v)}' for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_to_json(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _time(vm, device, device_kind, args, repeat, warmup):
    """Timing statistics (milliseconds) of ``repeat`` calls of ``main`` after ``warmup`` calls."""
    import numpy as np
    import tvm

    for _ in range(warmup):
        vm["main"](*args)
    result = vm.time_evaluator("main", device, number=1, repeat=repeat)(*args)
    times = [float(t) * 1e3 for t in result.results]
    q1, median, q3 = (float(q) for q in np.percentile(times, [25, 50, 75]))
    return {
        "repeat": repeat,
        "warmup": warmup,
        "threads": int(tvm.runtime.num_threads()),
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
    try:  # noqa: SIM105  (no contextlib: the runner imports only sys, os, numpy and tvm)
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


def main(argv):
    (library, inputs_path, outputs_path, *rest), options = _parse(argv)
    device_kind = rest[0] if rest else "cpu"

    import numpy as np
    import tvm
    from tvm import relax

    device = tvm.device(device_kind, 0)
    if not device.exist:
        sys.exit(f"no {device_kind} device available to run {library}")
    vm = relax.VirtualMachine(tvm.runtime.load_module(library), device)
    with np.load(inputs_path, allow_pickle=False) as data:
        args = [tvm.runtime.tensor(data[name], device) for name in data.files]
    result = vm["main"](*args)
    outputs = _flatten(result, [])
    np.savez(outputs_path, **{f"out{i}": array for i, array in enumerate(outputs)})
    if "repeat" in options:
        timings = _time(vm, device, device_kind, args, options["repeat"], options.get("warmup", 0))
        with open(options["timings"], "w") as f:
            f.write(_to_json(timings) + "\n")
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
            f.write(_to_json(info) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
