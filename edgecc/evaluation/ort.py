"""ONNX Runtime helpers of the evaluator: sessions, batched runs, the accuracy of a classifier
on an in-memory :class:`~edgecc.datasets.Dataset`, and sentence embeddings (the general
evaluator is :func:`edgecc.evaluation.evaluate`).

Models run in batches. A model whose batch dimension is fixed (a TorchScript export traced at
batch 1, say) runs in batches of that size, the last batch padded and the padding dropped.

By default ONNX Runtime runs with every graph optimisation off, like the numerical reference in
:mod:`edgecc.report.compare`: a QDQ model then runs as float arithmetic on quantised values
("fake quant"), which is what every backend must reproduce. ``optimize=True`` lets ONNX Runtime
fuse QDQ groups into its int8 kernels, which round differently and so may move accuracy slightly.

Sentence embeddings are mean-pooled over tokens with the attention mask, as sentence-transformers
does for all-MiniLM-L6-v2: ``e = sum_t(mask_t * h_t) / max(sum_t mask_t, 1e-9)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecc.datasets import Dataset
from edgecc.errors import UserInputError
from edgecc.evaluation.metrics import mean_pool
from edgecc.report.compare import _ort_bytes

logger = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class AccuracyResult:
    """Top-1 accuracy of a classifier on a dataset.

    Attributes:
        correct: samples whose arg-max class equals the label.
        total: samples evaluated.
        dataset: the dataset's name.
    """

    correct: int
    total: int
    dataset: str

    @property
    def accuracy(self) -> float:
        """Share of correct samples, in [0, 1]."""
        return self.correct / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, accuracy in percent."""
        return {
            "dataset": self.dataset,
            "correct": self.correct,
            "total": self.total,
            "accuracy_pct": round(100.0 * self.accuracy, 2),
        }


def session(model: onnx.ModelProto | str | Path, optimize: bool = False, threads: int = 2) -> Any:
    """An ONNX Runtime CPU session for ``model`` (a ModelProto or an ``.onnx`` path).

    Args:
        model: the model.
        optimize: enable ONNX Runtime's graph optimisations (off: the reference behaviour).
        threads: intra-op threads.

    Raises:
        UserInputError: the path does not exist.
    """
    import onnxruntime as ort

    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise UserInputError(f"ONNX model not found: {path}")
        model = onnx.load(str(path))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 4  # fatal only: a failing node is in the exception, one line
    return ort.InferenceSession(_ort_bytes(model), opts, providers=["CPUExecutionProvider"])


def run_batched(
    sess: Any,
    inputs: Mapping[str, np.ndarray],
    batch_size: int = 256,
    output: str | int = 0,
) -> np.ndarray:
    """Run ``sess`` in batches over inputs sharing a leading sample axis; concatenate one output.

    Args:
        sess: an ONNX Runtime session (see :func:`session`).
        inputs: input name -> array with samples along axis 0; every model input must be given.
        batch_size: samples per run, unless the model fixes its batch dimension.
        output: the output to collect, by name or index.

    Returns:
        The chosen output for all samples, concatenated along axis 0.

    Raises:
        UserInputError: a model input is missing or the inputs disagree on the number of samples.
    """
    model_inputs = sess.get_inputs()
    missing = [i.name for i in model_inputs if i.name not in inputs]
    if missing:
        raise UserInputError(
            f"missing model inputs {missing}; the model takes {[i.name for i in model_inputs]}"
        )
    counts = {len(inputs[i.name]) for i in model_inputs}
    if len(counts) != 1:
        raise UserInputError(f"inputs disagree on the number of samples: {sorted(counts)}")
    (count,) = counts
    out_names = [o.name for o in sess.get_outputs()]
    out_name = out_names[output] if isinstance(output, int) else output
    if out_name not in out_names:
        raise UserInputError(f"unknown output {out_name!r}; the model gives {out_names}")
    fixed_dims = {i.shape[0] for i in model_inputs if i.shape and isinstance(i.shape[0], int)}
    fixed = fixed_dims.pop() if len(fixed_dims) == 1 else None
    step = fixed or batch_size
    arrays = {i.name: np.asarray(inputs[i.name], _ORT_TYPES.get(i.type)) for i in model_inputs}
    parts = []
    for start in range(0, count, step):
        feeds = {name: a[start : start + step] for name, a in arrays.items()}
        real = len(next(iter(feeds.values())))
        if fixed and real < step:  # fixed batch: pad the tail with copies of the last sample
            feeds = {
                n: np.concatenate([a, np.repeat(a[-1:], step - real, 0)]) for n, a in feeds.items()
            }
        parts.append(sess.run([out_name], feeds)[0][:real])
    return np.concatenate(parts) if parts else np.empty((0,), np.float32)


def predict(
    model: onnx.ModelProto | str | Path,
    images: np.ndarray,
    batch_size: int = 256,
    optimize: bool = False,
) -> np.ndarray:
    """Class scores (N x classes) of a single-input classifier on ``images`` (N x ...)."""
    sess = session(model, optimize=optimize)
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise UserInputError(
            f"a classifier with one input was expected; the model takes {[i.name for i in inputs]}"
        )
    return run_batched(sess, {inputs[0].name: images}, batch_size=batch_size)


def accuracy(
    model: onnx.ModelProto | str | Path,
    dataset: Dataset,
    batch_size: int = 256,
    optimize: bool = False,
) -> AccuracyResult:
    """Top-1 accuracy of a single-input, single-output classifier on ``dataset``.

    Args:
        model: the classifier (logits or probabilities, N x classes).
        dataset: images and labels (see :mod:`edgecc.datasets`).
        batch_size: samples per ONNX Runtime run.
        optimize: enable ONNX Runtime's graph optimisations (see the module docstring).
    """
    scores = predict(model, dataset.images, batch_size=batch_size, optimize=optimize)
    if scores.ndim != 2 or scores.shape[0] != len(dataset):
        raise UserInputError(
            f"classifier output has shape {scores.shape}; expected ({len(dataset)}, classes)"
        )
    correct = int(np.sum(np.argmax(scores, axis=1) == dataset.labels))
    result = AccuracyResult(correct, len(dataset), dataset.name)
    logger.info("accuracy on %s: %.2f%%", dataset.name, 100 * result.accuracy)
    return result


def sentence_embeddings(
    model: onnx.ModelProto | str | Path,
    feeds: Mapping[str, np.ndarray],
    output: str | int = 0,
    mask_input: str = "attention_mask",
    optimize: bool = False,
) -> np.ndarray:
    """Mean-pooled sentence embeddings of a transformer encoder's token output.

    Args:
        model: the encoder, whose ``output`` is token embeddings (N x T x D).
        feeds: tokenizer output as numpy arrays (``input_ids``, ``attention_mask``, ...); inputs
            the model does not take are ignored.
        output: the token-embedding output, by name or index.
        mask_input: the feed holding the attention mask used for pooling.
        optimize: enable ONNX Runtime's graph optimisations.
    """
    if mask_input not in feeds:
        raise UserInputError(f"feeds lack the attention mask {mask_input!r}")
    sess = session(model, optimize=optimize)
    wanted = {i.name for i in sess.get_inputs()}
    tokens = run_batched(sess, {k: v for k, v in feeds.items() if k in wanted}, output=output)
    return mean_pool(tokens, feeds[mask_input])
