"""ONNX Runtime as the ARM peer, inside the emulated aarch64 Python (run by benchmark_arm.py).

``python ort_runner.py model.onnx inputs.npz outputs.npz RUNS THREADS``: one session (default
graph optimisations, ``THREADS`` intra-op threads, no spinning), one run whose outputs are
written as ``out0``, ``out1``..., then RUNS more runs between two of edgecc's counting markers
(``lseek(-1, MARK_OFFSET, 0)``, as edgecc/runtime/_runner.py), so edgecc's qemu plugin counts
exactly those RUNS inferences.
"""

import os
import sys

import numpy as np
import onnxruntime as ort

MARK_OFFSET = 0x656467656363


def mark():
    try:  # noqa: SIM105  (kept to the bare minimum the marker needs)
        os.lseek(-1, MARK_OFFSET, 0)
    except OSError:
        pass


def main(model, inputs, outputs, runs, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    with np.load(inputs) as data:
        feeds = {name: data[name] for name in data.files}
    result = sess.run(None, feeds)
    np.savez(outputs, **{f"out{i}": a for i, a in enumerate(result)})
    mark()
    for _ in range(int(runs)):
        sess.run(None, feeds)
    mark()


if __name__ == "__main__":
    main(*sys.argv[1:])
