"""Streaming evaluation metrics: top-k accuracy against labels, agreement with a float reference.

Both fold one batch at a time into running sums, so no output is kept beyond its batch.

Accuracy (``top1``, ``top5``, in percent): the scores are the model's output ``(N, C)`` (trailing
axes of size 1 are dropped); a sample counts for top-k when its label is among the ``min(k, C)``
highest scores (ties broken by index, as ``np.argsort``).

Agreement with the reference (the float source model, or ``--reference``), per sample ``i`` with
``y`` the model's output and ``r`` the reference's, both flattened to vectors:

- ``cosine`` = mean over samples of ``<y_i, r_i> / (|y_i| |r_i|)``; ``cosine_min`` the minimum;
- ``max_abs_error`` = ``max |y - r|`` over every element;
- ``top1`` = percentage of rows whose arg-max over the last axis agrees (per sample for ``(N, C)``
  logits, per token for ``(N, T, C)``).

Sentence embeddings: when the output is ``(N, T, D)`` and the model has an ``attention_mask``
input, ``y`` and ``r`` are mean-pooled over tokens with the mask first
(``e = sum_t m_t h_t / max(sum_t m_t, 1e-9)``, as sentence-transformers does for
all-MiniLM-L6-v2), so the cosine is the sentence-embedding cosine (``pooled: true``).

The scalar a metric ranks and budgets with (:func:`score`): ``top1`` / ``top5`` in percent, or
``agreement``: the mean cosine (1 for a model identical to its reference).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgecc.errors import UserInputError

METRICS = ("top1", "top5", "agreement")
MASK_INPUT = "attention_mask"


def mean_pool(token_embeddings: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: token embeddings (N x T x D) averaged over unmasked tokens (N x D)."""
    mask = np.asarray(attention_mask, np.float64)[..., None]
    summed = np.sum(np.asarray(token_embeddings, np.float64) * mask, axis=1)
    return summed / np.maximum(mask.sum(axis=1), 1e-9)


def embedding_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two N x D matrices (N values)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape:
        raise ValueError(f"embedding shapes differ: {a64.shape} vs {b64.shape}")
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.sum(a64 * b64, axis=1) / np.maximum(norms, 1e-30)


def _scores(out: np.ndarray) -> np.ndarray:
    while out.ndim > 2 and out.shape[-1] == 1:
        out = out[..., 0]
    if out.ndim != 2:
        raise UserInputError(
            f"top-k accuracy needs class scores (N, classes); the output has shape "
            f"{list(out.shape)}: use --metric agreement"
        )
    return out


class TopK:
    """Running top-1 and top-5 counts."""

    def __init__(self) -> None:
        self.samples = self.top1 = self.top5 = 0

    def update(self, out: np.ndarray, labels: np.ndarray) -> None:
        scores = _scores(np.asarray(out))
        classes = scores.shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise UserInputError(
                f"labels run from {labels.min()} to {labels.max()} but the model gives "
                f"{classes} class scores"
            )
        k = min(5, classes)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        hit = top == labels[:, None]
        self.top1 += int(hit[:, 0].sum())
        self.top5 += int(hit.any(axis=1).sum())
        self.samples += len(labels)

    def result(self) -> dict[str, float]:
        n = max(self.samples, 1)
        return {"top1": 100.0 * self.top1 / n, "top5": 100.0 * self.top5 / n}


class Agreement:
    """Running agreement of outputs with reference outputs (see the module docstring)."""

    def __init__(self) -> None:
        self.samples = self.rows = self.same = 0
        self.cos_sum, self.cos_min, self.max_err = 0.0, float("inf"), 0.0
        self.pooled = False

    def update(
        self, out: np.ndarray, ref: np.ndarray, feeds: Mapping[str, np.ndarray] | None = None
    ) -> None:
        out, ref = np.asarray(out), np.asarray(ref)
        if out.shape != ref.shape:
            raise UserInputError(
                f"output shape {list(out.shape)} differs from the reference's {list(ref.shape)}"
            )
        self.max_err = max(self.max_err, float(np.max(np.abs(out.astype(np.float64) - ref))))
        if out.ndim >= 2:
            a, b = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
            self.same += int(np.sum(a.argmax(1) == b.argmax(1)))
            self.rows += len(a)
        if out.ndim == 3 and feeds is not None and MASK_INPUT in feeds:
            out, ref = mean_pool(out, feeds[MASK_INPUT]), mean_pool(ref, feeds[MASK_INPUT])
            self.pooled = True
        cos = embedding_cosines(out.reshape(len(out), -1), ref.reshape(len(ref), -1))
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min())) if cos.size else self.cos_min
        self.samples += len(cos)

    def result(self) -> dict[str, Any]:
        return {
            "cosine": self.cos_sum / max(self.samples, 1),
            "cosine_min": self.cos_min if self.samples else 1.0,
            "max_abs_error": self.max_err,
            "top1": 100.0 * self.same / self.rows if self.rows else None,
            "pooled": self.pooled,
        }


def score(result: Mapping[str, Any], metric: str) -> float:
    """The scalar of ``metric`` in an evaluation result (see the module docstring)."""
    if metric == "agreement":
        return float(result["agreement"]["cosine"])
    return float(result[metric])
