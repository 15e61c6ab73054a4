"""Exported graphs match their torch reference; probes are deterministic and sensibly bounded.

Tolerance: ONNX Runtime (optimisations off) on the exported graph vs the torch reference, max
abs diff <= 1e-4 on every output (measured: ~1e-7 for the small nets, ~2e-6 for MiniLM).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from edgecc.frontend import LoadedModel, load_model, parse_input_spec
from edgecc.report.compare import run_onnx
from tests.models import MODELS, load_minilm, make_model

TOL = 1e-4


def _assert_reference_matches_ort(lm: LoadedModel) -> None:
    ort = run_onnx(lm.model, lm.probe_inputs)
    assert list(ort) == lm.output_names
    for name in lm.output_names:
        assert ort[name].shape == lm.reference_outputs[name].shape
        np.testing.assert_allclose(ort[name], lm.reference_outputs[name], rtol=0, atol=TOL)
    assert lm.export_check is not None and lm.export_check["max_abs_diff"] <= TOL


@pytest.mark.parametrize("name", sorted(MODELS))
def test_architecture_export_matches_torch(name: str) -> None:
    model = make_model(name)
    lm = load_model(model, example_inputs=model.example_inputs())
    _assert_reference_matches_ort(lm)
    with torch.no_grad():
        expected = model(*(torch.from_numpy(lm.probe_inputs[s.name]) for s in lm.inputs))
    np.testing.assert_allclose(lm.reference_outputs["output"], expected.numpy(), rtol=0, atol=0)
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert Counter(n.op_type for n in lm.model.graph.node)["BatchNormalization"] == batchnorms


@pytest.fixture(scope="module")
def minilm() -> LoadedModel:
    model, example = load_minilm()
    return load_model(model, example_inputs=example)


def test_minilm_export_matches_torch(minilm: LoadedModel) -> None:
    assert [s.name for s in minilm.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(s.shape == (1, 16) and s.dtype == "int64" for s in minilm.inputs)
    assert minilm.output_names == ["last_hidden_state", "pooler_output"]
    assert minilm.reference_outputs["last_hidden_state"].shape == (1, 16, 384)
    _assert_reference_matches_ort(minilm)


def test_minilm_probe_is_valid_text(minilm: LoadedModel) -> None:
    probe = minilm.probe_inputs
    assert probe["input_ids"].min() >= 0 and probe["input_ids"].max() < 1000
    assert (probe["attention_mask"] == 1).all()
    assert set(np.unique(probe["token_type_ids"])) <= {0, 1}  # the token-type table has 2 rows


def test_tiny_transformer_ids_stay_in_its_vocabulary() -> None:
    model = make_model("tiny_transformer", vocab=37)
    lm = load_model(model, input_specs=[parse_input_spec(model.input_spec())])  # no example
    assert lm.inputs[0].dtype == "int64"
    ids = lm.probe_inputs["input_ids"]
    assert ids.max() < 37 and len(np.unique(ids)) > 5


def test_probe_is_deterministic() -> None:
    model = make_model("fashion_cnn")
    a = load_model(model, example_inputs=model.example_inputs(), seed=3)
    b = load_model(model, example_inputs=model.example_inputs(), seed=3)
    c = load_model(model, example_inputs=model.example_inputs(), seed=4)
    np.testing.assert_array_equal(a.probe_inputs["x"], b.probe_inputs["x"])
    np.testing.assert_array_equal(a.reference_outputs["output"], b.reference_outputs["output"])
    assert not np.array_equal(a.probe_inputs["x"], c.probe_inputs["x"])
    expected = np.random.default_rng(3).standard_normal((1, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(a.probe_inputs["x"], expected)  # documented distribution
    assert a.model.SerializeToString() == b.model.SerializeToString()  # same export, same bytes
