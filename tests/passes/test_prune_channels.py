"""prune: MAC reduction on ResNet/MobileNetV2-style nets, exact rewiring, options, declines.

Pruning is lossy, so the checks are: the model stays valid (``onnx.checker`` full check), runs
in ONNX Runtime, keeps its input and output shapes, and loses at least 25% of its MACs at
ratio 0.3. Exactness is tested where it is meaningful: ratio 0 changes nothing, and pruning
channels that are exactly zero (weights and bias before a ReLU) leaves the output unchanged to
1e-5 relative, which checks every slice of the rewiring (residual, depthwise, concat, flatten).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgecc.errors import UserInputError
from edgecc.passes.fold_batchnorm import FoldBatchNorm
from edgecc.passes.manager import PassContext, PassManager, clone, parse_pipeline
from edgecc.passes.prune_channels import PruneChannels
from edgecc.report.compare import compare_outputs, run_onnx
from edgecc.report.metrics import graph_stats
from tests.models import make_model

EXACT_RTOL = 1e-5


class ZeroNet(nn.Module):
    """Residual + inverted-residual (depthwise) + channel concat + flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = nn.Conv2d(16, 8, 1)
        self.branch = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.stem(x))
        r = F.relu(s + self.project(F.relu(self.dw(F.relu(self.expand(s))))))
        c = torch.cat([r, F.relu(self.branch(r))], 1)
        y = F.max_pool2d(F.relu(self.head(c)), 2)
        return self.fc(torch.flatten(y, 1))


class UNetish(nn.Module):
    """Encoder, strided ConvTranspose decoder, skip concat, nearest upsampling (Resize)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Conv2d(16, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = F.relu(self.enc(x))
        u = F.relu(self.up(F.relu(self.mid(F.max_pool2d(e, 2)))))
        d = F.relu(self.dec(torch.cat([u, e], 1)))
        return self.out(F.interpolate(d, scale_factor=2.0, mode="nearest"))


def _export(net: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    return torch.onnx.export(net.eval(), (x,), dynamo=True, optimize=False,
                             verbose=False).model_proto


@functools.cache
def _cnn(name: str, folded: bool) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """An exported test net (BatchNorm kept, or folded by fold-bn) and a seeded input."""
    if name in ("resnetish", "mobilenetv2ish"):
        net = make_model(name)
        (x,) = net.example_inputs()
    else:
        torch.manual_seed(0)
        net, x = {"zeronet": ZeroNet, "unetish": UNetish}[name](), torch.randn(1, 3, 8, 8)
    model = _export(net, x)
    if folded:
        model = FoldBatchNorm()(model, PassContext()).model
    return model, {"x": x.numpy()}


def _prune(model: onnx.ModelProto, **options: object):
    return PruneChannels(**options)(clone(model), PassContext())


def _io(model: onnx.ModelProto) -> list[bytes]:
    return [v.SerializeToString() for v in [*model.graph.input, *model.graph.output]]


def _conv_names(model: onnx.ModelProto) -> dict[str, str]:
    """Weight initializer name -> name of the Conv/Gemm reading it."""
    return {n.input[1]: n.name for n in model.graph.node if len(n.input) > 1}


def _check_valid(model: onnx.ModelProto, pruned: onnx.ModelProto,
                 feeds: dict[str, np.ndarray]) -> dict[str, float]:
    onnx.checker.check_model(pruned, full_check=True)
    assert _io(pruned) == _io(model)
    out, ref = run_onnx(pruned, feeds), run_onnx(model, feeds)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
    assert all(np.isfinite(v).all() for v in out.values())
    return compare_outputs(out, ref)


@pytest.mark.parametrize("folded", [False, True], ids=["with-bn", "bn-folded"])
@pytest.mark.parametrize("name", ["resnetish", "mobilenetv2ish"])
def test_ratio_03_removes_a_quarter_of_macs(name: str, folded: bool) -> None:
    model, feeds = _cnn(name, folded)
    result = _prune(model, ratio=0.3)
    assert result.modified
    _check_valid(model, result.model, feeds)
    before, after = graph_stats(model), graph_stats(result.model)
    assert before["macs_unknown"] == [] and after["macs_unknown"] == []
    reduction = 1 - after["macs"] / before["macs"]
    assert reduction >= 0.25, reduction
    assert result.info["mac_reduction"] == pytest.approx(reduction)
    assert after["params"] < before["params"]
    logits = [d for d in result.info["declined"] if "is a graph output" in d["reason"]]
    assert len(logits) == 1  # the classifier's output channels are the model's interface
    assert all(0 < g["kept"] < g["total"] for g in result.info["groups"])


@pytest.mark.parametrize("name", ["resnetish", "mobilenetv2ish"])
def test_ratio_0_changes_nothing(name: str) -> None:
    model, feeds = _cnn(name, False)
    result = _prune(model, ratio=0.0)
    assert not result.modified
    assert result.model.SerializeToString() == model.SerializeToString()
    assert all(g["kept"] == g["total"] for g in result.info["groups"])
    assert result.info["mac_reduction"] == 0.0


def test_pruning_zero_channels_is_exact() -> None:
    """Zero some channels' weights and bias before ReLUs, prune exactly those: same output."""
    net = ZeroNet()
    zero = {"stem": [1, 5], "project": [1, 5], "expand": [0, 3, 7], "dw": [0, 3, 7],
            "branch": [2], "head": [4]}
    with torch.no_grad():
        for layer, channels in zero.items():
            getattr(net, layer).weight[channels] = 0
            getattr(net, layer).bias[channels] = 0
    model = _export(net, torch.randn(1, 3, 8, 8))
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    names = _conv_names(model)
    # residual+concat group: 12 channels, 3 zero; hidden: 16, 3 zero; head: 6, 1 zero
    overrides = {names["stem.weight"]: 3 / 12, names["expand.weight"]: 3 / 16,
                 names["head.weight"]: 1 / 6}
    result = _prune(model, ratio=0.0, overrides=overrides)
    assert result.modified
    diff = _check_valid(model, result.model, feeds)
    assert diff["max_rel_diff"] <= EXACT_RTOL, diff
    assert sorted((g["kept"], g["total"]) for g in result.info["groups"]) == [
        (5, 6), (9, 12), (13, 16)]
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert shapes["stem.weight"] == [6, 3, 3, 3] and shapes["branch.weight"] == [3, 6, 3, 3]
    assert shapes["dw.weight"] == [13, 1, 3, 3] and shapes["head.weight"] == [5, 9, 1, 1]
    assert shapes["fc.weight"] == [3, 5 * 16]
    dw = next(n for n in result.model.graph.node if n.input[1:2] == ["dw.weight"])
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 13


