"""Test-set accuracy of a compiled Fashion-MNIST package (or of an ``.onnx`` file).

By default the package's transformed graph (``model.onnx``, after all passes) runs under ONNX
Runtime. ``--tvm`` runs the compiled library itself, one process per batch of the package's
input shape: compile with a large batch (``--input-shape x:2000x1x28x28``) to keep that quick.

Usage::

    python examples/fashion_mnist/evaluate.py build/fmnist-int8 [--tvm] [--limit 1000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from edgecc.datasets import FASHION_MNIST_CLASSES, Dataset
from edgecc.errors import EdgeccError
from edgecc.evaluation import accuracy


def load_test(path: Path, limit: int | None) -> Dataset:
    """The ``x``/``labels`` arrays written by train.py."""
    with np.load(path) as data:
        images, labels = data["x"][:limit], data["labels"][:limit]
    return Dataset(images, labels, FASHION_MNIST_CLASSES, f"{path.name}[{len(labels)}]")


def tvm_accuracy(package: Path, test: Dataset) -> float:
    """Accuracy of the package's compiled library, run batch by batch (tail batch padded)."""
    import edgecc

    pkg = edgecc.load(package)
    (spec,) = pkg.manifest["inputs"]
    batch = spec["shape"][0]
    correct = 0
    for start in range(0, len(test), batch):
        chunk = test.images[start : start + batch]
        real = len(chunk)
        if real < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, 0)])
        logits = next(iter(pkg.run({spec["name"]: chunk}).values()))[:real]
        correct += int((logits.argmax(1) == test.labels[start : start + real]).sum())
        print(f"  {start + real}/{len(test)} images", flush=True)
    return correct / len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="package folder or .onnx file")
    parser.add_argument("--test", type=Path, default=Path("build/fashion-mnist/test.npz"))
    parser.add_argument("--limit", type=int, default=None, help="use the first N test images")
    parser.add_argument("--tvm", action="store_true", help="run the compiled library (packages)")
    args = parser.parse_args()
    if not args.test.is_file():
        sys.exit(f"error: {args.test} not found: run examples/fashion_mnist/train.py first")
    try:
        run(args)
    except EdgeccError as err:
        sys.exit(f"error: {err}")


def run(args: argparse.Namespace) -> None:
    """Evaluate as the command line asked."""
    test = load_test(args.test, args.limit)
    onnx_path = args.model / "model.onnx" if args.model.is_dir() else args.model
    ort = accuracy(onnx_path, test).accuracy
    print(f"ONNX Runtime ({onnx_path}): {100 * ort:.2f} % on {len(test)} test images")
    if args.tvm:
        print(f"TVM ({args.model}): {100 * tvm_accuracy(args.model, test):.2f} %")


if __name__ == "__main__":
    main()
