"""Measure the integer lowering (issue 8): library bytes, steps vs ONNX Runtime, predictions.

* ``size``: library bytes of the fp32 package (default passes) and the int8 one (default + qdq,
  random calibration) of ResNet-18 and all-MiniLM-L6-v2;
* ``steps``: ResNet-18 and MobileNetV2 (224x224) int8 packages against ONNX Runtime
  (optimisations off) on the package's own QDQ graph, max |diff| in output quantization steps
  (the step of the package's check rule) over seeded inputs;
* ``fashion``: the Fashion-MNIST CNN of ``examples/fashion_mnist`` (trained first when absent)
  int8 (``fold-bn,qdq``, calibrated on ``calib.npz``), predictions of the library and of ONNX
  Runtime on all 10,000 test images.

Usage::

    python scripts/measure_int8.py [--sections size,steps,fashion] [--out build/int8.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edgecc  # noqa: E402
from tests.models import load_minilm, make_model  # noqa: E402

log = logging.getLogger("measure_int8")
FASHION_DIR = ROOT / "build" / "fashion-mnist"


def ort_session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def vm_of(pkg: Any) -> Any:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(pkg.library)), tvm.cpu())

    def run(*arrays: np.ndarray) -> np.ndarray:
        out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
        return out.numpy() if hasattr(out, "numpy") else out[0].numpy()

    return run


def section_size(work: Path, names: tuple[str, ...] = ("resnet18", "minilm")) -> dict[str, Any]:
    rows = {}
    for name in names:
        calib = "random"
        if name == "minilm":  # int64 token inputs: calibrate on the tokenized example, repeated
            model, inputs = load_minilm(seq_len=16)
            kwargs = {"example_inputs": inputs}
            calib = str(work / "minilm-calib.npz")
            np.savez(calib, **{k: np.repeat(v.numpy(), 4, axis=0) for k, v in inputs.items()})
        else:
            model = make_model(name)
            kwargs = {"example_inputs": model.example_inputs()}
        sizes = {}
        for variant, passes in (("fp32", "fold-bn"), ("int8", "fold-bn,qdq")):
            pkg = edgecc.compile(
                model, "x86", passes=passes, out=work / f"{name}-{variant}",
                **({"calib": calib} if variant == "int8" else {}), **kwargs,
            )  # fmt: skip
            sizes[variant] = pkg.library.stat().st_size
            if variant == "int8":
                ex = pkg.manifest["int8_execution"]
                sizes["int8_summary"] = ex["summary"]
        sizes["ratio"] = round(sizes["int8"] / sizes["fp32"], 3)
        rows[name] = sizes
        log.info("size %s: %s", name, sizes)
    return rows


def section_steps(
    work: Path, names: tuple[str, ...] = ("resnet18", "mobilenetv2"), qdq: str = ""
) -> dict[str, Any]:
    import torch

    rows = {}
    for name in names:
        model = make_model(name)
        pkg = edgecc.compile(
            model, "x86", example_inputs=model.example_inputs(),
            passes="fold-bn,qdq" + (f"({qdq})" if qdq else ""),
            calib="random", out=work / f"{name}-steps",
        )  # fmt: skip
        graph = onnx.load(str(pkg.path / "model.onnx"))
        sess, run = ort_session(graph), vm_of(pkg)
        (step,) = pkg.manifest["check"]["steps"].values()
        rng = np.random.default_rng(0)
        worst, same, exact, cos = 0.0, 0, 0.0, 1.0
        trials = 5
        for _ in range(trials):
            x = rng.standard_normal(model.example_shape).astype(np.float32)
            got = run(x)
            (ref,) = sess.run(None, {pkg.input_names[0]: x})
            worst = max(worst, float(np.abs(got - ref).max()) / step)
            same += int(np.argmax(got) == np.argmax(ref))
            exact += float((got == ref).mean()) / trials
            with torch.no_grad():
                fp32 = model(torch.from_numpy(x)).numpy().reshape(got.shape).astype(np.float64)
            g = got.astype(np.float64)
            cos = min(cos, float((g * fp32).sum() / np.linalg.norm(g) / np.linalg.norm(fp32)))
        ex = pkg.manifest["int8_execution"]
        rows[name] = {
            "max_steps": round(worst, 3),
            "argmax_equal": f"{same}/{trials}",
            "fraction_exact": round(exact, 4),
            "min_cosine_vs_fp32_torch": round(cos, 5),
            "summary": ex["summary"],
        }
        log.info("steps %s: %s", name, rows[name])
    return rows


def section_fashion(work: Path) -> dict[str, Any]:
    if not (FASHION_DIR / "model.pt").is_file():
        script = ROOT / "examples/fashion_mnist/train.py"
        subprocess.run([sys.executable, str(script), "--out", str(FASHION_DIR)], check=True)
    pkg = edgecc.compile(
        FASHION_DIR / "model.pt", "x86", input_shapes=["x:1x1x28x28"], passes="fold-bn,qdq",
        calib=str(FASHION_DIR / "calib.npz"), out=work / "fashion",
    )  # fmt: skip
    test = np.load(FASHION_DIR / "test.npz")
    x, labels = test["x"].astype(np.float32), test["labels"]
    sess, run = ort_session(onnx.load(str(pkg.path / "model.onnx"))), vm_of(pkg)
    name = pkg.input_names[0]
    ours = np.array([np.argmax(run(x[i : i + 1])) for i in range(len(x))])
    theirs = np.array([np.argmax(sess.run(None, {name: x[i : i + 1]})[0]) for i in range(len(x))])
    row = {
        "images": len(x),
        "same_predictions": int((ours == theirs).sum()),
        "accuracy_tvm_int8_pct": round(100 * float((ours == labels).mean()), 2),
        "accuracy_ort_qdq_pct": round(100 * float((theirs == labels).mean()), 2),
        "summary": pkg.manifest["int8_execution"]["summary"],
    }
    log.info("fashion: %s", row)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="size,steps,fashion")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "int8.json")
    parser.add_argument(
        "--qdq", default="", help="options of the steps section's qdq, e.g. reduce_range=true"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sections = {"size": section_size, "steps": section_steps, "fashion": section_fashion}
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sections.split(","):
            extra = {"qdq": args.qdq} if name == "steps" and args.qdq else {}
            result[name] = sections[name](Path(tmp), **extra)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
