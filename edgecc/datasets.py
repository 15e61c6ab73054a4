"""Offline labelled datasets for accuracy measurements: Fashion-MNIST and scikit-learn's digits.

Nothing here downloads. Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``); another
folder with the same four files can be given as ``root`` or in ``$EDGECC_FASHION_MNIST``. The
digits (1,797 8x8 images) ship inside scikit-learn and suit fast unit tests.

Images are returned as float32 NCHW arrays scaled to [0, 1] (no mean/std normalisation: a model
that wants it should do it in its graph, so calibration and test files hold plain pixels), labels
as int64.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecc.errors import UserInputError

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "EDGECC_FASHION_MNIST"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}

# IDX format: magic = 0x0000 (2 bytes), dtype code (1 byte), number of dims (1 byte), then one
# big-endian uint32 per dim, then the data. Fashion-MNIST only uses unsigned bytes (0x08).
_IDX_UBYTE = 0x08


@dataclass(frozen=True)
class Dataset:
    """A labelled image set.

    Attributes:
        images: float32 array, N x C x H x W, values in [0, 1].
        labels: int64 array of N class indices.
        classes: class names, indexed by label.
        name: a short description for reports (``fashion-mnist/test``).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int, seed: int | None = None) -> Dataset:
        """The first ``count`` samples, or a random ``count`` of them when ``seed`` is set."""
        count = min(count, len(self))
        if seed is None:
            idx = np.arange(count)
        else:
            idx = np.sort(np.random.default_rng(seed).choice(len(self), count, replace=False))
        return Dataset(self.images[idx], self.labels[idx], self.classes, f"{self.name}[{count}]")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped) into a uint8 array.

    Raises:
        UserInputError: the file is missing, truncated or not an unsigned-byte IDX file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise UserInputError(f"cannot read IDX file {path}: {err}") from err
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != _IDX_UBYTE:
        raise UserInputError(f"{path} is not an unsigned-byte IDX file (bad header)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserInputError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise UserInputError(
            f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds "
            f"{len(data) - header} bytes of data"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def fashion_mnist_root(root: str | Path | None = None) -> Path:
    """The folder holding the Fashion-MNIST files: ``root``, else ``$EDGECC_FASHION_MNIST``,
    else the Debian package's folder."""
    if root is not None:
        return Path(root)
    env = os.environ.get(FASHION_MNIST_ENV)
    return Path(env) if env else FASHION_MNIST_DIR


def fashion_mnist(
    split: str = "test", root: str | Path | None = None, limit: int | None = None
) -> Dataset:
    """Load a Fashion-MNIST split (``train``: 60,000 images, ``test``: 10,000) as 1x28x28 images.

    Args:
        split: ``train`` or ``test``.
        root: folder with the four ``*-ubyte.gz`` files (see :func:`fashion_mnist_root`).
        limit: keep only the first ``limit`` samples.

    Raises:
        UserInputError: unknown split, or the files are missing (the message names the Debian
            package that installs them) or corrupt.
    """
    if split not in _SPLIT_PREFIX:
        raise UserInputError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    folder = fashion_mnist_root(root)
    prefix = _SPLIT_PREFIX[split]
    images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [p for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise UserInputError(
            f"Fashion-MNIST not found: missing {', '.join(str(p) for p in missing)}. Install the "
            f"Debian package {FASHION_MNIST_PACKAGE} (apt-get install {FASHION_MNIST_PACKAGE}) "
            f"or point ${FASHION_MNIST_ENV} at a folder holding the four *-ubyte.gz files"
        )
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserInputError(
            f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    logger.info("loaded Fashion-MNIST %s: %d images from %s", split, len(labels), folder)
    return Dataset(
        images=(images.astype(np.float32) / 255.0)[:, None],
        labels=labels.astype(np.int64),
        classes=FASHION_MNIST_CLASSES,
        name=f"fashion-mnist/{split}",
    )


def digits(split: str = "test", test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits as 1x8x8 images in [0, 1], split reproducibly.

    Args:
        split: ``train`` or ``test``.
        test_fraction: share of the 1,797 samples held out for ``test`` (stratified by class).
        seed: seed of the split; the same seed gives disjoint ``train`` and ``test`` sets.

    Raises:
        UserInputError: unknown split or a fraction outside (0, 1).
    """
    if split not in _SPLIT_PREFIX:
        raise UserInputError(f"unknown digits split {split!r}; use 'train' or 'test'")
    if not 0.0 < test_fraction < 1.0:
        raise UserInputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(bunch.target)),
        test_size=test_fraction,
        random_state=seed,
        stratify=bunch.target,
    )
    idx = np.sort(idx_train if split == "train" else idx_test)
    # Pixel values are 0..16 in this dataset.
    images = (bunch.images[idx].astype(np.float32) / 16.0)[:, None]
    return Dataset(
        images=images,
        labels=bunch.target[idx].astype(np.int64),
        classes=tuple(str(d) for d in range(10)),
        name=f"digits/{split}",
    )
