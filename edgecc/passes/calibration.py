"""Calibration data and activation observers for static int8 quantization (support module).

Loading (:func:`load_calibration`): ``--calib`` names one of

- ``data.npz``: one array per model input, named like the input, first axis = samples;
- a folder of ``.npy`` files: either ``<input name>.npy`` for every input (as in the ``.npz``), or,
  for a single-input model, any ``*.npy`` files taken in sorted order, each holding one sample
  (the input's shape without its batch axis) or a stack of samples (first axis = samples);
- ``random``: seeded N(0, 1) samples for float inputs of static shape (the description says
  "random data (accuracy figures are not meaningful)").

A *sample* is one row along the model's batch axis. An array with one more axis than the input
(``(N, 1, 3, 32, 32)`` for a ``1x3x32x32`` input) has its first two axes merged, so both layouts
work. Every other axis must equal the input's static dims (dynamic dims accept any size); dtypes
are converted when NumPy's ``same_kind`` rule allows it (float64 -> float32, not float -> int).
Batches hold ``batch_size`` samples; an input with a fixed batch dim ``d`` forces batches of
exactly ``d`` (left-over samples are dropped with a warning). ``.npy`` files are memory-mapped
and ``.npz`` arrays loaded once, so only one batch is materialised at a time.

Observers stream over batches with bounded memory: :class:`MinMaxObserver` keeps the running
min and max; :class:`HistogramObserver` adds a fixed-size histogram of ``|x|`` over
``[0, edge]``. When a batch exceeds ``edge``, the edge grows by the smallest power of two ``2^k``
that covers it and groups of ``2^k`` bins merge into one: the old bins nest exactly in the new
ones, so growing loses resolution but never misplaces a count, and the final histogram spans less
than twice the observed maximum. From the histogram:

- percentile ``p``: the upper edge of the bin where the CDF of ``|x|`` reaches ``p/100``;
- entropy (TensorRT-style): for every candidate threshold ``i`` bins (``i >= levels``), the
  reference distribution ``P`` is the first ``i`` bins with the tail mass added to bin ``i-1``;
  ``Q`` quantises those ``i`` bins into ``levels`` groups (128 for a signed range, 256 for a
  non-negative tensor quantised to uint8) and spreads each group's mass evenly over its non-empty
  bins; the threshold minimising ``KL(P || Q)`` wins (the largest, on ties). As in NVIDIA's
  pytorch-quantization, bin 0 counts as its neighbour bin 1: the exact zeros a ReLU produces
  would otherwise dominate ``P`` and push the threshold far too low. The KL threshold is then
  raised, if needed, so that it saturates at most ``ENTROPY_MAX_CLIP`` (0.1 %) of the observed
  values: a single dominant value (the background of normalised images, -0.81 on Fashion-MNIST)
  otherwise pulls the KL minimum onto itself and saturates every brighter pixel (measured: int8
  accuracy 87.4 % without the guard, vs 89.7 % fp32).

The clipping threshold ``T`` of either method turns the observed range into
``[max(min, -T), min(max, T)]`` (so a post-ReLU tensor keeps ``[0, T]``).

Activations are collected by adding the observed tensors as extra graph outputs to a temporary
copy of the model and running ONNX Runtime (optimisations off) batch by batch; graph inputs are
read from the feeds. Progress is shown on stderr with tqdm unless stderr is not a terminal or
``EDGECC_NO_PROGRESS`` is set.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgecc.errors import UserInputError
from edgecc.report.compare import ORT_MAX_IR_VERSION

logger = logging.getLogger(__name__)

RANDOM = "random"
RANDOM_NOTE = "random data (accuracy figures are not meaningful)"
DEFAULT_RANDOM_SAMPLES = 32
DEFAULT_BATCH_SIZE = 8
FINITE_BLOCK = 1024  # rows checked for NaN/Inf at a time
# A calibrated activation beyond this magnitude is almost surely bad data (unnormalised pixels
# are 255, logits tens): its int8 step is so coarse that typical values quantize to zero.
ABSURD_RANGE = 1e6
NO_PROGRESS_ENV = "EDGECC_NO_PROGRESS"


@dataclass(frozen=True)
class InputSpec:
    """A model input as calibration sees it.

    Attributes:
        name: the graph input name.
        shape: dims; an int is static, None (or a string, or a value <= 0) is dynamic.
        dtype: NumPy dtype name (``float32``).
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"

    @property
    def rank(self) -> int:
        return len(self.shape)

    def dim(self, axis: int) -> int | None:
        """The static size of ``axis``, or None when it is dynamic."""
        d = self.shape[axis]
        return d if isinstance(d, int) and d > 0 else None

    def text(self) -> str:
        dims = "x".join(str(self.dim(i)) if self.dim(i) else "?" for i in range(self.rank))
        return f"{self.name}:{dims or 'scalar'}:{self.dtype}"


