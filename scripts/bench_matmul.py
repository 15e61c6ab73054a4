"""Kernel-level speed of edgecc's matmul schedules as ratios to ONNX Runtime, in one run.

Each case is a one-kernel ONNX graph (MLP layers of all-MiniLM-L6-v2 at seq 128, and attention's
batch matmuls with 12 heads), compiled by :func:`edgecc.lower.lower` for ``x86`` and timed against
ONNX Runtime (default optimisations) with the same thread count, in rounds that alternate the
two engines in this process (``--repeat`` calls each per round); the ratio quoted is the median
of the per-round ratios of medians, with its quartiles. Outputs are checked against ONNX Runtime
first.

Usage::

    python scripts/bench_matmul.py [--cases mlp384,...] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402  (scripts/benchmark.py: engines, interleaved rounds, ratios)

from edgecc.lower import lower  # noqa: E402
from edgecc.report.compare import ort_session  # noqa: E402
from edgecc.targets import get_target  # noqa: E402


def _dense(m: int, k: int, n: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) * 0.05, "w")
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["t"]),
        helper.make_node("Add", ["t", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, n])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batch(heads: int, m: int, k: int, n: int) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "bmm",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, heads, m, k]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, heads, k, n]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, heads, m, n])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CASES = {
    "mlp384": lambda: _dense(128, 384, 384),
    "mlp384x1536": lambda: _dense(128, 384, 1536),
    "mlp1536x384": lambda: _dense(128, 1536, 384),
    "qk_d32": lambda: _batch(12, 128, 32, 128),
    "pv_d32": lambda: _batch(12, 128, 128, 32),
    "qk_d64": lambda: _batch(12, 128, 64, 128),
    "pv_d64": lambda: _batch(12, 128, 128, 64),
}


def _interleaved(library: Path, sess, feeds: dict[str, np.ndarray], args) -> tuple:
    """Per-round ratios of edgecc's and ORT's median call times, both in this process
    (TVM_NUM_THREADS = ORT's intra-op threads); rounds alternate the two engines."""
    import os

    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import tvm  # measurement only: the library is loaded here so both engines share the load
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), dev)
    inputs = [tvm.runtime.tensor(v, dev) for v in feeds.values()]
    timer = vm.time_evaluator("main", dev, number=1, repeat=args.repeat)
    import time

    ratios, t_edge, t_ort = [], [], []
    for _ in range(args.rounds):
        for _ in range(args.warmup):
            vm["main"](*inputs)
        edge = float(np.median(timer(*inputs).results)) * 1e3
        for _ in range(args.warmup):
            sess.run(None, feeds)
        samples = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            sess.run(None, feeds)
            samples.append((time.perf_counter() - start) * 1e3)
        ort = float(np.median(samples))
        ratios.append(edge / ort)
        t_edge.append(edge)
        t_ort.append(ort)
    return ratios, t_edge, t_ort


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    print(f"CPU: {cpu}; threads {args.threads}; rounds {args.rounds}")
    target = get_target("x86")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.cases.split(","):
            model = CASES[name]()
            shapes = {
                i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim)
                for i in model.graph.input
            }
            lib = lower(
                model, target, shapes, dict.fromkeys(shapes, "float32"), Path(work) / f"{name}.so"
            )
            rules = lib.details["schedules"]["kernels"]
            rng = np.random.default_rng(1)
            feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
            sess = ort_session(model, threads=args.threads, optimise=True)
            ref = sess.run(None, feeds)[0]
            got = next(iter(benchmark.run_library(lib.path, target, feeds, ["y"]).values()))
            err = float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) + 1e-30))
            ratios, t_edge, t_ort = _interleaved(lib.path, sess, feeds, args)
            r = np.percentile(ratios, [25, 50, 75])
            row = (
                f"{name:12s} edgecc {np.median(t_edge):8.3f} ms  ort {np.median(t_ort):8.3f} ms"
                f"  ratio {r[1]:.2f} (q1-q3 {r[0]:.2f}-{r[2]:.2f})  rel.err {err:.1e}  "
                f"rules {rules}"
            )
            print(row, flush=True)
            rows.append(row)


if __name__ == "__main__":
    main()
