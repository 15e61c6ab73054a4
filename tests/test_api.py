"""The Python API: compile an nn.Module, load and run, atomic replacement, reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import edgecc
from edgecc.package import sha256_file


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(y)


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    model = Net().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    return model


def test_compile_module_load_and_run(net: torch.nn.Module, tmp_path: Path) -> None:
    x = torch.randn(1, 3, 16, 16)
    pkg = edgecc.compile(net, "x86", example_inputs=(x,), passes="fold-bn", out=tmp_path / "pkg")
    assert pkg.manifest["pipeline"] == (
        "fold-constants,expand-rnn,qlinear-to-qdq,remove-identity,eliminate-dead,fold-bn"
    )
    assert pkg.report["stats"]["final"]["nodes"] < pkg.report["stats"]["input"]["nodes"]
    (name,) = pkg.input_names
    out = edgecc.load(tmp_path / "pkg").run({name: x.numpy()})
    np.testing.assert_allclose(
        next(iter(out.values())), net(x).detach().numpy(), rtol=1e-4, atol=1e-5
    )


def test_same_input_gives_same_library_hash(net: torch.nn.Module, tmp_path: Path) -> None:
    x = torch.randn(1, 3, 16, 16)
    a = edgecc.compile(net, "x86", example_inputs=(x,), out=tmp_path / "a")
    b = edgecc.compile(net, "x86", example_inputs=(x,), out=tmp_path / "b")
    assert sha256_file(a.library) == sha256_file(b.library)
    assert (a.path / "manifest.json").read_bytes() == (b.path / "manifest.json").read_bytes()


def test_interrupted_compile_leaves_previous_package(
    net: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(1, 3, 16, 16)
    out = tmp_path / "pkg"
    edgecc.compile(net, "x86", example_inputs=(x,), out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("edgecc.lower.lower", interrupted)
    with pytest.raises(KeyboardInterrupt):
        edgecc.compile(net, "x86", example_inputs=(x,), passes="fold-bn", out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # no staging folder left


def test_cleanup_can_be_turned_off(net: torch.nn.Module, tmp_path: Path) -> None:
    x = torch.randn(1, 3, 16, 16)
    pkg = edgecc.compile(
        net, "x86", example_inputs=(x,), passes="", cleanup=False, out=tmp_path / "p"
    )
    assert pkg.manifest["pipeline"] == ""
    assert [r["step"] for r in pkg.report["passes"]] == ["000_input"]


def test_options_without_effect_warn_and_are_not_recorded(
    net: torch.nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--calib without qdq and --disable-pass of a pass not in the pipeline do nothing: each
    gives a warning and stays out of the manifest; the progress line shows what really runs."""
    x = torch.randn(1, 3, 16, 16)
    said: list[str] = []
    with caplog.at_level("WARNING"):
        pkg = edgecc.compile(
            net,
            "x86",
            example_inputs=(x,),
            passes="fold-bn,prune(ratio=0.3)",
            disable_passes=["prune", "qdq"],
            calib="random",
            cleanup=False,
            out=tmp_path / "p",
            progress=said.append,
        )
    warnings = [r.getMessage() for r in caplog.records]
    assert "--calib has no effect: no qdq pass in the pipeline" in warnings
    assert any("--disable-pass qdq has no effect" in w for w in warnings)
    assert pkg.manifest["calibration"] is None
    assert pkg.manifest["disabled_passes"] == ["prune"]
    assert "running 1 passes: fold-bn" in said