def input_specs_from_model(model: onnx.ModelProto) -> list[InputSpec]:
    """The specs of the graph inputs of ``model`` that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        specs.append(InputSpec(vi.name, dims, helper.tensor_dtype_to_np_dtype(t.elem_type).name))
    return specs


def _as_specs(input_specs: Any) -> list[InputSpec]:
    """Accept a model, InputSpec-like objects (``.name``, ``.shape``, ``.dtype``) or a mapping."""
    if isinstance(input_specs, onnx.ModelProto):
        return input_specs_from_model(input_specs)
    if isinstance(input_specs, Mapping):
        items = []
        for name, value in input_specs.items():
            shape, dtype = (
                value
                if len(value) == 2 and not isinstance(value[0], int | None)
                else (value, "float32")
            )
            items.append(InputSpec(name, tuple(shape), np.dtype(dtype).name))
        return items
    return [
        InputSpec(s.name, tuple(s.shape), np.dtype(getattr(s, "dtype", "float32")).name)
        for s in input_specs
    ]


class CalibrationData:
    """A re-iterable source of calibration batches: calling it gives a fresh sized iterable.

    Attributes:
        num_samples: samples used (after ``limit``).
        batch_size: samples per batch.
        description: where the data came from, for reports.
    """

    def __init__(
        self,
        specs: Sequence[InputSpec],
        num_samples: int,
        batch_size: int,
        batches: Callable[[], Iterator[dict[str, np.ndarray]]],
        description: str,
    ):
        self.specs = list(specs)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self._batches = batches
        self.description = description

    @property
    def num_batches(self) -> int:
        fixed = any(s.rank and s.dim(0) for s in self.specs)
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not fixed else 0)

    def __call__(self) -> _Batches:
        return _Batches(self._batches, self.num_batches)


class _Batches:
    """One pass over the calibration batches (sized, for progress bars)."""

    def __init__(self, make: Callable[[], Iterator[dict[str, np.ndarray]]], length: int):
        self._make, self._length = make, length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._make()


def load_calibration(
    spec: str,
    input_specs: Any,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    seed: int = 0,
) -> tuple[CalibrationData, str]:
    """Calibration batches for ``qdq`` from ``--calib`` (see the module docstring).

    Args:
        spec: ``path.npz``, a folder of ``.npy`` files, or ``random``.
        input_specs: the model inputs: objects with ``name``, ``shape``, ``dtype`` (the frontend's
            InputSpec), a mapping ``name -> shape`` or ``name -> (shape, dtype)``, or the model.
        batch_size: samples per batch when the model's batch dim is dynamic.
        limit: use at most this many samples (``random``: generate this many, default 32).
        seed: seed of ``random``.

    Returns:
        ``(factory, description)``: calling ``factory()`` gives a sized iterable of input dicts.

    Raises:
        UserInputError: missing or unreadable data, names or shapes that do not match the inputs.
    """
    specs = _as_specs(input_specs)
    if not specs:
        raise UserInputError("calibration: the model has no inputs to feed")
    if batch_size < 1:
        raise UserInputError(f"calibration batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserInputError(f"--calib-samples must be >= 1, got {limit}")
    for s in specs:
        if s.rank == 0:
            raise UserInputError(
                f"calibration: input {s.name!r} is a scalar; scalar inputs are "
                "not supported (give the model a batch axis)"
            )
    batch = _batch_size(specs, batch_size)
    if spec == RANDOM:
        return _random(specs, limit or DEFAULT_RANDOM_SAMPLES, batch, seed)
    path = Path(spec)
    if not path.exists():
        raise UserInputError(
            f"calibration data {spec!r} not found: pass --calib data.npz|dir|random"
        )
    if path.is_dir():
        chunks, what = _folder_chunks(path, specs)
    elif path.suffix == ".npz":
        chunks, what = [_npz_arrays(path, specs)], "arrays"
    elif path.suffix == ".npy" and len(specs) == 1:
        chunks, what = [(str(path), {specs[0].name: _load_npy(path)})], "array"
    else:
        raise UserInputError(
            f"calibration data {spec!r}: expected a .npz file, a folder of .npy files or 'random'"
        )
    chunks = [{s.name: _rows(s, chunk[s.name], src) for s in specs} for src, chunk in chunks]
    sizes = [len(next(iter(c.values()))) for c in chunks]
    total = sum(sizes)
    if limit is not None:
        total = min(total, limit)
    if total < batch:
        raise UserInputError(
            f"calibration data {spec!r} has {total} samples; the model's fixed "
            f"batch size needs at least {batch}"
        )
    dropped = total % batch if any(s.dim(0) for s in specs) else 0
    if dropped:
        logger.warning(
            "calibration: %d samples left over after batches of %d are not used", dropped, batch
        )
    used = total - dropped
    _check_finite(chunks, specs, used, spec)
    shapes = ", ".join(f"{s.name}: {_shape_text(next(c[s.name] for c in chunks))}" for s in specs)
    description = f"{spec} ({what}): {used} samples ({shapes}), batches of {batch}"

    def batches() -> Iterator[dict[str, np.ndarray]]:
        return _batch_iter(chunks, specs, used, batch)

    data = CalibrationData(specs, used, batch, batches, description)
    logger.info("calibration: %s", description)
    return data, description


def _check_finite(
    chunks: Sequence[Mapping[str, np.ndarray]], specs: Sequence[InputSpec], used: int, spec: str
) -> None:
    """Refuse NaN/Inf in the first ``used`` float rows (read in blocks: memmaps stay cheap)."""
    seen = 0
    for chunk in chunks:
        size = min(len(next(iter(chunk.values()))), used - seen)
        for s in specs:
            array = chunk[s.name]
            if array.dtype.kind not in "fc":
                continue
            for start in range(0, size, FINITE_BLOCK):
                block = np.asarray(array[start : min(size, start + FINITE_BLOCK)])
                finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
                if not finite.all():
                    bad = int(np.count_nonzero(~np.isfinite(block)))
                    row = seen + start + int(np.argmin(finite))
                    raise UserInputError(
                        f"calibration data {spec!r}: input {s.name!r} has {bad} NaN/Inf values "
                        f"(first in sample {row}): calibration needs finite data"
                    )
        seen += size
        if seen >= used:
            return


def _batch_size(specs: Sequence[InputSpec], requested: int) -> int:
    fixed = {s.dim(0) for s in specs if s.dim(0)}
    if len(fixed) > 1:
        raise UserInputError(
            "calibration: inputs have different fixed batch sizes "
            f"({', '.join(s.text() for s in specs)})"
        )
    return fixed.pop() if fixed else requested


def _shape_text(rows: np.ndarray) -> str:
    return f"{'x'.join(map(str, rows.shape[1:])) or 'scalar'} {rows.dtype}"


def _random(
    specs: Sequence[InputSpec], count: int, batch: int, seed: int
) -> tuple[CalibrationData, str]:
    for s in specs:
        if np.dtype(s.dtype).kind != "f":
            raise UserInputError(
                f"--calib random: input {s.name!r} is {s.dtype}; random data is "
                "only generated for float inputs: pass --calib data.npz|dir"
            )
        if any(s.dim(i) is None for i in range(1, s.rank)):
            raise UserInputError(
                f"--calib random: input {s.text()} has dynamic dims; random "
                "data needs static shapes: pass --calib data.npz|dir"
            )
    count = max(count, batch) if any(s.dim(0) for s in specs) else count
    count -= count % batch if any(s.dim(0) for s in specs) else 0

    def batches() -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        for start in range(0, count, batch):
            n = min(batch, count - start)
            yield {s.name: rng.standard_normal((n, *s.shape[1:])).astype(s.dtype) for s in specs}

    description = f"{RANDOM_NOTE}: {count} seeded N(0,1) samples (seed {seed}), batches of {batch}"
    return CalibrationData(specs, count, batch, batches, description), description


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserInputError(f"cannot read calibration array {str(path)!r}: {err}") from err


def _npz_arrays(path: Path, specs: Sequence[InputSpec]) -> tuple[str, dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            _check_names(f"calibration data {str(path)!r}", names, specs)
            return str(path), {s.name: npz[s.name] for s in specs}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserInputError(f"cannot read calibration data {str(path)!r}: {err}") from err


def _check_names(where: str, names: Sequence[str], specs: Sequence[InputSpec]) -> None:
    wanted = [s.name for s in specs]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise UserInputError(
            f"{where} has arrays [{', '.join(names)}] but the model inputs are "
            f"[{', '.join(wanted)}]: missing {', '.join(missing)} (save with "
            f"np.savez(path, {wanted[0]}=array, ...))"
        )
    extra = [n for n in names if n not in wanted]
    if extra:
        logger.warning("%s: ignoring arrays that are not model inputs: %s", where, ", ".join(extra))


def _folder_chunks(
    path: Path, specs: Sequence[InputSpec]
) -> tuple[list[tuple[str, dict[str, np.ndarray]]], str]:
    files = sorted(path.glob("*.npy"))
    if not files:
        raise UserInputError(f"calibration folder {str(path)!r} has no .npy files")
    by_stem = {f.stem: f for f in files}
    if all(s.name in by_stem for s in specs):
        _check_names(f"calibration folder {str(path)!r}", list(by_stem), specs)
        return [(str(path), {s.name: _load_npy(by_stem[s.name]) for s in specs})], "named .npy"
    if len(specs) > 1:
        _check_names(f"calibration folder {str(path)!r}", list(by_stem), specs)
    spec = specs[0]
    chunks = []
    for f in files:
        array = _load_npy(f)
        if array.ndim == spec.rank - 1:  # one sample without its batch axis
            array = array[None]
        chunks.append((str(f), {spec.name: array}))
    return chunks, f"{len(files)} .npy files"


def _rows(spec: InputSpec, array: np.ndarray, source: str) -> np.ndarray:
    """``array`` as rows along the input's batch axis, checked against ``spec``."""
    if array.ndim == spec.rank + 1:  # (samples, batch, ...): merge the two leading axes
        array = array.reshape(array.shape[0] * array.shape[1], *array.shape[2:])
    expect = "x".join(str(spec.dim(i) or "?") for i in range(1, spec.rank))
    bad = array.ndim != spec.rank or any(
        spec.dim(i) is not None and array.shape[i] != spec.dim(i) for i in range(1, spec.rank)
    )
    if bad:
        raise UserInputError(
            f"calibration array {spec.name!r} in {source!r} has shape {array.shape}; model input "
            f"{spec.text()} needs (samples, {expect.replace('x', ', ') or ''}) with samples first"
        )
    if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
        raise UserInputError(
            f"calibration array {spec.name!r} in {source!r} is "
            f"{array.dtype}; model input {spec.text()} cannot take it"
        )
    return array


