"""Evaluation: labelled data, metrics, batched runners, per-layer sensitivity, accuracy budgets.

``edgecc.evaluate(model, data)`` (:func:`edgecc.evaluation.core.evaluate`) serves ``edgecc eval``;
:func:`edgecc.evaluation.sensitivity.sensitivity` serves ``edgecc sensitivity``;
:mod:`edgecc.evaluation.budget` serves ``edgecc compile --max-drop``. The ONNX Runtime helpers
(:mod:`edgecc.evaluation.ort`) keep the fixed-dataset API the scripts used before.
"""

from edgecc.evaluation.core import evaluate
from edgecc.evaluation.metrics import embedding_cosines, mean_pool
from edgecc.evaluation.ort import (
    AccuracyResult,
    accuracy,
    predict,
    run_batched,
    sentence_embeddings,
    session,
)

__all__ = [
    "AccuracyResult",
    "accuracy",
    "embedding_cosines",
    "evaluate",
    "mean_pool",
    "predict",
    "run_batched",
    "sentence_embeddings",
    "session",
]
