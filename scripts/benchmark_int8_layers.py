"""Per-layer int8 speed: edgecc int8 vs ONNX Runtime int8 vs edgecc fp32, measured in one run.

Each layer (ResNet-18 3x3 convs, MobileNetV2 pointwise and depthwise convs, a MiniLM FFN matmul)
is built three ways and timed in interleaved rounds on the same inputs:

``int8``     edgecc's int8 layer (:mod:`edgecc.lower.int8_layers`: u8 x s8 -> int32 conv/matmul
             + fused requantize), compiled with edgecc's pipeline and rules for ``--target``;
``fp32``     the same layer in float32 (conv/matmul + bias) through the same pipeline;
``ort int8`` ONNX Runtime on the same layer as one ``QLinearConv`` (scales chosen so its
             requantization equals edgecc's; convs only), default optimisations.

Rows give ``int8 / fp32`` and ``int8 / ort int8`` ratios of the best times (the least
disturbed sample on a shared machine; medians are in the JSON); the int8 output is also
compared with ORT's (max abs difference in quantization steps; ORT requantizes in fixed point).
Used by ``scripts/benchmark.py --int8-layers``; runnable alone::

    python scripts/benchmark_int8_layers.py [--threads 2] [--rounds 3] [--layers r18_l2,...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecc.lower.int8_layers import SCALE, Layer, build_module, layer_module  # noqa: E402
from edgecc.targets import get_target  # noqa: E402

LAYERS = {
    "r18_l1": Layer("r18_l1", "conv", (1, 64, 56, 56), 64, kernel=3),
    "r18_l2": Layer("r18_l2", "conv", (1, 128, 28, 28), 128, kernel=3),
    "r18_l3": Layer("r18_l3", "conv", (1, 256, 14, 14), 256, kernel=3),
    "r18_l4": Layer("r18_l4", "conv", (1, 512, 7, 7), 512, kernel=3),
    "r18_stem": Layer("r18_stem", "conv", (1, 3, 224, 224), 64, kernel=7, stride=2),
    "mbv2_pw": Layer("mbv2_pw", "conv", (1, 32, 28, 28), 192, kernel=1),
    "mbv2_dw": Layer("mbv2_dw", "conv", (1, 192, 28, 28), 192, kernel=3, groups=192),
    "minilm_ffn": Layer("minilm_ffn", "matmul", (128, 384), 1536),
}


def qlinear_conv(layer: Layer) -> onnx.ModelProto:
    """``layer`` as one ONNX QLinearConv with the same integer maths (x, w scales 1, zero
    points 0; y scale 1 / SCALE, zero point 128: multiplier = SCALE)."""
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, np.uint8), "xz"),
        numpy_helper.from_array(layer.weight(), "w"),
        numpy_helper.from_array(np.array(1.0, np.float32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"),
        numpy_helper.from_array(np.array(1.0 / SCALE, np.float32), "ys"),
        numpy_helper.from_array(np.array(128, np.uint8), "yz"),
        numpy_helper.from_array(layer.bias(), "b"),
    ]
    p = layer.kernel // 2
    node = helper.make_node(
        "QLinearConv",
        ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
        ["y"],
        strides=[layer.stride] * 2,
        pads=[p] * 4,
        group=layer.groups,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, list(layer.shape))],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vm_timer(path: Path, x: np.ndarray) -> Any:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    arg = tvm.runtime.tensor(x)

    def run() -> Any:
        return vm["main"](arg)

    return run


def _median_ms(call: Any, budget_s: float) -> list[float]:
    call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench_layers(
    names: list[str], target_name: str = "x86", threads: int = 2, rounds: int = 3
) -> list[dict[str, Any]]:
    """One row per layer: medians (ms) and the int8 / fp32, int8 / ort int8 ratios."""
    import onnxruntime as ort

    os.environ["TVM_NUM_THREADS"] = str(threads)
    target = get_target(target_name)
    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="edgecc-int8-layers-") as tmp:
        for name in names:
            layer = LAYERS[name]
            x = layer.random_input(rng)
            int8_path, cov, _ = build_module(
                layer_module([layer]), target, Path(tmp) / f"{name}_i8.so"
            )
            fp32_path, _, _ = build_module(
                layer_module([layer], floating=True), target, Path(tmp) / f"{name}_f32.so"
            )
            calls = {
                "int8": _vm_timer(int8_path, x),
                "fp32": _vm_timer(fp32_path, x.astype(np.float32)),
            }
            ort_out = None
            if layer.kind == "conv":
                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                sess = ort.InferenceSession(qlinear_conv(layer).SerializeToString(), so)
                calls["ort int8"] = lambda s=sess, v=x: s.run(None, {"x": v})
                ort_out = sess.run(None, {"x": x})[0]
            samples: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(rounds):
                for engine, call in calls.items():
                    samples[engine] += _median_ms(call, 1.0)
            # Best-of times: on a shared, loaded machine the minimum is the least disturbed.
            med = {k: float(np.min(v)) for k, v in samples.items()}
            ours = calls["int8"]()[0].numpy()
            row: dict[str, Any] = {
                "layer": name,
                "macs": layer.macs(),
                "rule": next(iter(cov["counts"])) if cov["counts"] else None,
                "rules": cov["counts"],
                "best_ms": med,
                "median_ms": {k: float(np.median(v)) for k, v in samples.items()},
                "int8_vs_fp32": med["int8"] / med["fp32"],
                "loadavg_1min": round(os.getloadavg()[0], 2),
            }
            if ort_out is not None:
                row["int8_vs_ort_int8"] = med["int8"] / med["ort int8"]
                row["max_step_diff_vs_ort"] = int(
                    np.abs(ours.astype(np.int32) - ort_out.astype(np.int32)).max()
                )
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| layer | MMACs | int8 ms (best) | fp32 ms | ORT int8 ms | int8/fp32 | int8/ORT int8 | "
        "max diff vs ORT (steps) | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["best_ms"]
        ort_ms = f"{m['ort int8']:.3f}" if "ort int8" in m else "-"
        vs_ort = f"{r['int8_vs_ort_int8']:.2f}" if "int8_vs_ort_int8" in r else "-"
        diff = str(r.get("max_step_diff_vs_ort", "-"))
        lines.append(
            f"| {r['layer']} | {r['macs'] / 1e6:.0f} | {m['int8']:.3f} | {m['fp32']:.3f} | "
            f"{ort_ms} | {r['int8_vs_fp32']:.2f} | {vs_ort} | {diff} | {r['loadavg_1min']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default=",".join(LAYERS), help=f"from {', '.join(LAYERS)}")
    p.add_argument("--target", default="x86")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    rows = bench_layers(args.layers.split(","), args.target, args.threads, args.rounds)
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        ),
        "?",
    )
    print(f"CPU: {cpu}, {args.threads} threads, load {os.getloadavg()[0]:.1f}")
    print(table(rows))


if __name__ == "__main__":
    main()