def _batch_iter(
    chunks: Sequence[Mapping[str, np.ndarray]], specs: Sequence[InputSpec], total: int, batch: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch`` rows (the last may be short) over the first ``total`` rows."""
    pending: list[dict[str, np.ndarray]] = []
    have = seen = 0
    for chunk in chunks:
        size = len(next(iter(chunk.values())))
        start = 0
        while start < size and seen < total:
            take = min(size - start, batch - have, total - seen)
            pending.append({k: v[start : start + take] for k, v in chunk.items()})
            start, have, seen = start + take, have + take, seen + take
            if have == batch or seen == total:
                yield {
                    s.name: np.concatenate([p[s.name] for p in pending]).astype(s.dtype)
                    for s in specs
                }
                pending, have = [], 0


# --------------------------------------------------------------------------------------------
# Observers


class MinMaxObserver:
    """Running minimum and maximum of every value seen."""

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.nonfinite = 0  # NaN/Inf values seen (kept out of min and max)

    def update(self, x: np.ndarray) -> None:
        """Fold one batch of values in (NaN and Inf are counted in ``nonfinite``, not ranged)."""
        if x.size == 0:
            return
        finite = np.isfinite(x)
        if not finite.all():
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            x = x[finite]
            if x.size == 0:
                return
        self.min = min(self.min, float(np.min(x)))
        self.max = max(self.max, float(np.max(x)))
        self.count += x.size

    def range(self) -> tuple[float, float]:
        """The observed ``(min, max)``; ``(0, 0)`` when nothing was seen."""
        return (self.min, self.max) if self.count else (0.0, 0.0)


class HistogramObserver(MinMaxObserver):
    """Min/max plus a ``bins``-bin histogram of ``|x|`` over ``[0, edge]`` (see module docstring).

    Args:
        bins: number of bins (a power of two, so merging by powers of two stays exact).
    """

    def __init__(self, bins: int = 2048):
        super().__init__()
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        self.bins = bins
        self.hist = np.zeros(bins, np.int64)
        self.edge = 0.0

    def update(self, x: np.ndarray) -> None:
        super().update(x)
        if x.size == 0:
            return
        a = np.abs(np.asarray(x, np.float32).ravel())
        a = a[np.isfinite(a)]
        if a.size == 0:
            return
        top = float(a.max())
        if top > self.edge:
            self._grow(top)
        if self.edge == 0.0:
            self.hist[0] += a.size
            return
        idx = np.minimum((a * (self.bins / self.edge)).astype(np.int64), self.bins - 1)
        self.hist += np.bincount(idx, minlength=self.bins)

    def _grow(self, top: float) -> None:
        if self.edge == 0.0:  # everything so far was 0 and sits in bin 0 at any scale
            self.edge = top
            return
        factor = 2 ** math.ceil(math.log2(top / self.edge))
        if factor >= self.bins:
            merged = np.zeros(self.bins, np.int64)
            merged[0] = self.hist.sum()
        else:
            merged = np.zeros(self.bins, np.int64)
            merged[: self.bins // factor] = self.hist.reshape(-1, factor).sum(axis=1)
        self.hist, self.edge = merged, self.edge * factor

    @property
    def bin_width(self) -> float:
        return self.edge / self.bins

    def percentile_threshold(self, percentile: float) -> float:
        """The ``percentile`` of ``|x|`` (upper edge of the bin where the CDF reaches it)."""
        total = int(self.hist.sum())
        if total == 0 or self.edge == 0.0:
            return 0.0
        cdf = np.cumsum(self.hist)
        i = int(np.searchsorted(cdf, percentile / 100.0 * total, side="left"))
        return min((i + 1) * self.bin_width, max(abs(self.min), abs(self.max)))

    def entropy_threshold(self, levels: int = 128) -> float:
        """The ``|x|`` clipping threshold minimising KL(P || Q) (see module docstring)."""
        nonzero = np.flatnonzero(self.hist)
        if nonzero.size == 0:
            return 0.0
        last = int(nonzero[-1]) + 1
        top = max(abs(self.min), abs(self.max))
        if last <= levels:  # the whole histogram fits in `levels` bins: nothing to clip
            return top
        hist = self.hist[:last].astype(np.float64)
        hist[0] = hist[1]
        tails = np.cumsum(hist[::-1])[::-1]  # tails[i] = sum(hist[i:])
        best_kl, best_i = math.inf, last
        for i in range(levels, last + 1):
            kl = _kl_clipped(hist[:i], tails[i] if i < last else 0.0, levels)
            if kl <= best_kl:
                best_kl, best_i = kl, i
        return min(best_i * self.bin_width, top)


def _kl_clipped(hist: np.ndarray, tail: float, levels: int) -> float:
    """KL(P || Q) for the histogram clipped at its last bin (see module docstring)."""
    n = hist.size
    p = hist.copy()
    p[-1] += tail
    starts = (np.arange(levels) * n) // levels
    present = (hist > 0).astype(np.float64)
    sums = np.add.reduceat(hist, starts)
    counts = np.add.reduceat(present, starts)
    avg = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    q = np.repeat(avg, np.diff(np.append(starts, n))) * present
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return math.inf
    p, q = p / p_sum, q / q_sum
    mask = p > 0
    # Q can be empty where P holds the clipped tail; a small floor keeps that a finite penalty.
    q = np.maximum(q[mask], 1e-12)
    return float(np.sum(p[mask] * np.log(p[mask] / q)))


METHODS = ("minmax", "percentile", "entropy")
ENTROPY_MAX_CLIP = 1e-3


def make_observer(method: str, bins: int = 2048) -> MinMaxObserver:
    """A fresh observer for ``method`` (min/max only for ``minmax``)."""
    return MinMaxObserver() if method == "minmax" else HistogramObserver(bins)


def calibrated_range(
    observer: MinMaxObserver, method: str, percentile: float = 99.99, levels: int = 128
) -> tuple[float, float]:
    """The float range ``[lo, hi]`` to quantise to, by ``method`` (see module docstring)."""
    lo, hi = observer.range()
    if method == "minmax":
        return lo, hi
    if not isinstance(observer, HistogramObserver):
        raise ValueError(f"method {method!r} needs a HistogramObserver")
    if method == "percentile":
        t = observer.percentile_threshold(percentile)
    elif method == "entropy":
        t = max(
            observer.entropy_threshold(levels),
            observer.percentile_threshold(100.0 * (1.0 - ENTROPY_MAX_CLIP)),
        )
    else:
        raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
    return max(lo, -t), min(hi, t)


# --------------------------------------------------------------------------------------------
# Collection


@dataclass
class Observation:
    """What one calibration run saw: an observer per tensor, and how much data."""

    observers: dict[str, MinMaxObserver]
    samples: int
    batches: int


def progress(iterable: Iterable[Any], desc: str, total: int | None = None) -> Iterable[Any]:
    """``iterable`` wrapped in a tqdm bar on stderr, unless stderr is not a tty or
    ``EDGECC_NO_PROGRESS`` is set."""
    from tqdm import tqdm

    disable = bool(os.environ.get(NO_PROGRESS_ENV)) or not sys.stderr.isatty()
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit="batch",
        file=sys.stderr,
        disable=disable,
        leave=False,
    )


def observe(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    new_observer: Callable[[], MinMaxObserver],
) -> Observation:
    """Run ``model`` on every batch and fold the values of ``tensors`` into observers.

    The tensors become extra outputs of a temporary copy of the model (graph inputs are read from
    the feeds), so only one batch of activations is in memory at a time.

    Raises:
        UserInputError: the batches do not feed the model, or there are none.
    """
    import onnxruntime as ort

    tmp = onnx.ModelProto()
    tmp.CopyFrom(model)
    tmp.ir_version = min(tmp.ir_version, ORT_MAX_IR_VERSION)
    inputs = [
        i.name for i in tmp.graph.input if i.name not in {t.name for t in tmp.graph.initializer}
    ]
    present = {o.name for o in tmp.graph.output}
    fetched = [t for t in tensors if t not in inputs]
    tmp.graph.output.extend(
        helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
        for t in fetched
        if t not in present
    )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 4  # fatal only: a failing node is in the exception, one line
    sess = ort.InferenceSession(tmp.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    observers = {t: new_observer() for t in tensors}
    samples = count = 0
    for feeds in progress(batches, "calibrating"):
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise UserInputError(f"calibration batch lacks model inputs: {', '.join(missing)}")
        try:  # (ORT reads an empty output list as "all outputs")
            values = sess.run(fetched, {n: np.asarray(feeds[n]) for n in inputs}) if fetched else []
        except Exception as err:  # ORT reports bad feeds (shape, dtype) as generic failures
            raise UserInputError(f"calibration batch {count + 1} does not run: {err}") from err
        for name, value in zip(fetched, values, strict=True):
            observers[name].update(value)
        for name in tensors:
            if name in inputs:
                observers[name].update(np.asarray(feeds[name]))
        first = np.asarray(feeds[inputs[0]]) if inputs else np.zeros(1)
        samples += first.shape[0] if first.ndim else 1
        count += 1
    if count == 0:
        raise UserInputError("calibration data gave no batches")
    _check_ranges(observers)
    return Observation(observers, samples, count)


def _check_ranges(observers: Mapping[str, MinMaxObserver]) -> None:
    """Refuse tensors that went NaN/Inf on the calibration data; warn on absurd ranges."""
    for name, obs in observers.items():
        if obs.nonfinite:
            raise UserInputError(
                f"calibration: tensor {name!r} takes {obs.nonfinite} NaN/Inf values on the "
                "calibration data: the data overflow float32 in the model; check its scale"
            )
    absurd = [
        (name, obs.range())
        for name, obs in observers.items()
        if max(map(abs, obs.range())) > ABSURD_RANGE
    ]
    if absurd:
        name, (lo, hi) = absurd[0]
        logger.warning(
            "calibration: %d tensors have ranges beyond +-%.0e (e.g. %r: [%.3g, %.3g]): the "
            "int8 step is so coarse that typical values quantize to zero; check the data's scale",
            len(absurd),
            ABSURD_RANGE,
            name,
            lo,
            hi,
        )
