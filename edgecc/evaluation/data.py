"""Labelled evaluation data for ``edgecc eval``, ``sensitivity`` and ``compile --max-drop``.

``--data`` names one of:

- ``data.npz``: one array per model input, named like the input, samples on axis 0, plus an
  optional integer array ``labels`` (N,). Arrays are read once, when the first batch is needed.
- a folder holding ``<input name>.npy`` for every input (samples on axis 0; memory-mapped, so only
  one batch is read at a time) and optionally ``labels.npy`` / ``labels.txt`` / ``labels.csv``.
- a folder of per-sample files for a single-input model: ``*.npy`` (one sample each, the input's
  shape without the batch axis) or images (``*.png``, ``*.jpg``, ``*.jpeg``, ``*.bmp``; read with
  Pillow, which must be installed for images), taken in sorted file-name order and read one batch
  at a time. Images become float32 in [0, 1]: grey ``H x W`` -> ``1 x H x W``, colour
  ``H x W x C`` -> ``C x H x W`` (kept ``H x W x C`` when the input is laid out so).
- ``fashion-mnist`` / ``fashion-mnist:train`` and ``digits`` / ``digits:train``: the offline
  datasets of :mod:`edgecc.datasets` (test split by default) for a single-input model.

Labels files (in a folder; the first found of these):

- ``labels.npy``: integers, one per sample, in sample order;
- ``labels.txt``: one line per sample, either ``LABEL`` (in sample order) or ``FILE LABEL``
  (whitespace-separated; any order, every sample file listed); blank lines and ``#`` comments
  are ignored;
- ``labels.csv``: rows ``FILE,LABEL`` (a first row ``file,label`` is a header and skipped).

Sample order is sorted file names (per-sample folders) or the array order. Without labels the
evaluation measures agreement with a float reference instead of accuracy.

Every sample's shape must equal the model input's shape without its batch axis, and its dtype
must convert under NumPy's ``same_kind`` rule; a mismatch, a missing input name, or a labels
count that differs from the sample count is a :class:`~edgecc.errors.UserInputError`.
"""

from __future__ import annotations

import csv
import logging
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecc.errors import UserInputError

logger = logging.getLogger(__name__)

LABELS = "labels"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LABEL_FILES = ("labels.npy", "labels.txt", "labels.csv")
NAMED = {"fashion-mnist": "fashion_mnist", "digits": "digits"}


@dataclass(frozen=True)
class InputInfo:
    """A model input as evaluation feeds it: name, per-sample shape (no batch axis), dtype."""

    name: str
    sample_shape: tuple[int, ...]
    dtype: str


