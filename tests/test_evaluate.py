"""Accuracy and embedding helpers on hand-built ONNX graphs with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc import evaluation as evaluate
from edgecc.datasets import Dataset
from edgecc.errors import UserInputError


def linear_classifier(weight: np.ndarray, batch: int | str = "N") -> onnx.ModelProto:
    """Flatten N x 1 x 2 x 2 images and multiply by ``weight`` (4 x classes)."""
    g = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["f"]),
            helper.make_node("MatMul", ["f", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def dataset(count: int = 7) -> Dataset:
    """Each image is one-hot in pixel ``label`` (4 classes), so the identity classifier is right."""
    labels = np.arange(count) % 4
    images = np.zeros((count, 1, 2, 2), np.float32)
    images.reshape(count, 4)[np.arange(count), labels] = 1.0
    return Dataset(images, labels.astype(np.int64), ("a", "b", "c", "d"), "onehot")


@pytest.mark.parametrize("batch", ["N", 1, 3])
@pytest.mark.parametrize("batch_size", [2, 256])
def test_accuracy_dynamic_and_fixed_batch(batch: int | str, batch_size: int) -> None:
    ds = dataset(7)  # 7 is not a multiple of the fixed batch 3: the tail is padded
    perfect = evaluate.accuracy(linear_classifier(np.eye(4), batch), ds, batch_size=batch_size)
    assert (perfect.correct, perfect.total, perfect.accuracy) == (7, 7, 1.0)
    # Swapping classes 0 and 1 makes every sample of those classes wrong: labels 0,1,0,1 -> 4.
    swapped = np.eye(4)[[1, 0, 2, 3]]
    wrong = evaluate.accuracy(linear_classifier(swapped, batch), ds, batch_size=batch_size)
    assert wrong.correct == 3 and wrong.as_dict()["accuracy_pct"] == pytest.approx(42.86)


def test_accuracy_from_path(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(linear_classifier(np.eye(4)), str(path))
    assert evaluate.accuracy(path, dataset(4)).accuracy == 1.0
    with pytest.raises(UserInputError, match="not found"):
        evaluate.accuracy(tmp_path / "missing.onnx", dataset(4))


def test_run_batched_input_errors() -> None:
    sess = evaluate.session(linear_classifier(np.eye(4)))
    with pytest.raises(UserInputError, match="missing model inputs"):
        evaluate.run_batched(sess, {"z": np.zeros((1, 1, 2, 2))})
    with pytest.raises(UserInputError, match="unknown output"):
        evaluate.run_batched(sess, {"x": np.zeros((1, 1, 2, 2))}, output="nope")


def test_mean_pool_ignores_masked_tokens() -> None:
    tokens = np.array([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])  # 1 sentence, 3 tokens, D=2
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(evaluate.mean_pool(tokens, mask), [[2.0, 1.0]])


def test_embedding_cosines() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(evaluate.embedding_cosines(a, b), [1.0, -1.0])
    with pytest.raises(ValueError, match="shapes differ"):
        evaluate.embedding_cosines(a, b[:1])


def test_sentence_embeddings_pool_model_output() -> None:
    # Identity "encoder": token embeddings are the input itself.
    g = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["tokens"])],
        "g",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", "T", 2])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", "T", 2])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {
        "h": np.array([[[1.0, 1.0], [3.0, 3.0]], [[2.0, 0.0], [9.0, 9.0]]], np.float32),
        "attention_mask": np.array([[1, 1], [1, 0]]),
    }
    emb = evaluate.sentence_embeddings(model, feeds)
    np.testing.assert_allclose(emb, [[2.0, 2.0], [2.0, 0.0]])
    with pytest.raises(UserInputError, match="attention mask"):
        evaluate.sentence_embeddings(model, {"h": feeds["h"]})
