"""End to end: speech-style recurrent models (Conv + LSTM, Conv + bidirectional GRU) compile.

TVM 0.27 cannot import LSTM/GRU; the cleanup stage's ``expand-rnn`` unrolls them, so
``edgecc compile vad.pt`` works without options. x86 packages run natively, the rpi4 package
under qemu-user emulation; both are compared with torch (max abs diff <= 1e-4 scaled by the
output's magnitude, as in ``test_end_to_end.py``). ``dynamic-quant`` then stores the unrolled
MatMul weights as int8: its package matches ONNX Runtime on the quantized graph (max relative
diff <= 1e-3) and torch's float output to cosine >= 0.999.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import edgecc
from edgecc.cli import main
from edgecc.report.compare import cosine

MELS, FRAMES = 16, 12


class VoiceActivity(nn.Module):
    """A voice-activity detector: Conv1d front end over log-mel frames, a 2-layer LSTM over
    time, a per-frame speech probability. Input ``(batch, mels, frames)``."""

    def __init__(self, channels: int = 16, hidden: int = 24) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(MELS, channels, 3, padding=1),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.lstm = nn.LSTM(channels, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(self.conv(x).transpose(1, 2))
        return torch.sigmoid(self.head(y)).squeeze(-1)


class KeywordSpotter(nn.Module):
    """Keyword spotting: Conv1d, a bidirectional GRU, the last frame's logits for 4 keywords."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv1d(MELS, 16, 3, padding=1)
        self.gru = nn.GRU(16, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.gru(torch.relu(self.conv(x)).transpose(1, 2))
        return self.head(y[:, -1])


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _x(seed: int) -> torch.Tensor:
    return torch.randn(1, MELS, FRAMES, generator=torch.Generator().manual_seed(seed))


def _assert_close(got: np.ndarray, ref: torch.Tensor) -> None:
    ref = ref.detach().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(ref))))


@pytest.fixture(scope="module")
def vad_pt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    model = _model(VoiceActivity)
    path = tmp_path_factory.mktemp("vad") / "vad.pt"
    torch.jit.save(torch.jit.trace(model, _x(0)), str(path))
    return path, model


@pytest.mark.slow
def test_vad_pt_compiles_with_the_cli_for_x86_and_matches_torch(
    vad_pt: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    path, model = vad_pt
    code = main(["compile", str(path), "--target", "x86", "--input-shape",
                 f"x:1x{MELS}x{FRAMES}", "-o", str(tmp_path / "vad")])  # fmt: skip
    assert code == 0
    pkg = edgecc.load(tmp_path / "vad")
    expanded = pkg.report["passes"][2]
    assert expanded["pass"] == "expand-rnn" and expanded["modified"]
    x = _x(5)
    _assert_close(pkg.run({pkg.input_names[0]: x.numpy()})[pkg.output_names[0]], model(x))


@pytest.mark.slow
@pytest.mark.emulation
def test_vad_rpi4_runs_under_emulation_and_matches_torch(
    vad_pt: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    path, model = vad_pt
    pkg = edgecc.compile(path, "rpi4", input_shapes=[f"x:1x{MELS}x{FRAMES}"], out=tmp_path / "r")
    assert pkg.library.read_bytes()[18:20] == (183).to_bytes(2, "little")  # EM_AARCH64
    outputs = pkg.run()  # the probe input recorded at compile time, run under qemu-aarch64
    probe = torch.from_numpy(pkg.probe_inputs()[pkg.input_names[0]])
    _assert_close(outputs[pkg.output_names[0]], model(probe))


def test_vad_dynamic_quant_stores_the_lstm_matmuls_as_int8(
    vad_pt: tuple[Path, nn.Module], tmp_path: Path
) -> None:
    path, model = vad_pt
    pkg = edgecc.compile(
        path,
        "x86",
        input_shapes=[f"x:1x{MELS}x{FRAMES}"],
        passes="fold-bn,dynamic-quant",
        out=tmp_path / "q",
    )
    graph = onnx.load(str(tmp_path / "q" / "model.onnx")).graph
    int8 = {t.name for t in graph.initializer if numpy_helper.to_array(t).dtype == np.int8}
    dq = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    # per LSTM layer: one input projection + one recurrent MatMul per step after the first
    assert len(matmuls) >= 2 * FRAMES
    assert all(dq.get(n.input[1]) in int8 for n in matmuls)
    lstm_weights = sum(p.numel() for n, p in model.lstm.named_parameters() if "weight" in n)
    int8_elements = sum(numpy_helper.to_array(t).size for t in graph.initializer if t.name in int8)
    assert int8_elements >= lstm_weights  # every LSTM weight (and the head's) stored as int8
    rows = pkg.report["passes"]  # the tiny net's bytes are mostly graph structure: check the saving
    k = next(i for i, r in enumerate(rows) if r["pass"] == "dynamic-quant")
    # 3 bytes saved per weight element, less the per-channel scales and DequantizeLinear nodes
    assert rows[k - 1]["bytes"] - rows[k]["bytes"] > 2.0 * lstm_weights
    outputs = pkg.run()  # the MatMuls run as dynamic int8: the package's own check rule
    res = pkg.check(outputs)
    assert res["passed"], res
    probe = torch.from_numpy(pkg.probe_inputs()[pkg.input_names[0]])
    ref = model(probe).detach().numpy()
    assert cosine(outputs[pkg.output_names[0]], ref) >= 0.999


@pytest.mark.slow
def test_bidirectional_gru_keyword_spotter_x86_matches_torch(tmp_path: Path) -> None:
    model = _model(KeywordSpotter)
    pkg = edgecc.compile(model, "x86", example_inputs=(_x(0),), out=tmp_path / "kws")
    x = _x(3)
    _assert_close(pkg.run({pkg.input_names[0]: x.numpy()})[pkg.output_names[0]], model(x))


def test_declined_lstm_exits_3_naming_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """sequence_lens shorter than the sequence: expand-rnn declines, the CLI exits 3 with one
    line naming the pass, and the warning gives the reason."""
    from onnx import helper

    from edgecc.errors import EXIT_UNSUPPORTED
    from tests.models import onnx_model, tensor

    rng = np.random.default_rng(0)
    inits = {
        "W": rng.normal(size=(1, 8, 3)).astype(np.float32),
        "R": rng.normal(size=(1, 8, 2)).astype(np.float32),
        "lens": np.array([4, 2], np.int32),
    }
    node = helper.make_node("LSTM", ["x", "W", "R", "", "lens"], ["y"], name="lstm", hidden_size=2)
    model = onnx_model([node], [tensor("x", [4, 2, 3])], [tensor("y", [4, 1, 2, 2])], inits)
    onnx.save(model, str(tmp_path / "m.onnx"))
    code = main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == EXIT_UNSUPPORTED
    assert "sequence_lens [4, 2] differ from the sequence length 4" in caplog.text  # a warning
    assert "LSTM x1 (e.g. lstm)" in err and "expand-rnn expands LSTM" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
