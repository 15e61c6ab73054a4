"""edgecc.evaluate / ``edgecc eval``: data formats, metrics against numpy, runners, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecc
from edgecc.cli import main
from edgecc.errors import UserInputError
from edgecc.passes import PassContext, PassManager, parse_pipeline
from edgecc.passes.calibration import load_calibration
from tests.evaluation.nets import mlp_onnx, save_digits, train_mlp


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    layers = train_mlp()
    onnx.save(mlp_onnx(layers), str(root / "m.onnx"))
    test = save_digits(root / "test.npz")
    with np.load(test) as d:
        x, labels = d["x"], d["labels"]
    return {"root": root, "layers": layers, "x": x, "labels": labels}


def numpy_logits(layers: list, x: np.ndarray) -> np.ndarray:
    h = x.reshape(len(x), -1).astype(np.float64)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        h = np.maximum(h, 0) if i < len(layers) - 1 else h
    return h


def numpy_topk(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    top = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    return 100 * np.mean(top[:, 0] == labels), 100 * np.mean((top == labels[:, None]).any(1))


def test_top1_top5_match_numpy(work: dict) -> None:
    res = edgecc.evaluate(work["root"] / "m.onnx", work["root"] / "test.npz", batch_size=50)
    top1, top5 = numpy_topk(numpy_logits(work["layers"], work["x"]), work["labels"])
    assert res["samples"] == len(work["labels"]) == 450
    assert res["metric"] == "top1" and res["value"] == res["top1"]
    assert res["top1"] == pytest.approx(top1, abs=1e-9) and res["top5"] == pytest.approx(top5)
    assert 70 < top1 < top5 <= 100  # a real classifier, and top-5 is easier


def fixed_reshape_mlp(layers: list, batch: int) -> onnx.ModelProto:
    """The MLP with Flatten replaced by a Reshape to [batch, 64]: no symbolic batch possible."""
    model = mlp_onnx(layers, batch=batch)
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.array([batch, 64], np.int64), "shape"))
    g.node[0].CopyFrom(helper.make_node("Reshape", ["x", "shape"], ["f"], "flatten"))
    return model


@pytest.mark.parametrize("kind", ["fixed-1", "fixed-7-reshape"])
def test_fixed_batch_models(work: dict, kind: str) -> None:
    """A batch-1 graph is relaxed to a symbolic batch; a graph that hard-codes batch 7 in a
    Reshape runs in padded batches of 7 (450 = 64 * 7 + 2): the same figures either way."""
    from edgecc.evaluation.runners import OnnxRunner

    model = (
        mlp_onnx(work["layers"], batch=1)
        if kind == "fixed-1"
        else fixed_reshape_mlp(work["layers"], 7)
    )
    runner = OnnxRunner(model)
    assert runner.fixed == (None if kind == "fixed-1" else 7)
    res = edgecc.evaluate(model, work["root"] / "test.npz")
    top1, top5 = numpy_topk(numpy_logits(work["layers"], work["x"]), work["labels"])
    assert (res["top1"], res["top5"]) == (pytest.approx(top1), pytest.approx(top5))


def _per_sample_folder(root: Path, x: np.ndarray, suffix: str = ".npy") -> list[str]:
    root.mkdir()
    names = []
    for i, sample in enumerate(x):
        name = f"s{i:04d}{suffix}"
        if suffix == ".npy":
            np.save(root / name, sample)
        else:
            from PIL import Image

            Image.fromarray(np.round(sample[0] * 255).astype(np.uint8)).save(root / name)
        names.append(name)
    return names


@pytest.mark.parametrize("labels_file", ["labels.txt", "labels-pairs.txt", "labels.csv", "npy"])
def test_folder_of_samples_with_labels_files(work: dict, tmp_path: Path, labels_file: str) -> None:
    x, labels = work["x"][:40], work["labels"][:40]
    names = _per_sample_folder(tmp_path / "d", x)
    folder = tmp_path / "d"
    order = np.random.default_rng(0).permutation(len(names))  # FILE LABEL rows in any order
    if labels_file == "labels.txt":
        (folder / "labels.txt").write_text("# one per line\n" + "\n".join(map(str, labels)))
    elif labels_file == "labels-pairs.txt":
        rows = [f"{names[i]} {labels[i]}" for i in order]
        (folder / "labels.txt").write_text("\n".join(rows) + "\n")
    elif labels_file == "labels.csv":
        rows = ["file,label", *[f"{names[i]},{labels[i]}" for i in order]]
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    else:
        np.save(folder / "labels.npy", labels)
    res = edgecc.evaluate(work["root"] / "m.onnx", folder, batch_size=16)
    top1, top5 = numpy_topk(numpy_logits(work["layers"], x), labels)
    assert res["samples"] == 40 and res["top1"] == pytest.approx(top1)
    assert res["top5"] == pytest.approx(top5)


def test_folder_reads_one_batch_at_a_time(work: dict, tmp_path: Path, monkeypatch) -> None:
    """Streaming: a folder of 40 samples in batches of 16 reads at most 16 files per batch."""
    from edgecc.evaluation import data as data_mod

    _per_sample_folder(tmp_path / "d", work["x"][:40])
    np.save(tmp_path / "d" / "labels.npy", work["labels"][:40])
    reads: list[int] = []
    original = data_mod._read_sample

    def counting(path: Path, spec):
        reads.append(1)
        return original(path, spec)

    monkeypatch.setattr(data_mod, "_read_sample", counting)
    bound = data_mod.open_data(tmp_path / "d", [data_mod.InputInfo("x", (1, 8, 8), "float32")])
    before = len(reads)  # the first file is read once to check its shape
    sizes = []
    for batch in bound.batches(16):
        sizes.append((len(batch), len(reads) - before))
        before = len(reads)
    assert sizes == [(16, 16), (16, 16), (8, 8)]


def test_named_arrays_folder_and_png_images(work: dict, tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    x, labels = work["x"][:30], work["labels"][:30]
    named = tmp_path / "named"
    named.mkdir()
    np.save(named / "x.npy", x)
    np.save(named / "labels.npy", labels)
    res = edgecc.evaluate(work["root"] / "m.onnx", named)
    assert res["top1"] == pytest.approx(numpy_topk(numpy_logits(work["layers"], x), labels)[0])
    _per_sample_folder(tmp_path / "png", x, ".png")
    (tmp_path / "png" / "labels.txt").write_text("\n".join(map(str, labels)))
    png = edgecc.evaluate(work["root"] / "m.onnx", tmp_path / "png")
    rounded = np.round(x * 255) / 255  # PNG stores 8-bit pixels; edgecc scales them to [0, 1]
    want = numpy_topk(numpy_logits(work["layers"], rounded), labels)[0]
    assert png["samples"] == 30 and png["top1"] == pytest.approx(want)


def quantized(work: dict) -> onnx.ModelProto:
    root = work["root"]
    if not (root / "calib.npz").exists():
        save_digits(root / "calib.npz", "train", labels=False)
    model = onnx.load(str(root / "m.onnx"))
    ctx = PassContext()
    spec = {"x": ((16, 1, 8, 8), "float32")}
    ctx.calibration, ctx.calibration_source = load_calibration(str(root / "calib.npz"), spec)
    return PassManager(parse_pipeline("qdq(activation=int8)")).run(model, ctx)


def test_agreement_without_labels_matches_numpy(work: dict, tmp_path: Path) -> None:
    """No labels: agreement with the float reference (cosine, max error, top-1 agreement)."""
    from edgecc.evaluation.ort import run_batched, session

    nolabels = save_digits(tmp_path / "x.npz", labels=False)
    q = quantized(work)
    res = edgecc.evaluate(q, nolabels, reference=work["root"] / "m.onnx")
    assert res["metric"] == "agreement" and "top1" not in res
    y = run_batched(session(q), {"x": work["x"]}).astype(np.float64)
    r = numpy_logits(work["layers"], work["x"])
    cos = np.sum(y * r, 1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(r, axis=1))
    a = res["agreement"]
    assert a["cosine"] == pytest.approx(cos.mean(), abs=1e-6) == res["value"]
    assert a["cosine_min"] == pytest.approx(cos.min(), abs=1e-6)
    assert a["max_abs_error"] == pytest.approx(np.abs(y - r).max(), rel=1e-3, abs=1e-4)
    assert a["top1"] == pytest.approx(100 * np.mean(y.argmax(1) == r.argmax(1)))
    assert 0.9 < a["cosine"] < 1.0 and not a["pooled"]
    # a float source without labels agrees with itself
    same = edgecc.evaluate(work["root"] / "m.onnx", nolabels)
    assert same["agreement"]["cosine"] == pytest.approx(1.0) and same["agreement"]["top1"] == 100


def embedder(table: np.ndarray) -> onnx.ModelProto:
    """Token embeddings (N x T x D) from a table, zeroed where the attention mask is 0."""
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["emb", "m3"], ["tokens"]),
    ]
    g = helper.make_graph(
        nodes,
        "emb",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", 6]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", 6]),
        ],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", 6, 4])],
        [
            numpy_helper.from_array(table.astype(np.float32), "table"),
            numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_token_outputs_are_mean_pooled_with_the_mask(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    table = rng.standard_normal((20, 4))
    noisy = table + 0.3 * rng.standard_normal(table.shape)
    ids = rng.integers(0, 20, (9, 6))
    mask = (np.arange(6)[None] < rng.integers(2, 7, (9, 1))).astype(np.int64)
    np.savez(tmp_path / "s.npz", input_ids=ids, attention_mask=mask)
    res = edgecc.evaluate(embedder(noisy), tmp_path / "s.npz", reference=embedder(table))

    def pooled(t: np.ndarray) -> np.ndarray:
        return (t[ids] * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)

    a, b = pooled(noisy), pooled(table)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert res["agreement"]["pooled"] is True
    assert res["agreement"]["cosine"] == pytest.approx(cos.mean(), abs=1e-6)


def test_callable_metric(work: dict) -> None:
    def accuracy(outputs: np.ndarray, labels: np.ndarray | None) -> float:
        return float(np.mean(outputs.argmax(1) == labels))

    res = edgecc.evaluate(work["root"] / "m.onnx", work["root"] / "test.npz", metric=accuracy)
    assert res["metric"] == "accuracy"
    assert res["value"] == pytest.approx(res["top1"] / 100)


def test_named_dataset(work: dict) -> None:
    res = edgecc.evaluate(work["root"] / "m.onnx", "digits", samples=100)
    assert res["samples"] == 100
    top1 = numpy_topk(numpy_logits(work["layers"], work["x"][:100]), work["labels"][:100])[0]
    assert res["top1"] == pytest.approx(top1)


def test_torch_source(work: dict, tmp_path: Path) -> None:
    """A TorchScript file with the MLP's weights gives the numpy figures."""
    import torch

    mods: list[torch.nn.Module] = [torch.nn.Flatten()]
    for i, (w, b) in enumerate(work["layers"]):
        lin = torch.nn.Linear(*w.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        mods += [lin] + ([torch.nn.ReLU()] if i < 2 else [])

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(*mods)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    net = Net().eval()
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, 8, 8)), str(tmp_path / "m.pt"))
    res = edgecc.evaluate(
        tmp_path / "m.pt", work["root"] / "test.npz", input_shapes=["x:1x1x8x8"], samples=120
    )
    top1, top5 = numpy_topk(numpy_logits(work["layers"], work["x"][:120]), work["labels"][:120])
    assert (res["top1"], res["top5"]) == (pytest.approx(top1), pytest.approx(top5))


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json(work: dict, capsys: pytest.CaptureFixture) -> None:
    root = work["root"]
    args = ["--json", "eval", str(root / "m.onnx"), "--data", str(root / "test.npz")]
    code, out, _ = run_cli([*args, "--batch", "100"], capsys)
    data = json.loads(out)
    assert code == 0 and data["samples"] == 450
    top1, top5 = numpy_topk(numpy_logits(work["layers"], work["x"]), work["labels"])
    assert data["top1"] == pytest.approx(top1) and data["top5"] == pytest.approx(top5)
    code, out, _ = run_cli(["eval", str(work["root"] / "m.onnx"), "--data", "digits"], capsys)
    assert code == 0 and "top-1" in out and "top-5" in out


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-labels", "needs labels"),
        ("wrong-name", "missing x"),
        ("shape", "samples have shape [1, 4, 4]"),
        ("label-count", "3 labels for 5 samples"),
        ("no-data", "needs --data"),
        ("missing", "not found"),
    ],
)
def test_cli_errors_one_line_exit_2(
    work: dict, tmp_path: Path, capsys: pytest.CaptureFixture, case: str, message: str
) -> None:
    x = work["x"][:5]
    files = {
        "no-labels": {"x": x},
        "wrong-name": {"images": x, "labels": work["labels"][:5]},
        "shape": {"x": x[:, :, :4, :4], "labels": work["labels"][:5]},
        "label-count": {"x": x, "labels": work["labels"][:3]},
    }
    path = tmp_path / "d.npz"
    if case in files:
        np.savez(path, **files[case])
    args = ["eval", str(work["root"] / "m.onnx")]
    if case != "no-data":
        args += ["--data", str(path)]
    if case == "no-labels":
        args += ["--metric", "top1"]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_api_errors(work: dict) -> None:
    with pytest.raises(UserInputError, match="unknown metric"):
        edgecc.evaluate(work["root"] / "m.onnx", work["root"] / "test.npz", metric="f1")
