"""Gradual pruning: ``prune(..., steps=N)`` / ``sparsify(..., steps=N)`` followed by ``distill``.

Pipeline semantics. A ``prune`` or ``sparsify`` entry with ``steps=N > 1`` must be followed
directly by a ``distill`` entry; the pass manager expands the pair into ``N`` alternating steps
before anything runs::

    prune(ratio=0.5,steps=4),distill(epochs=8)
    -> prune(ratio=0.289062,cumulative=true),distill(epochs=2),
       prune(ratio=0.4375,cumulative=true),distill(epochs=2),
       prune(ratio=0.492188,cumulative=true),distill(epochs=2),
       prune(ratio=0.5,cumulative=true),distill(epochs=2)

The targets follow the cubic schedule of Zhu & Gupta (2017, "To prune, or not to prune")::

    s_t = s * (1 - (1 - t / N)^3),   t = 1..N

which prunes fast while the network is redundant and slowly near the end. Every step prunes to
the cumulative target: ``prune(cumulative=true)`` counts its ratio against the channels the
graph had before the first prune (recorded in the model's metadata), ``sparsify`` already counts
zeros left by earlier steps, and ``distill`` keeps zeroed weights at zero. The distill epochs are
split over the steps (``epochs // N`` each, the remainder to the last steps; at least one). The
other options of both entries are kept on every step. ``steps=1`` (the default) is the plain
one-shot pass. A ``distill`` after ``qdq``/``dynamic-quant`` is refused here too: quantized
weights are not trained.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgecc.errors import UserInputError
from edgecc.passes.manager import PassSpec

GRADUAL = {"prune": "ratio", "sparsify": "amount"}
DEFAULTS = {"ratio": 0.3, "amount": 0.5}
QUANTIZING = ("qdq", "dynamic-quant")


def cubic_schedule(final: float, steps: int) -> list[float]:
    """The targets ``s_t = final * (1 - (1 - t/steps)^3)`` for ``t = 1..steps``."""
    if steps < 1:
        raise UserInputError(f"steps must be >= 1, got {steps}")
    return [final * (1 - (1 - t / steps) ** 3) for t in range(1, steps + 1)]


def split_epochs(epochs: int, steps: int) -> list[int]:
    """``epochs`` spread over ``steps`` (remainder to the last ones), at least one each."""
    base, extra = divmod(epochs, steps)
    return [max(1, base + (1 if t >= steps - extra else 0)) for t in range(steps)]


def expand_gradual(specs: Sequence[PassSpec]) -> list[PassSpec]:
    """The pipeline with every ``prune/sparsify(steps=N)`` + ``distill`` pair expanded."""
    specs = list(specs)
    _check_order(specs)
    out: list[PassSpec] = []
    i = 0
    while i < len(specs):
        spec = specs[i]
        opts = dict(spec.options)
        steps = opts.get("steps", 1)
        if spec.name not in GRADUAL or steps == 1:
            out.append(spec)
            i += 1
            continue
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise UserInputError(f"{spec.name}: option steps={steps!r} must be an integer >= 1")
        if i + 1 >= len(specs) or specs[i + 1].name != "distill":
            key = GRADUAL[spec.name]
            raise UserInputError(
                f"{spec.text()}: steps={steps} needs a distill pass right after it, e.g. "
                f"{spec.name}({key}={opts.get(key, DEFAULTS[key])},steps={steps}),distill(epochs=8)"
            )
        distill = dict(specs[i + 1].options)
        key = GRADUAL[spec.name]
        targets = cubic_schedule(float(opts.get(key, DEFAULTS[key])), steps)
        epochs = split_epochs(int(distill.get("epochs", 5)), steps)
        rest = {k: v for k, v in opts.items() if k not in ("steps", key, "cumulative")}
        for target, ep in zip(targets, epochs, strict=True):
            step = {**rest, key: round(target, 6)}
            if spec.name == "prune":
                step["cumulative"] = True
            out.append(PassSpec(spec.name, tuple(step.items())))
            out.append(PassSpec("distill", tuple({**distill, "epochs": ep}.items())))
        i += 2
    return out


def _check_order(specs: Sequence[PassSpec]) -> None:
    """Refuse ``distill`` after a quantizing pass."""
    quantized = None
    for spec in specs:
        if spec.name in QUANTIZING:
            quantized = quantized or spec.name
        elif spec.name == "distill" and quantized:
            raise UserInputError(
                f"distill after {quantized}: quantized weights are not trained; put distill "
                f"before {quantized} (e.g. fold-bn,prune(ratio=0.5),distill,qdq)"
            )
