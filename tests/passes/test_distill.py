"""distill: accuracy recovered after pruning, write-back vs ONNX Runtime, determinism, errors.

A small MLP trained on scikit-learn's digits in the fixture (a second or two); the pruned net
loses accuracy and distillation must win a stated amount of it back with a fixed seed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from edgecc.errors import UserInputError
from edgecc.passes.manager import PassContext, PassManager, parse_pipeline
from edgecc.report.compare import run_onnx

CLEAN = "fold-constants,remove-identity,eliminate-dead"


@pytest.fixture(scope="module")
def digits() -> dict:
    """A trained 64-48-10 MLP as ONNX, training and held-out digits."""
    d = load_digits()
    x = (d.data / 16).astype(np.float32)
    y = d.target.astype(np.int64)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # two threads on the shared 2-core machine are much slower
    net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xt, yt = torch.from_numpy(x[:1200]), torch.from_numpy(y[:1200])
    for _ in range(60):  # full-batch steps: ~0.2 s
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    model = mlp_onnx(net)
    name = "x"
    return {
        "model": model,
        "train": {name: x[:1200], "labels": y[:1200]},
        "test": (x[1200:], y[1200:]),
        "input": name,
    }


def mlp_onnx(net: nn.Sequential) -> onnx.ModelProto:
    """The MLP as a hand-built ONNX graph (Gemm, Relu, Gemm; batch 1, as exporters fix it)."""
    from onnx import helper

    from tests.models import onnx_model, tensor

    w = {f"{k}": v.detach().numpy() for k, v in net.state_dict().items()}
    nodes = [
        helper.make_node("Gemm", ["x", "0.weight", "0.bias"], ["h"], "fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], "relu"),
        helper.make_node("Gemm", ["r", "2.weight", "2.bias"], ["logits"], "fc2", transB=1),
    ]
    return onnx_model(nodes, [tensor("x", [1, 64])], [tensor("logits", [1, 10])], w)


def accuracy(model: onnx.ModelProto, data: tuple, name: str) -> float:
    """Top-1 with ONNX Runtime (optimisations off), one session, sample by sample."""
    from edgecc.evaluation import run_batched, session

    x, y = data
    return float(np.mean(run_batched(session(model), {name: x}).argmax(1) == y))


def run(model: onnx.ModelProto, pipeline: str, train: dict | None, seed: int = 0):
    ctx = PassContext(train_data=train, seed=seed)
    manager = PassManager(parse_pipeline(f"{CLEAN},{pipeline}"))
    return manager.run(model, ctx), manager


def test_distill_recovers_pruned_accuracy(digits: dict) -> None:
    base = accuracy(digits["model"], digits["test"], digits["input"])
    pruned, _ = run(digits["model"], "prune(ratio=0.85)", None)
    healed, manager = run(
        digits["model"], "prune(ratio=0.85),distill(epochs=4,lr=0.01)", digits["train"]
    )
    acc_pruned = accuracy(pruned, digits["test"], digits["input"])
    acc_healed = accuracy(healed, digits["test"], digits["input"])
    assert base > 0.9
    assert acc_pruned < base - 0.05  # pruning alone costs accuracy
    assert acc_healed >= acc_pruned + 0.05  # a concrete recovery (seed 0)
    info = manager.records[-1].info
    assert manager.records[-1].modified
    assert len(info["loss_per_epoch"]) == 4
    assert info["loss_per_epoch"][-1] < info["loss_per_epoch"][0]
    assert info["write_back_max_abs_diff"] <= 1e-4
    # same nodes and tensor names: only initializer values changed
    assert [n.output for n in healed.graph.node] == [n.output for n in pruned.graph.node]


def test_write_back_matches_onnx_runtime(digits: dict) -> None:
    """The written-back graph run by ORT equals the trained torch module (1e-5 relative)."""
    from edgecc.train.bridge import TorchGraph

    healed, _ = run(digits["model"], "prune(ratio=0.5),distill(epochs=1)", digits["train"])
    module = TorchGraph(healed, trainable=False)
    x = digits["test"][0][:8]
    with torch.no_grad():
        torch_out = module({digits["input"]: torch.from_numpy(x)}).numpy()
    out = healed.graph.output[0].name
    ort = np.concatenate([run_onnx(healed, {digits["input"]: x[i : i + 1]})[out] for i in range(8)])
    assert np.max(np.abs(ort - torch_out)) <= 1e-5 * max(1.0, np.abs(torch_out).max())


def test_same_seed_same_bytes(digits: dict) -> None:
    pipeline = "prune(ratio=0.5),distill(epochs=1,batch=128)"
    a, _ = run(digits["model"], pipeline, digits["train"], seed=3)
    b, _ = run(digits["model"], pipeline, digits["train"], seed=3)
    c, _ = run(digits["model"], pipeline, digits["train"], seed=4)
    weights = lambda m: b"".join(t.SerializeToString() for t in m.graph.initializer)  # noqa: E731
    assert weights(a) == weights(b)
    assert weights(a) != weights(c)


def test_features_are_matched_by_name_and_shape(digits: dict) -> None:
    """After lowrank the hidden activation keeps its name and shape: it is a matched feature."""
    _, manager = run(digits["model"], "lowrank(rank=4),distill(epochs=1)", digits["train"])
    assert manager.records[-1].info["features"]  # the ReLU output entering the second layer
    _, manager = run(digits["model"], "prune(ratio=0.5),distill(epochs=1)", digits["train"])
    assert manager.records[-1].info["features"] == []  # its channels were pruned: shape differs


def test_needs_training_data(digits: dict) -> None:
    with pytest.raises(UserInputError, match="needs training data"):
        run(digits["model"], "distill", None)


def test_training_data_must_name_the_inputs(digits: dict) -> None:
    with pytest.raises(UserInputError, match="lacks inputs"):
        run(digits["model"], "distill", {"nope": digits["train"][digits["input"]]})


def test_refused_after_quantization(digits: dict) -> None:
    with pytest.raises(UserInputError, match="distill after qdq"):
        PassManager(parse_pipeline("qdq,distill"))
    quantized, _ = run(digits["model"], "dynamic-quant", None)
    from edgecc.passes.distill import Distill

    ctx = PassContext(train_data=digits["train"], source_model=digits["model"])
    with pytest.raises(UserInputError, match="quantized"):
        Distill()(quantized, ctx)


@pytest.mark.parametrize(
    "text", ["distill(epochs=0)", "distill(alpha=2)", "distill(temperature=0)", "distill(batch=0)"]
)
def test_option_ranges(text: str) -> None:
    with pytest.raises(UserInputError, match="distill"):
        PassManager(parse_pipeline(text))


def test_cli_train_option_errors(
    digits: dict, tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    """``compile --passes distill`` without ``--train``, or with a non-.npz file: exit 2."""
    from edgecc.cli import main

    model = tmp_path / "mlp.onnx"
    onnx.save(digits["model"], str(model))
    base = ["-q", "compile", str(model), "-o", str(tmp_path / "pkg"), "--passes", "distill"]
    assert main(base) == 2
    assert "distill needs training data: --train" in capsys.readouterr().err
    (tmp_path / "data.txt").write_text("x")
    assert main([*base, "--train", str(tmp_path / "data.txt")]) == 2
    assert "expected an .npz" in capsys.readouterr().err
    assert not (tmp_path / "pkg").exists()


def test_cli_compiles_a_distilled_package(digits: dict, tmp_path) -> None:
    """``edgecc compile --passes 'prune(ratio=0.5),distill(epochs=2)' --train D.npz`` end to end
    through TVM: the package carries the trained weights (its ONNX differs from the pruned one),
    recovers accuracy over pruning alone, and its library matches ONNX Runtime (--check)."""
    import json

    from edgecc.cli import main

    model, train = tmp_path / "mlp.onnx", tmp_path / "train.npz"
    onnx.save(digits["model"], str(model))
    np.savez(train, **digits["train"])
    out = tmp_path / "pkg"
    passes = "prune(ratio=0.5),distill(epochs=2)"
    argv = ["-q", "compile", str(model), "-o", str(out), "--passes", passes, "--train", str(train)]
    assert main(argv) == 0
    assert main(["-q", "run", str(out), "--check"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert "distill" in json.dumps(manifest["pipeline"])
    distilled = onnx.load(str(out / "model.onnx"))
    pruned, _ = run(digits["model"], "prune(ratio=0.5)", None)
    name = digits["input"]
    assert accuracy(distilled, digits["test"], name) > accuracy(pruned, digits["test"], name)
