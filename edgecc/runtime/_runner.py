"""Run an edgecc library once: ``python _runner.py library.so inputs.npz outputs.npz [device]``.

Standalone: imports only TVM and numpy, because it runs wherever the library runs (the host, an
emulated aarch64 Python, a board). Inputs are passed to the VM's ``main`` in the order they are
stored in ``inputs.npz`` (the model's input order); outputs are written as ``out0``, ``out1``...
with tuple outputs flattened depth-first in order. ``device`` is ``cpu`` (default) or ``cuda``.
Exit status 0 on success; on failure the last stderr line says why.
"""

import sys


def _flatten(value, out):
    """Append the tensors of a (possibly nested) VM result to ``out`` in order."""
    if hasattr(value, "numpy"):
        out.append(value.numpy())
    else:  # a tuple of results (tvm_ffi Array)
        for item in value:
            _flatten(item, out)
    return out


def main(argv):
    if len(argv) not in (3, 4):
        sys.exit("usage: _runner.py library.so inputs.npz outputs.npz [cpu|cuda]")
    library, inputs_path, outputs_path = argv[:3]
    device_kind = argv[3] if len(argv) == 4 else "cpu"

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


if __name__ == "__main__":
    main(sys.argv[1:])
