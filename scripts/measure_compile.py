"""Compile the test architectures for x86, rpi4 and jetson-orin; record compile time and the
max abs diff of the package output against torch (x86 natively, rpi4 under qemu emulation; the
Jetson package cannot run without a GPU, so only its build is timed).

Usage (from the repository root)::

    python scripts/measure_compile.py            # writes docs/compile.md and docs/compile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import edgecc  # noqa: E402
from tests.models import load_minilm, make_model  # noqa: E402

TARGETS = ("x86", "rpi4", "jetson-orin")


def _models() -> list[tuple[str, torch.nn.Module, dict[str, torch.Tensor] | tuple]]:
    out = []
    for name in ("resnetish", "mobilenetv2ish", "tiny_transformer"):
        model = make_model(name)
        out.append((name, model, model.example_inputs()))
    minilm, inputs = load_minilm(seq_len=16)
    out.append(("all-MiniLM-L6-v2", minilm, inputs))
    return out


def _torch_output(model: torch.nn.Module, example: object) -> np.ndarray:
    with torch.no_grad():
        y = model(**example) if isinstance(example, dict) else model(*example)
    y = y.last_hidden_state if hasattr(y, "last_hidden_state") else y
    return y.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--targets", default=",".join(TARGETS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, example in _models():
            for target in args.targets.split(","):
                start = time.perf_counter()
                pkg = edgecc.compile(model, target, example_inputs=example, out=Path(tmp) / name)
                row = {
                    "model": name,
                    "target": target,
                    "compile_s": round(pkg.report["compile_seconds"], 1),
                    "total_s": round(time.perf_counter() - start, 1),
                    "library_bytes": pkg.library.stat().st_size,
                    "cuda_code": pkg.manifest["library"].get("cuda_code"),
                }
                if pkg.target().device == "cpu":
                    probe = pkg.probe_inputs()
                    feeds = {k: torch.from_numpy(v) for k, v in probe.items()}
                    example_probe = feeds if isinstance(example, dict) else tuple(feeds.values())
                    got = pkg.run()[pkg.output_names[0]]
                    ref = _torch_output(model, example_probe)
                    row["max_abs_diff_vs_torch"] = float(np.max(np.abs(got - ref)))
                    row["max_abs_ref"] = float(np.max(np.abs(ref)))
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(exist_ok=True)
    (args.out / "compile.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# Compile times and agreement with torch",
        "",
        "Produced by `python scripts/measure_compile.py` (default passes: cleanup, fold-bn). "
        "x86 runs natively, rpi4 under qemu-user emulation; Jetson packages are built only "
        "(no GPU here). Compile time is the TVM lowering; total includes export and passes.",
        "",
        "| model | target | compile s | total s | library bytes | max abs diff vs torch "
        "(max abs output) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = (
            f"{r['max_abs_diff_vs_torch']:.2e} ({r['max_abs_ref']:.3g})"
            if "max_abs_diff_vs_torch" in r
            else f"not run (CUDA code: {r['cuda_code']})"
        )
        lines.append(
            f"| {r['model']} | {r['target']} | {r['compile_s']} | {r['total_s']} | "
            f"{r['library_bytes']:,} | {diff} |"
        )
    (args.out / "compile.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
