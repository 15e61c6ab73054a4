"""distill: fine-tune the graph's weights against the source model (knowledge distillation).

The teacher is the float graph the pipeline started from (``PassContext.source_model``, after
the cleanup passes fold-constants, remove-identity, eliminate-dead, which leave its function as
is); the
student is the current graph (after ``prune``, ``lowrank``, ``fold-bn``, rewrites ...). Both are
made torch modules through onnx2torch (:mod:`edgecc.train.bridge`), the student's float weights
are trained on ``PassContext.train_data`` (``--train DATA.npz``: arrays named like the inputs,
optional ``labels``) with the loss of :mod:`edgecc.train.loop`::

    loss = alpha * KL(softmax(t/T) || softmax(s/T)) T^2 + (1 - alpha) * CE(s, labels)
           + beta * mean_f ||s_f - t_f||^2 / ||t_f||^2

(without labels the soft term has weight 1; outputs other than ``(N, classes)`` logits use the
normalised MSE as the soft term), and written back into the ONNX initializers: same nodes, same
tensor names, only initializer values change. The result is checked with ONNX Runtime against
the trained torch module (max abs diff <= 1e-4 * max(1, max |output|)).

Limits: CPU only, full-precision weights only: a graph with QuantizeLinear/DequantizeLinear or
integer ops (after ``qdq``/``dynamic-quant``) is refused, and the pipeline refuses ``distill``
after those passes before anything runs; BatchNorms run with their running statistics
(eval mode); scalar constants are not trained; operators onnx2torch cannot convert are
reported as a user error. Deterministic for a given ``seed`` (default: the pipeline's).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx

from edgecc.errors import UserInputError
from edgecc.passes.manager import PassContext, PassResult, register

logger = logging.getLogger(__name__)

QUANT_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
    }
)


TEACHER_CLEANUP = "fold-constants,remove-identity,eliminate-dead"
_TEACHERS: dict[int, tuple[onnx.ModelProto, onnx.ModelProto]] = {}


def _cleaned(source: onnx.ModelProto) -> onnx.ModelProto:
    """The source model after the cleanup passes (exporter Shape/CastLike/Expand chains folded,
    which onnx2torch cannot all convert), computed once per source model."""
    from edgecc.passes.manager import PassManager, parse_pipeline

    key = id(source)
    if key not in _TEACHERS or _TEACHERS[key][0] is not source:
        _TEACHERS.clear()
        _TEACHERS[key] = (source, PassManager(parse_pipeline(TEACHER_CLEANUP)).run(source))
    return _TEACHERS[key][1]


@register("distill")
class Distill:
    """Fine-tune the float weights of the graph against the pipeline's source model.

    Args:
        epochs: passes over the training data.
        temperature: softmax temperature ``T`` of the soft labels.
        alpha: weight of the soft-label loss; ``1 - alpha`` weighs the hard labels (if given).
        beta: weight of the feature loss on matched intermediate tensors.
        lr: Adam learning rate (cosine decay to 0 over the run).
        batch: samples per step.
        features: ``auto`` (tensors entering each weight layer, same name and shape in both
            graphs), ``none``, or a list of tensor names.
        samples: use at most this many training samples (the first ones).
        threads: torch threads (fixed, for determinism). One is the default: on a busy
            2-core machine two threads ran a small CNN's steps 15x slower than one.
        seed: seed of the shuffling and of torch; None uses the pipeline's ``--seed``.
    """

    def __init__(
        self,
        epochs: int = 5,
        temperature: float = 4.0,
        alpha: float = 0.7,
        beta: float = 1.0,
        lr: float = 1e-3,
        batch: int = 64,
        features: str | Sequence[str] = "auto",
        samples: int | None = None,
        threads: int = 1,
        seed: int | None = None,
    ):
        checks = [
            (epochs >= 1, f"epochs must be >= 1, got {epochs}"),
            (temperature > 0, f"temperature must be > 0, got {temperature}"),
            (0 <= alpha <= 1, f"alpha must be in [0, 1], got {alpha}"),
            (beta >= 0, f"beta must be >= 0, got {beta}"),
            (lr > 0, f"lr must be > 0, got {lr}"),
            (batch >= 1, f"batch must be >= 1, got {batch}"),
            (samples is None or samples >= 1, f"samples must be >= 1, got {samples}"),
            (threads >= 1, f"threads must be >= 1, got {threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserInputError(f"distill: {message}")
        self.options = dict(
            epochs=epochs,
            temperature=float(temperature),
            alpha=float(alpha),
            beta=float(beta),
            lr=float(lr),
            batch=batch,
            features=features,
            samples=samples,
            threads=threads,
        )
        self.seed = seed

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        from edgecc.train.loop import DistillConfig, distill

        quantized = sorted({n.op_type for n in model.graph.node} & QUANT_OPS)
        if quantized:
            raise UserInputError(
                f"distill: the graph is quantized ({', '.join(quantized)}): quantized weights "
                "are not trained; run distill before qdq/dynamic-quant"
            )
        if ctx.train_data is None:
            raise UserInputError(
                "distill needs training data: --train DATA.npz (arrays named like the inputs, "
                "optional labels; API train_data=)"
            )
        if ctx.source_model is None:
            raise UserInputError("distill: no source model to distil from (teacher)")
        config = DistillConfig(**self.options, seed=ctx.seed if self.seed is None else self.seed)
        teacher = _cleaned(ctx.source_model)
        out, info = distill(model, teacher, ctx.train_data, config, ctx.progress)
        info["train_data"] = ctx.train_source
        return PassResult(out, True, info)
