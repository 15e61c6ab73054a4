"""Build the bundled example: a small residual CNN (conv, BatchNorm, ReLU, residual add, pooling,
linear head) for 1x3x32x32 inputs, saved as TorchScript ``model.pt``.

Weights are seeded and BatchNorm statistics randomised, so BatchNorm folding has real work to do.
Run ``python examples/tinycnn/make_model.py`` to regenerate ``model.pt`` (it is committed, ~60 KB).
"""

from pathlib import Path

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.block1 = Block(16)
        self.down = nn.Sequential(
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.block2 = Block(32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


if __name__ == "__main__":
    out = Path(__file__).with_name("model.pt")
    scripted = torch.jit.trace(build(), torch.randn(1, 3, 32, 32))
    torch.jit.save(scripted, str(out))
    print(f"wrote {out} ({out.stat().st_size} bytes)")
