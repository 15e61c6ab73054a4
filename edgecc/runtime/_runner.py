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
"""

import sys

USAGE = (
    "usage: _runner.py library.so inputs.npz outputs.npz [cpu|cuda] "
    "[--repeat N --warmup W --timings timings.json]"
)
OPTIONS = {"--repeat": int, "--warmup": int, "--timings": str}


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
                options[arg[2:]] = OPTIONS[arg](value)
            except (TypeError, ValueError):
                sys.exit(f"{arg} needs a value; {USAGE}")
        else:
            positional.append(arg)
    if len(positional) not in (3, 4):
        sys.exit(USAGE)
    if options and ("repeat" not in options or "timings" not in options):
        sys.exit(f"timing needs both --repeat and --timings; {USAGE}")
    if options.get("repeat", 1) < 1 or options.get("warmup", 0) < 0:
        sys.exit("--repeat must be >= 1 and --warmup >= 0")
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
    if options:
        timings = _time(vm, device, device_kind, args, options["repeat"], options.get("warmup", 0))
        with open(options["timings"], "w") as f:
            f.write(_to_json(timings) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
