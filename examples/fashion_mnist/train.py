"""Train a small CNN on Fashion-MNIST and write what edgecc needs to compile and evaluate it.

Writes to ``--out`` (default ``build/fashion-mnist``):

- ``model.pt``: the trained network as TorchScript, input ``x`` of shape 1x1x28x28 (pixels in
  [0, 1]; the mean/std normalisation is inside the network);
- ``calib.npz``: ``x``, ``--calib-samples`` training images (N x 1 x 28 x 28) for ``--calib``;
- ``test.npz``: ``x``, the 10,000 test images, and ``labels``, their classes.

The data come from the Debian package ``dataset-fashion-mnist`` (no downloads). Three epochs take
about 15 s on one core and reach about 89.7 % test accuracy.

Usage::

    python examples/fashion_mnist/train.py [--epochs 3] [--out build/fashion-mnist]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgecc.datasets import Dataset, fashion_mnist

logger = logging.getLogger("fashion_mnist")

# Fashion-MNIST training-set pixel mean and standard deviation (pixels in [0, 1]).
MEAN, STD = 0.2860, 0.3530
INPUT_NAME = "x"


class FashionCNN(nn.Module):
    """Two strided conv-BN-ReLU stages and a linear classifier: ~0.4 M MACs, 21 k parameters.

    Strided convolutions instead of max-pooling keep the 28x28 feature maps (and so training
    time) small. The BatchNorms give ``fold-bn`` work; the conv channels give ``prune`` work.
    """

    def __init__(self, classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 5, stride=2, padding=2, bias=False),  # 14x14
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),  # 7x7
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(2 * width * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - MEAN) / STD
        return self.classifier(torch.flatten(self.features(x), 1))


def train(
    model: nn.Module,
    data: Dataset,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` in place with Adam and a one-cycle schedule; returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    steps = epochs * ((len(labels) + batch_size - 1) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        total = 0.0
        for start in range(0, len(labels), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(images[idx]), labels[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        logger.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(labels))
    return model.eval()


@torch.no_grad()
def torch_accuracy(model: nn.Module, data: Dataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``data`` with torch, in [0, 1]."""
    correct = 0
    for start in range(0, len(data), batch_size):
        scores = model(torch.from_numpy(data.images[start : start + batch_size]))
        correct += int((scores.argmax(1).numpy() == data.labels[start : start + batch_size]).sum())
    return correct / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/fashion-mnist"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--calib-samples", type=int, default=256, help="32..256 is typical")
    parser.add_argument("--seed", type=int, default=0)
    # One thread: the tensors are small, and two OpenMP threads slow down badly when another
    # process holds one of the two cores.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_set, test_set = fashion_mnist("train"), fashion_mnist("test")
    start = time.perf_counter()
    model = train(FashionCNN(), train_set, epochs=args.epochs, seed=args.seed)
    logger.info("trained %d epochs in %.1f s", args.epochs, time.perf_counter() - start)
    logger.info("test accuracy (torch): %.2f %%", 100 * torch_accuracy(model, test_set))

    args.out.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.trace(model, torch.zeros(1, 1, 28, 28))
    torch.jit.save(scripted, str(args.out / "model.pt"))
    # Calibration images: a seeded random draw from the training set, never from the test set.
    calib = train_set.subset(args.calib_samples, seed=args.seed + 1)
    np.savez(args.out / "calib.npz", **{INPUT_NAME: calib.images})
    np.savez_compressed(
        args.out / "test.npz", **{INPUT_NAME: test_set.images}, labels=test_set.labels
    )
    logger.info("wrote model.pt, calib.npz (%d images), test.npz to %s", len(calib), args.out)


if __name__ == "__main__":
    main()