def test_unet_concat_convtranspose_resize() -> None:
    model, feeds = _cnn("unetish", False)
    result = _prune(model, ratio=0.3)
    assert result.modified
    _check_valid(model, result.model, feeds)
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    c_in, c_out = shapes["up.weight"][:2]  # ConvTranspose (C_in, C_out, k, k): both cut
    assert c_in == 16 - 4 and c_out < 8 and shapes["dec.weight"][1] < 16
    assert result.info["mac_reduction"] > 0.25


@pytest.mark.parametrize("options", [{"criterion": "l2"}, {"use_bn": False},
                                     {"criterion": "l2", "use_bn": False, "ratio": 0.5}])
def test_criteria(options: dict[str, object]) -> None:
    model, feeds = _cnn("resnetish", False)
    result = _prune(model, **options)
    assert result.modified
    _check_valid(model, result.model, feeds)


def test_round_to_keeps_multiples() -> None:
    model, _ = _cnn("resnetish", True)
    result = _prune(model, ratio=0.3, round_to=4)
    assert result.modified
    assert [g["kept"] for g in result.info["groups"]] == [12, 12, 24, 24, 24]


def test_skip_and_overrides() -> None:
    model, feeds = _cnn("resnetish", True)
    names = _conv_names(model)
    stem = names["stem.0.weight"]
    result = _prune(model, ratio=0.3, skip=[stem])
    groups = {tuple(g["sources"]): g for g in result.info["groups"]}
    stem_group = next(g for s, g in groups.items() if stem in s)
    assert stem_group["kept"] == stem_group["total"] == 16
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    stem_w = next(n.input[1] for n in result.model.graph.node if n.name == stem)
    assert shapes[stem_w] == [16, 3, 3, 3]
    _check_valid(model, result.model, feeds)
    half = _prune(model, ratio=0.3, overrides={stem: 0.5})
    assert {tuple(g["sources"]): g["kept"] for g in half.info["groups"]}[
        tuple(stem_group["sources"])] == 8


@pytest.mark.parametrize(("options", "message"), [
    ({"ratio": 1.0}, "must be in"), ({"criterion": "l3"}, "criterion"),
    ({"round_to": 0}, "round_to"), ({"overrides": {"x": -0.1}}, "must be in"),
])
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        PruneChannels(**options)


def test_unknown_node_name() -> None:
    model, _ = _cnn("resnetish", True)
    with pytest.raises(UserInputError, match="no node named 'nope'"):
        _prune(model, skip=["nope"])


