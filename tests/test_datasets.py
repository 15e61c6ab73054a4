"""Offline dataset loaders: IDX parsing, Fashion-MNIST from the Debian folder, sklearn digits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from edgecc import datasets
from edgecc.errors import UserInputError

HAVE_FASHION = (datasets.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file()


def write_idx(path: Path, array: np.ndarray, header: bytes | None = None) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file, optionally with a custom header."""
    if header is None:
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(folder: Path, count: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A tiny Fashion-MNIST-shaped folder with both splits; returns the test images and labels."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_read_idx_round_trip(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "a.gz"), array)


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        (bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 4), 4, "unsigned-byte"),  # float32 code
        (bytes([1, 0, 0x08, 1]) + struct.pack(">I", 4), 4, "bad header"),  # bad magic
        (bytes([0, 0, 0x08, 3]) + struct.pack(">I", 4), 0, "truncated"),  # two dims missing
        (bytes([0, 0, 0x08, 1]) + struct.pack(">I", 9), 4, "holds 4 bytes"),  # too few data
    ],
)
def test_read_idx_rejects_corrupt_files(
    tmp_path: Path, header: bytes, data: int, match: str
) -> None:
    write_idx(tmp_path / "bad.gz", np.zeros(data, np.uint8), header=header)
    with pytest.raises(UserInputError, match=match):
        datasets.read_idx(tmp_path / "bad.gz")


def test_read_idx_not_gzip(tmp_path: Path) -> None:
    (tmp_path / "x.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserInputError, match="cannot read"):
        datasets.read_idx(tmp_path / "x.gz")


def test_missing_fashion_mnist_names_debian_package(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="apt-get install dataset-fashion-mnist") as err:
        datasets.fashion_mnist("test", root=tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in str(err.value)


def test_unknown_split() -> None:
    with pytest.raises(UserInputError, match="split"):
        datasets.fashion_mnist("validation")
    with pytest.raises(UserInputError, match="split"):
        datasets.digits("validation")


def test_fashion_mnist_from_env_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = fake_fashion(tmp_path)
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path))
    ds = datasets.fashion_mnist("train", limit=4)
    assert ds.images.shape == (4, 1, 28, 28) and ds.images.dtype == np.float32
    assert ds.labels.dtype == np.int64
    np.testing.assert_allclose(ds.images[:, 0] * 255.0, images[:4], atol=1e-4)
    np.testing.assert_array_equal(ds.labels, labels[:4])
    assert ds.name == "fashion-mnist/train" and len(ds.classes) == 10


def test_fashion_mnist_count_mismatch(tmp_path: Path) -> None:
    fake_fashion(tmp_path, count=6)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(UserInputError, match="do not match"):
        datasets.fashion_mnist("test", root=tmp_path)


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split() -> None:
    ds = datasets.fashion_mnist("test")
    assert ds.images.shape == (10_000, 1, 28, 28)
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
    # The test split is balanced: 1,000 images per class.
    np.testing.assert_array_equal(np.bincount(ds.labels), np.full(10, 1000))


def test_digits_split_is_disjoint_stratified_and_reproducible() -> None:
    train, test = datasets.digits("train"), datasets.digits("test")
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (1, 8, 8) and train.images.max() <= 1.0
    assert set(np.unique(test.labels)) == set(range(10))
    again = datasets.digits("test")
    np.testing.assert_array_equal(again.images, test.images)
    # No test image appears in the training set.
    seen = {img.tobytes() for img in train.images}
    overlap = sum(img.tobytes() in seen for img in test.images)
    assert overlap <= 5  # the raw dataset itself holds a few duplicate images


def test_digits_bad_fraction() -> None:
    with pytest.raises(UserInputError, match="test_fraction"):
        datasets.digits("test", test_fraction=1.5)


def test_subset() -> None:
    ds = datasets.digits("test")
    first = ds.subset(10)
    np.testing.assert_array_equal(first.labels, ds.labels[:10])
    drawn = ds.subset(10, seed=3)
    assert len(drawn) == 10 and drawn.name.endswith("[10]")
    np.testing.assert_array_equal(drawn.labels, ds.subset(10, seed=3).labels)
    assert len(ds.subset(10**6)) == len(ds)
