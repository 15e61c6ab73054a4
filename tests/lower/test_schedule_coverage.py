"""The schedule-rule framework: every fused CPU kernel is offered to the rules and recorded."""

from __future__ import annotations

import numpy as np
import torch

import edgecc
from edgecc.lower.schedules import CpuParams, ScheduleCoverage
from edgecc.targets import get_target


class _ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_params_come_from_the_target_record() -> None:
    assert CpuParams.of(get_target("x86-avx512")).lanes == 16
    assert CpuParams.of(get_target("x86-avx2")).lanes == 8
    rpi4 = CpuParams.of(get_target("rpi4"))
    assert (rpi4.lanes, rpi4.cores, rpi4.arch) == (4, 4, "aarch64")


def test_coverage_counts() -> None:
    cov = ScheduleCoverage({"a": "matmul", "b": None, "c": "matmul"})
    assert cov.summary()["counts"] == {"matmul": 2, "none": 1}


def test_manifest_lists_every_kernel_and_its_rule(tmp_path) -> None:
    torch.manual_seed(0)
    model = _ConvNet().eval()
    x = torch.randn(1, 3, 8, 8)
    pkg = edgecc.compile(model, target="x86", example_inputs=(x,), out=tmp_path / "pkg")
    schedules = pkg.manifest["library"]["schedules"]
    kernels = schedules["kernels"]
    assert any("conv2d" in k for k in kernels) and any("matmul" in k for k in kernels)
    assert sum(schedules["counts"].values()) == len(kernels)
    out = edgecc.load(tmp_path / "pkg").run({"x": x.numpy()})
    got = next(iter(out.values()))
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