def _graph(nodes: list[onnx.NodeProto], x: list[int], y: list[int],
           inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_gemm_mlp() -> None:
    rng = np.random.default_rng(1)
    inits = {"w1": rng.standard_normal((32, 16)), "b1": rng.standard_normal(32),
             "w2": rng.standard_normal((32, 8)), "b2": rng.standard_normal(8),
             "w3": rng.standard_normal((8, 4))}
    model = _graph([helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
                    helper.make_node("Relu", ["h1"], ["r1"]),
                    helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"]),
                    helper.make_node("Relu", ["h2"], ["r2"]),
                    helper.make_node("MatMul", ["r2", "w3"], ["y"])], [2, 16], [2, 4], inits)
    result = _prune(model, ratio=0.5)
    assert [(g["kept"], g["total"]) for g in result.info["groups"]] == [(16, 32), (4, 8)]
    _check_valid(model, result.model, {"x": rng.standard_normal((2, 16)).astype(np.float32)})
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert shapes == {"w1": [16, 16], "b1": [16], "w2": [16, 4], "b2": [4], "w3": [4, 4]}


def test_grouped_conv_loses_whole_groups() -> None:
    rng = np.random.default_rng(2)
    inits = {"w1": rng.standard_normal((8, 4, 1, 1)), "w2": rng.standard_normal((8, 4, 3, 3)),
             "w3": rng.standard_normal((4, 8, 1, 1))}
    model = _graph([helper.make_node("Conv", ["x", "w1"], ["a"]),
                    helper.make_node("Relu", ["a"], ["r"]),
                    helper.make_node("Conv", ["r", "w2"], ["g"], group=2, pads=[1] * 4),
                    helper.make_node("Conv", ["g", "w3"], ["y"])], [1, 4, 5, 5], [1, 4, 5, 5],
                   inits)
    result = _prune(model, ratio=0.5)
    assert [(g["kept"], g["total"]) for g in result.info["groups"]] == [(1, 2)]
    _check_valid(model, result.model, {"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)})
    grouped = result.model.graph.node[2]
    assert helper.get_attribute_value(grouped.attribute[0]) == 1
    assert [list(t.dims) for t in result.model.graph.initializer] == [
        [4, 4, 1, 1], [4, 4, 3, 3], [4, 4, 1, 1]]


def test_pipeline_text() -> None:
    model, feeds = _cnn("mobilenetv2ish", False)
    manager = PassManager(parse_pipeline("fold-bn,prune(ratio=0.3,round_to=2)"))
    out = manager.run(model)
    assert [r.modified for r in manager.records] == [True, True]
    assert not [n for n in out.graph.node if n.op_type == "BatchNormalization"]
    assert graph_stats(out)["macs"] < 0.75 * graph_stats(model)["macs"]
    _check_valid(model, out, feeds)


def test_zero_channels_through_many_ops_is_exact() -> None:
    """PRelu, InstanceNorm, Pad, Resize(sizes), Mul, Concat with a constant, Transpose, MatMul."""
    rng = np.random.default_rng(3)
    w1, b1 = rng.standard_normal((8, 3, 3, 3)), rng.standard_normal(8)
    w2, b2 = rng.standard_normal((6, 10, 1, 1)), rng.standard_normal(6)
    in_bias = rng.standard_normal(8)
    for w, b, zero in ((w1, b1, [0, 2, 5]), (w2, b2, [1, 4])):
        w[zero], b[zero] = 0, 0
    in_bias[[0, 2, 5]] = 0  # InstanceNorm maps a zero channel to its bias
    inits = {"w1": w1, "b1": b1, "slope": rng.uniform(0.1, 0.3, (8, 1, 1)),
             "in_s": rng.uniform(0.5, 1.5, 8), "in_b": in_bias,
             "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1]), "sizes": np.array([1, 8, 8, 8]),
             "k": rng.standard_normal((1, 8, 1, 1)), "extra": rng.standard_normal((1, 2, 8, 8)),
             "w2": w2, "b2": b2, "wm": rng.standard_normal((6, 5))}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("PRelu", ["c1", "slope"], ["p"]),
             helper.make_node("InstanceNormalization", ["p", "in_s", "in_b"], ["n"]),
             helper.make_node("Pad", ["n", "pads"], ["pd"]),
             helper.make_node("Resize", ["pd", "", "", "sizes"], ["rs"], mode="nearest"),
             helper.make_node("Mul", ["rs", "k"], ["m"]),
             helper.make_node("Concat", ["m", "extra"], ["cat"], axis=1),
             helper.make_node("Conv", ["cat", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Transpose", ["r2"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t", "wm"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 5])],
        [numpy_helper.from_array(v.astype(np.int64 if k in ("pads", "sizes") else np.float32), k)
         for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    result = _prune(model, ratio=0.0, overrides={"conv1": 0.3, "conv2": 2 / 6})
    diff = _check_valid(model, result.model, {"x": rng.standard_normal((1, 3, 4, 4))
                                              .astype(np.float32)})
    assert diff["max_rel_diff"] <= EXACT_RTOL, diff
    assert [(g["kept"], g["total"]) for g in result.info["groups"]] == [(7, 10), (4, 6)]
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert shapes["w1"] == [5, 3, 3, 3] and shapes["slope"] == [5, 1, 1]
    assert shapes["k"] == [1, 5, 1, 1] and shapes["w2"] == [4, 7, 1, 1] and shapes["wm"] == [4, 5]
    sizes = next(t for t in result.model.graph.initializer
                 if t.name == result.model.graph.node[4].input[3])
    assert numpy_helper.to_array(sizes).tolist() == [1, 5, 8, 8]
