"""Gradual pruning: the cubic schedule, the pipeline expansion, cumulative prune targets and
sparsity kept through distill."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from edgecc.errors import UserInputError
from edgecc.passes.gradual import cubic_schedule, expand_gradual, split_epochs
from edgecc.passes.manager import PassContext, PassManager, format_pipeline, parse_pipeline
from tests.models import onnx_model, tensor


def test_cubic_schedule_values() -> None:
    """s_t = s (1 - (1 - t/N)^3) (Zhu & Gupta 2017)."""
    assert cubic_schedule(0.5, 4) == pytest.approx([0.2890625, 0.4375, 0.4921875, 0.5])
    assert cubic_schedule(0.8, 1) == [0.8]
    assert split_epochs(8, 4) == [2, 2, 2, 2]
    assert split_epochs(5, 3) == [1, 2, 2]
    assert split_epochs(2, 4) == [1, 1, 1, 1]


def test_expansion_alternates_prune_and_distill() -> None:
    specs = expand_gradual(
        parse_pipeline("fold-bn,prune(ratio=0.5,steps=4,round_to=2),distill(epochs=8,lr=0.01),qdq")
    )
    assert format_pipeline(specs) == (
        "fold-bn,"
        "prune(round_to=2,ratio=0.289062,cumulative=True),distill(epochs=2,lr=0.01),"
        "prune(round_to=2,ratio=0.4375,cumulative=True),distill(epochs=2,lr=0.01),"
        "prune(round_to=2,ratio=0.492188,cumulative=True),distill(epochs=2,lr=0.01),"
        "prune(round_to=2,ratio=0.5,cumulative=True),distill(epochs=2,lr=0.01),qdq"
    )
    sparse = format_pipeline(expand_gradual(parse_pipeline("sparsify(amount=0.8,steps=2),distill")))
    assert sparse == "sparsify(amount=0.7),distill(epochs=2),sparsify(amount=0.8),distill(epochs=3)"


def test_steps_need_distill_after() -> None:
    with pytest.raises(UserInputError, match="needs a distill pass right after it"):
        PassManager(parse_pipeline("prune(ratio=0.5,steps=3),qdq"))
    with pytest.raises(UserInputError, match="steps"):
        PassManager(parse_pipeline("prune(ratio=0.5,steps=0),distill"))


def _conv_chain(channels: int = 16):
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(channels, 3, 3, 3)).astype(np.float32)
    w1 *= np.linspace(0.1, 2, channels, dtype=np.float32)[:, None, None, None]
    w2 = rng.normal(size=(4, channels, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], "c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], "relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], "c2"),
    ]
    return onnx_model(
        nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 4, 6, 6])], {"w1": w1, "w2": w2}
    )


def test_cumulative_prune_counts_original_channels() -> None:
    """Two cumulative steps land on the one-shot channel count; relative ones would not."""
    model = _conv_chain(16)
    steps = PassManager(
        parse_pipeline("prune(ratio=0.25,cumulative=true),prune(ratio=0.5,cumulative=true)")
    ).run(model)
    one_shot = PassManager(parse_pipeline("prune(ratio=0.5)")).run(model)
    relative = PassManager(parse_pipeline("prune(ratio=0.25),prune(ratio=0.5)")).run(model)
    channels = lambda m: next(  # noqa: E731
        numpy_helper.to_array(t).shape[0] for t in m.graph.initializer if t.name.startswith("w1")
    )
    assert channels(steps) == channels(one_shot) == 8
    assert channels(relative) == 6


def test_sparsity_survives_distill() -> None:
    model = _conv_chain(8)
    rng = np.random.default_rng(1)
    ctx = PassContext(train_data={"x": rng.normal(size=(32, 3, 6, 6)).astype(np.float32)})
    out = PassManager(parse_pipeline("sparsify(amount=0.6,steps=2),distill(epochs=2,batch=8)")).run(
        model, ctx
    )
    for t in out.graph.initializer:
        value = numpy_helper.to_array(t)
        if value.ndim == 4:
            assert np.mean(value == 0) == pytest.approx(0.6, abs=0.02)