@dataclass
class Batch:
    """Model inputs for ``n`` samples (samples on axis 0) and their labels (or None)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))


class EvalData:
    """Samples bound to a model's inputs, read batch by batch.

    Attributes:
        description: where the data came from, for reports.
        num_samples: how many samples there are.
        labels: the labels (N,), or None.
    """

    def __init__(
        self,
        description: str,
        num_samples: int,
        labels: np.ndarray | None,
        reader: Any,
        inputs: Sequence[InputInfo],
    ):
        self.description = description
        self.num_samples = num_samples
        self.labels = labels
        self._reader = reader  # reader(start, stop) -> {input name: array}
        self.inputs = list(inputs)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def limit(self, count: int | None) -> EvalData:
        """The first ``count`` samples (all when None)."""
        if count is None or count >= self.num_samples:
            return self
        if count < 1:
            raise UserInputError(f"--samples must be >= 1, got {count}")
        labels = None if self.labels is None else self.labels[:count]
        return EvalData(f"{self.description}[:{count}]", count, labels, self._reader, self.inputs)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Batches of ``batch_size`` samples (the last may be short), read lazily."""
        if batch_size < 1:
            raise UserInputError(f"batch size must be >= 1, got {batch_size}")
        for start in range(0, self.num_samples, batch_size):
            stop = min(self.num_samples, start + batch_size)
            arrays = self._reader(start, stop)
            inputs = {i.name: _convert(arrays[i.name], i, self.description) for i in self.inputs}
            labels = None if self.labels is None else self.labels[start:stop]
            yield Batch(inputs, labels)

    def num_batches(self, batch_size: int) -> int:
        return -(-self.num_samples // batch_size)


def open_data(data: Any, inputs: Sequence[InputInfo]) -> EvalData:
    """Bind ``data`` to the model ``inputs`` (see the module docstring for what ``data`` may be).

    ``data`` may also be, through the API, a mapping of arrays (input names plus ``labels``) or an
    :class:`edgecc.datasets.Dataset`.

    Raises:
        UserInputError: unreadable data, wrong input names, shapes that do not match, bad labels.
    """
    from edgecc.datasets import Dataset

    if isinstance(data, Dataset):
        return _single(inputs, data.images, data.labels, data.name)
    if isinstance(data, Mapping):
        return _arrays(dict(data), inputs, "arrays given to edgecc.evaluate")
    text = str(data)
    name, _, split = text.partition(":")
    if name in NAMED and not Path(text).exists():
        from edgecc import datasets

        ds = getattr(datasets, NAMED[name])(split or "test")
        return _single(inputs, ds.images, ds.labels, ds.name)
    path = Path(text)
    if not path.exists():
        raise UserInputError(
            f"data {text!r} not found: pass an .npz, a folder, or one of {', '.join(NAMED)}"
        )
    if path.is_dir():
        return _folder(path, inputs)
    if path.suffix != ".npz":
        raise UserInputError(f"data {text!r}: expected an .npz file or a folder")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserInputError(f"cannot read data {text!r}: {err}") from err
    return _arrays(arrays, inputs, text)


def _single(
    inputs: Sequence[InputInfo], images: np.ndarray, labels: np.ndarray | None, where: str
) -> EvalData:
    if len(inputs) != 1:
        raise UserInputError(
            f"data {where!r} feeds a single-input model; the model takes "
            f"{[i.name for i in inputs]}: pass an .npz with arrays named like the inputs"
        )
    return _arrays({inputs[0].name: images, LABELS: labels}, inputs, where)


def _arrays(arrays: dict[str, Any], inputs: Sequence[InputInfo], where: str) -> EvalData:
    labels = arrays.pop(LABELS, None)
    missing = [i.name for i in inputs if i.name not in arrays]
    if missing:
        raise UserInputError(
            f"data {where!r} has arrays {sorted(arrays)} but the model inputs are "
            f"{[i.name for i in inputs]}: missing {', '.join(missing)}"
        )
    extra = sorted(set(arrays) - {i.name for i in inputs})
    if extra:
        logger.warning("data %s: ignoring arrays that are not model inputs: %s", where, extra)
    counts = {}
    for i in inputs:
        a = arrays[i.name]
        _check_shape(i, tuple(np.shape(a))[1:], where)
        counts[i.name] = len(a)
    if len(set(counts.values())) != 1:
        raise UserInputError(f"data {where!r}: inputs disagree on the number of samples: {counts}")
    count = next(iter(counts.values()))
    labels = _check_labels(labels, count, where)
    return EvalData(
        f"{where} ({count} samples{', labelled' if labels is not None else ''})",
        count,
        labels,
        lambda start, stop: {i.name: arrays[i.name][start:stop] for i in inputs},
        inputs,
    )


def _folder(path: Path, inputs: Sequence[InputInfo]) -> EvalData:
    npys = {f.stem: f for f in sorted(path.glob("*.npy")) if f.name != "labels.npy"}
    if all(i.name in npys for i in inputs):
        arrays: dict[str, Any] = {i.name: _load_npy(npys[i.name]) for i in inputs}
        count = len(arrays[inputs[0].name])
        arrays[LABELS] = _labels_file(path, [f"{k}" for k in range(count)], ordered_only=True)
        return _arrays(arrays, inputs, str(path))
    if len(inputs) != 1:
        raise UserInputError(
            f"data folder {str(path)!r} lacks {[i.name for i in inputs if i.name not in npys]}"
            f".npy: a folder of per-sample files feeds a single-input model; for "
            f"{[i.name for i in inputs]} save one <input name>.npy per input"
        )
    files = sorted(
        f for f in path.iterdir() if f.suffix.lower() in (".npy", *IMAGE_SUFFIXES) and f.is_file()
    )
    files = [f for f in files if f.name != "labels.npy"]
    if not files:
        raise UserInputError(
            f"data folder {str(path)!r} holds no .npy or image files "
            f"({', '.join(IMAGE_SUFFIXES)}) and no {inputs[0].name}.npy"
        )
    spec = inputs[0]
    labels = _check_labels(_labels_file(path, [f.name for f in files]), len(files), str(path))
    _check_shape(spec, _read_sample(files[0], spec).shape, str(files[0]))

    def read(start: int, stop: int) -> dict[str, np.ndarray]:
        samples = []
        for f in files[start:stop]:
            sample = _read_sample(f, spec)
            _check_shape(spec, sample.shape, str(f))
            samples.append(sample)
        return {spec.name: np.stack(samples)}

    kinds = "/".join(sorted({f.suffix.lower() for f in files}))
    labelled = ", labelled" if labels is not None else ""
    return EvalData(
        f"{path} ({len(files)} {kinds} files{labelled})",
        len(files),
        labels,
        read,
        inputs,
    )


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserInputError(f"cannot read {str(path)!r}: {err}") from err


def _read_sample(path: Path, spec: InputInfo) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.asarray(_load_npy(path))
    try:
        from PIL import Image
    except ImportError as err:
        raise UserInputError(
            f"{path}: reading images needs Pillow (pip install pillow); or save samples as .npy"
        ) from err
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img)
    except OSError as err:
        raise UserInputError(f"cannot read image {str(path)!r}: {err}") from err
    pixels = pixels.astype(np.float32) / (65535.0 if pixels.dtype == np.uint16 else 255.0)
    if pixels.ndim == 2:
        return pixels[None] if len(spec.sample_shape) == 3 else pixels
    if len(spec.sample_shape) == 3 and spec.sample_shape[-1] == pixels.shape[-1]:
        return pixels  # the model takes H x W x C
    return np.transpose(pixels, (2, 0, 1))


