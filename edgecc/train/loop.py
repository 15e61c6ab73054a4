"""The distillation loop: fine-tune a student graph's weights against a teacher graph.

Loss per batch, with student outputs ``s``, teacher outputs ``t`` and temperature ``T``::

    soft  = KL(softmax(t / T) || softmax(s / T)) * T^2      outputs of shape (N, classes)
          = mean((s - t)^2) / mean(t^2)                     any other output (embeddings)
    hard  = cross_entropy(s, labels)                          when the data has ``labels``
    feat  = mean over matched tensors f of mean((s_f - t_f)^2) / mean(t_f^2)
    loss  = alpha * soft + (1 - alpha) * hard + beta * feat   (without labels: soft + beta*feat)

The ``T^2`` factor keeps the soft-label gradients on the scale of the hard ones (Hinton et al.
2015). Features are normalised by the teacher's mean square so every tensor weighs alike.

Matched tensors (``features="auto"``): tensors with the same name in both graphs (the passes
keep tensor names) and the same shape on the first batch, that feed a Conv/ConvTranspose/Gemm/
MatMul node of the student (the activations entering each weight layer), neither graph inputs
nor outputs. Pruned channels change shapes, so those tensors drop out; explicit names may be
given instead, or ``"none"``.

Adam with a cosine-decaying learning rate over all steps; samples are shuffled by a NumPy
generator seeded with ``seed`` and torch runs with ``torch.manual_seed(seed)``, deterministic
algorithms and a fixed thread count, so the same seed gives the same weights. Weights of two
or more dimensions that hold exact zeros (``sparsify``) keep those entries at zero.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from edgecc.errors import UserInputError
from edgecc.train.bridge import TorchGraph, check_write_back

logger = logging.getLogger(__name__)

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
LABELS = "labels"
WRITE_BACK_TOLERANCE = 1e-4


@dataclass
class DistillConfig:
    """Options of one distillation run (the ``distill`` pass's options)."""

    epochs: int = 5
    temperature: float = 4.0
    alpha: float = 0.7
    beta: float = 1.0
    lr: float = 1e-3
    batch: int = 64
    features: str | Sequence[str] = "auto"
    samples: int | None = None
    threads: int = 1
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    """Seeded torch with deterministic algorithms and ``threads`` threads, restored after."""
    import torch

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def split_data(
    data: Mapping[str, np.ndarray], input_names: Sequence[str], limit: int | None
) -> tuple[dict[str, np.ndarray], np.ndarray | None, int]:
    """Inputs by name, labels (or None) and the sample count; refuses missing or ragged arrays."""
    missing = [n for n in input_names if n not in data]
    if missing:
        raise UserInputError(
            f"training data lacks inputs {missing}; the graph takes {list(input_names)} "
            f"(the data has {sorted(data)})"
        )
    arrays = {n: np.asarray(data[n]) for n in input_names}
    labels = np.asarray(data[LABELS]).astype(np.int64) if LABELS in data else None
    counts = {len(a) for a in arrays.values()} | ({len(labels)} if labels is not None else set())
    if len(counts) != 1:
        raise UserInputError(f"training arrays disagree on the number of samples: {counts}")
    (count,) = counts
    if limit is not None:
        count = min(count, limit)
    return arrays, labels, count


def feature_names(
    student: onnx.ModelProto,
    s_graph: TorchGraph,
    t_graph: TorchGraph,
    features: str | Sequence[str],
) -> list[str]:
    """Candidate tensors for feature distillation (shapes are checked on the first batch)."""
    if features == "none":
        return []
    common = set(s_graph.outputs) & set(t_graph.outputs)
    if features != "auto":
        names = [features] if isinstance(features, str) else list(features)
        unknown = [n for n in names if n not in common]
        if unknown:
            raise UserInputError(
                f"distill: features {unknown} are not single-output tensors of both graphs"
            )
        return names
    ends = {i.name for i in student.graph.input} | {o.name for o in student.graph.output}
    inits = {t.name for t in student.graph.initializer}
    seen: list[str] = []
    for node in student.graph.node:  # weight ops whose weight is constant
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in inits:
            name = node.input[0]
            if name in common and name not in ends and name not in seen:
                seen.append(name)
    return seen


def _shapes_agree(s: Any, t: Any) -> bool:
    return tuple(s.shape) == tuple(t.shape)


def distill(
    student: onnx.ModelProto,
    teacher: onnx.ModelProto,
    data: Mapping[str, np.ndarray],
    config: DistillConfig,
    progress: Callable[[str], None] | None = None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Fine-tune ``student``'s weights against ``teacher`` on ``data``; returns the new graph.

    The returned graph is ``student`` with its trainable initializers replaced (same nodes,
    same names), checked against the trained torch module with ONNX Runtime on a few training
    samples (max abs diff within ``1e-4 * max(1, max |output|)``).
    """
    import torch
    import torch.nn.functional as F

    say = progress or (lambda msg: logger.info("%s", msg))
    with deterministic_torch(config.seed, config.threads):
        s_graph = TorchGraph(student, trainable=True)
        t_graph = TorchGraph(teacher, trainable=False)
        arrays, labels, count = split_data(data, s_graph.input_names, config.samples)
        if count == 0:
            raise UserInputError("distill: the training data has no samples")
        dtypes = {
            i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            for i in student.graph.input
        }
        arrays = {k: v.astype(dtypes.get(k, v.dtype), copy=False) for k, v in arrays.items()}
        batch = config.batch
        if _fixed_batch(student) != 1 or not _batches(student, s_graph, arrays, count):
            batch = _fixed_batch(student)
            logger.warning(
                "distill: the graph does not run with a free batch (its Reshapes fix it): "
                "training in its own batches of %d, dropping the last %d samples",
                batch,
                count % batch,
            )
            s_graph = TorchGraph(student, trainable=True, batched=False)
            t_graph = TorchGraph(teacher, trainable=False, batched=False)
            count -= count % batch
            if count == 0:
                raise UserInputError(f"distill: fewer training samples than the batch {batch}")
        names = feature_names(student, s_graph, t_graph, config.features)
        params = s_graph.parameters()
        if not params:
            raise UserInputError("distill: the graph has no trainable float weights")
        # zeros of sparsified weights (2-D and up) stay zero: gradual sparsity must survive
        masks = [(p, p.detach() != 0) for p in params if p.dim() >= 2 and bool((p == 0).any())]
        opt = torch.optim.Adam(params, lr=config.lr)
        steps_per_epoch = math.ceil(count / batch)
        total = steps_per_epoch * config.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
        rng = np.random.default_rng(config.seed)
        history: list[float] = []
        matched: list[str] | None = None
        for epoch in range(config.epochs):
            order = rng.permutation(count)
            running, seen = 0.0, 0
            for start in range(0, count, batch):
                idx = np.sort(order[start : start + batch])
                feeds = {k: torch.from_numpy(v[idx]) for k, v in arrays.items()}
                with torch.no_grad(), t_graph.capture(names) as t_feats:
                    t_out = t_graph(feeds)
                with s_graph.capture(names) as s_feats:
                    s_out = s_graph(feeds)
                if matched is None:
                    matched = [n for n in names if _shapes_agree(s_feats[n], t_feats[n])]
                    logger.info("distill: %d matched feature tensors: %s", len(matched), matched)
                soft = _soft_loss(s_out, t_out, config.temperature)
                loss = soft
                if labels is not None and s_out.dim() == 2:
                    hard = F.cross_entropy(s_out, torch.from_numpy(labels[idx]))
                    loss = config.alpha * soft + (1 - config.alpha) * hard
                if matched and config.beta:
                    feat = sum(_normalised_mse(s_feats[n], t_feats[n]) for n in matched)
                    loss = loss + config.beta * feat / len(matched)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    for p, mask in masks:
                        p.mul_(mask)
                running += float(loss.detach()) * len(idx)
                seen += len(idx)
            history.append(running / seen)
            say(f"distill: epoch {epoch + 1}/{config.epochs} loss {history[-1]:.4f}")
        out = s_graph.write_back(student)
        probe = {k: v[: _fixed_batch(student)] for k, v in arrays.items()}
        s_graph.module.eval()
        diff = check_write_back(out, s_graph, probe, WRITE_BACK_TOLERANCE)
    info = {
        "epochs": config.epochs,
        "samples": count,
        "labels": labels is not None,
        "loss_per_epoch": history,
        "features": matched or [],
        "trained_tensors": len(params),
        "trained_parameters": int(sum(p.numel() for p in params)),
        "sparse_tensors_kept": len(masks),
        "write_back_max_abs_diff": diff,
    }
    return out, info


def _batches(
    model: onnx.ModelProto, graph: TorchGraph, arrays: Mapping[str, np.ndarray], count: int
) -> bool:
    """True when the batch-free module on two samples matches ORT run on each one (for graphs
    exported with batch 1)."""
    import torch

    from edgecc.report.compare import run_onnx

    n = min(2, count)
    try:
        with torch.no_grad():
            got = graph({k: torch.from_numpy(v[:n]) for k, v in arrays.items()}).numpy()
    except Exception as err:  # any failure of the rewritten reshapes means "not batchable"
        logger.info("distill: batched run failed: %s", err)
        return False
    out = model.graph.output[0].name
    for i in range(n):
        want = run_onnx(model, {k: v[i : i + 1] for k, v in arrays.items()})[out]
        if got[i : i + 1].shape != want.shape or not np.allclose(got[i : i + 1], want, atol=1e-4):
            return False
    return True


def _fixed_batch(model: onnx.ModelProto) -> int:
    """The first dimension of the first graph input (1 when it is symbolic)."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else 1


def _soft_loss(s: Any, t: Any, temperature: float) -> Any:
    import torch.nn.functional as F

    if s.dim() == 2:
        log_p = F.log_softmax(s / temperature, dim=1)
        q = F.softmax(t / temperature, dim=1)
        return F.kl_div(log_p, q, reduction="batchmean") * temperature**2
    return _normalised_mse(s, t)


def _normalised_mse(s: Any, t: Any) -> Any:
    return ((s - t) ** 2).mean() / ((t**2).mean() + 1e-8)
