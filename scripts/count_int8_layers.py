"""rpi4-style instruction counts of single int8 layers vs the same layers in fp32 (qemu plugin).

Each layer of :data:`scripts.benchmark_int8_layers.LAYERS` is built twice for ``TARGET`` (int8
with int8 activations, as ``qdq`` emits on ARM, and fp32) and run under qemu-aarch64 with
edgecc's instruction-counting plugin (:func:`edgecc.runtime.instructions.count_instructions`)::

    python scripts/count_int8_layers.py rpi4 r18_l3,minilm_ffn
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecc.lower.int8_layers import build_module, layer_module  # noqa: E402
from edgecc.runtime.instructions import count_instructions  # noqa: E402
from edgecc.targets import get_target  # noqa: E402
from scripts.benchmark_int8_layers import LAYERS  # noqa: E402


def main(argv: list[str]) -> None:
    target = get_target(argv[0])
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="edgecc-count-int8-") as tmp:
        for name in argv[1].split(","):
            layer = replace(LAYERS[name], a_dtype="int8", weight_fill="symmetric")
            x = layer.random_input(rng)
            counts = {}
            for variant, floating in (("int8", False), ("fp32", True)):
                path, cov, _ = build_module(
                    layer_module([layer], floating=floating),
                    target,
                    Path(tmp) / f"{name}_{variant}.so",
                )
                feed = {f"{name}_x": x.astype(np.float32) if floating else x}
                counts[variant] = count_instructions(path, target, feed, runs=2)[
                    "instructions_per_inference"
                ]
                print(name, variant, cov["counts"], f"{counts[variant]:.4g}", flush=True)
            print(
                f"{target.name} {name}: {layer.macs() / 1e6:.0f} MMACs, int8 {counts['int8']:.4g}, "
                f"fp32 {counts['fp32']:.4g} instructions, fp32/int8 "
                f"{counts['fp32'] / counts['int8']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