def _labels_file(path: Path, names: Sequence[str], ordered_only: bool = False) -> np.ndarray | None:
    """The labels in ``path`` for samples ``names`` (file names), or None when there is none."""
    found = next((path / n for n in LABEL_FILES if (path / n).is_file()), None)
    if found is None:
        return None
    if found.suffix == ".npy":
        return np.asarray(_load_npy(found))
    try:
        text = found.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(f"cannot read labels {str(found)!r}: {err}") from err
    if found.suffix == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["file", "label"]:
            rows = rows[1:]
        pairs = [(r[0].strip(), r[1].strip() if len(r) > 1 else "") for r in rows]
    else:
        lines = [ln.split("#", 1)[0].split() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln]
        if all(len(ln) == 1 for ln in lines):
            return _ints([ln[0] for ln in lines], found)
        pairs = [(ln[0], ln[-1]) for ln in lines]
    if ordered_only:
        raise UserInputError(
            f"{found}: with <input>.npy arrays give labels in sample order (one LABEL per line, "
            "or labels.npy)"
        )
    by_file = dict(pairs)
    missing = [n for n in names if n not in by_file]
    if missing:
        raise UserInputError(
            f"{found} lists no label for {len(missing)} files (e.g. {missing[0]!r}); "
            "expected FILE,LABEL rows for every sample file"
        )
    return _ints([by_file[n] for n in names], found)


def _ints(values: Sequence[str], where: Path) -> np.ndarray:
    try:
        return np.array([int(v) for v in values], np.int64)
    except ValueError as err:
        raise UserInputError(f"{where}: labels must be integers ({err})") from err


def _check_labels(labels: Any, count: int, where: str) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserInputError(
            f"data {where!r}: labels must be a 1-D integer array, got {labels.dtype}"
            f"{list(labels.shape)}"
        )
    if len(labels) != count:
        raise UserInputError(f"data {where!r}: {len(labels)} labels for {count} samples")
    return labels.astype(np.int64)


def _check_shape(spec: InputInfo, shape: tuple[int, ...], where: str) -> None:
    if tuple(shape) != tuple(spec.sample_shape):
        raise UserInputError(
            f"data {where!r}: input {spec.name!r} samples have shape {list(shape)}, the model "
            f"takes {list(spec.sample_shape)} per sample (batch axis first)"
        )


def _convert(array: Any, spec: InputInfo, where: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.dtype(spec.dtype):
        if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
            raise UserInputError(
                f"data {where!r}: input {spec.name!r} is {array.dtype}, the model takes "
                f"{spec.dtype}"
            )
        array = array.astype(spec.dtype)
    return array
