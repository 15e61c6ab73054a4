"""Inputs bound by name, constant arguments, dynamic and negative dims, probe limits.

Numerics: references are checked against the formula the model computes (atol 1e-6) and the
exported graph against ONNX Runtime on the same named inputs (atol 1e-5).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgecc.errors import UserInputError
from edgecc.frontend import InputSpec, load_model, parse_input_spec
from edgecc.frontend.probe import resolve_probe
from edgecc.report.compare import run_onnx
from edgecc.report.metrics import graph_stats
from tests.models import onnx_model, tensor


class AB(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * 2 + b


class Rate(torch.nn.Module):
    def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        return x * sr + 1


class Bad(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def _specs(*texts: str) -> list[InputSpec]:
    return [parse_input_spec(t) for t in texts]


def _error(*args: object, **kwargs: object) -> str:
    with pytest.raises(UserInputError) as info:
        load_model(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_torchscript_inputs_bind_by_name(tmp_path: Path) -> None:
    path = _script(AB(), tmp_path / "ab.pt")
    lm = load_model(path, input_specs=_specs("b:1x4", "a:2x4"))  # given in the other order
    assert [s.name for s in lm.inputs] == ["a", "b"]  # the model's order
    assert [s.shape for s in lm.inputs] == [(2, 4), (1, 4)]
    a, b = lm.probe_inputs["a"], lm.probe_inputs["b"]
    np.testing.assert_allclose(lm.reference_outputs["output"], a * 2 + b, rtol=0, atol=1e-6)
    ort = run_onnx(lm.model, {"b": b, "a": a})
    np.testing.assert_allclose(ort[lm.output_names[0]], a * 2 + b, rtol=0, atol=1e-5)


def test_unknown_input_name_lists_the_real_ones(tmp_path: Path) -> None:
    path = _script(Bad(), tmp_path / "x.pt")
    msg = _error(path, input_specs=_specs("inp:1x8"))
    assert "inp" in msg and "forward(x)" in msg
    msg = _error(AB(), input_specs=_specs("a:1x4", "c:1x4"))
    assert "c" in msg and "forward(a, b)" in msg


def test_torchscript_constant_argument(tmp_path: Path) -> None:
    path = _script(Rate(), tmp_path / "rate.pt")
    msg = _error(path, input_specs=_specs("x:1x4"))
    assert "'sr'" in msg and "--input-value sr=" in msg
    lm = load_model(path, input_specs=_specs("x:1x4"), input_values={"sr": "3"})
    assert [s.name for s in lm.inputs] == ["x"] and lm.input_values == {"sr": 3}
    assert [i.name for i in lm.model.graph.input] == ["x"]
    x = lm.probe_inputs["x"]
    np.testing.assert_allclose(lm.reference_outputs["output"], x * 3 + 1, rtol=0, atol=1e-6)
    ort = run_onnx(lm.model, {"x": x})
    np.testing.assert_allclose(ort[lm.output_names[0]], x * 3 + 1, rtol=0, atol=1e-5)
    assert "not an argument" in _error(path, input_specs=_specs("x:1x4"), input_values={"q": 1})


def test_module_example_numbers_are_constants() -> None:
    x = torch.randn(1, 4)
    lm = load_model(Rate(), example_inputs=(x, 5))
    assert [s.name for s in lm.inputs] == ["x"] and lm.input_values == {"sr": 5}
    x = lm.probe_inputs["x"]
    np.testing.assert_allclose(lm.reference_outputs["output"], x * 5 + 1, rtol=0, atol=1e-6)
    lm = load_model(Rate(), input_specs=_specs("x:1x4"), input_values={"sr": 2})
    x = lm.probe_inputs["x"]
    np.testing.assert_allclose(lm.reference_outputs["output"], x * 2 + 1, rtol=0, atol=1e-6)


def test_torchscript_failure_says_why(tmp_path: Path) -> None:
    path = _script(Bad(), tmp_path / "bad.pt")
    msg = _error(path, input_specs=_specs("x:1x4"))
    assert "mat1 and mat2 shapes cannot be multiplied (1x4 and 8x2)" in msg
    assert "TorchScript interpreter" not in msg


def test_pt2_dynamic_batch_is_reported_and_settable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lin = torch.nn.Linear(4, 3).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(lin, (torch.randn(2, 4),), dynamic_shapes={"input": {0: batch}})
    path = tmp_path / "dyn.pt2"
    torch.export.save(program, str(path))
    with caplog.at_level(logging.WARNING, logger="edgecc.frontend.onnx_io"):
        lm = load_model(path)
    lines = [r.getMessage() for r in caplog.records if "dynamic dims fixed" in r.getMessage()]
    assert len(lines) == 1 and "input[0]" in lines[0] and "= 2" in lines[0], lines
    assert lm.fixed_dims == [
        {"input": "input", "axis": 0, "dim": lm.fixed_dims[0]["dim"], "value": 2}
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgecc.frontend.onnx_io"):
        lm = load_model(path, input_specs=_specs("input:1x4"))
    assert lm.inputs == [InputSpec("input", (1, 4))]
    assert any("= 1" in r.getMessage() for r in caplog.records)
    x = lm.probe_inputs["input"]
    with torch.no_grad():
        expected = lin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(lm.reference_outputs["output"], expected, rtol=0, atol=1e-6)


def test_onnx_symbolic_dim_fixed_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    w = np.ones((4, 3), np.float32)
    model = onnx_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", ["N", 4])],
        [tensor("y", ["N", 3])],
        {"w": w},
    )
    with caplog.at_level(logging.WARNING, logger="edgecc.frontend.onnx_io"):
        lm = load_model(model, input_specs=_specs("x:5x4"))
    assert any("x[0] (N) = 5" in r.getMessage() for r in caplog.records)
    assert lm.fixed_dims == [{"input": "x", "axis": 0, "dim": "N", "value": 5}]


def _minus_one_model() -> onnx.ModelProto:
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    model = onnx_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        [tensor("x", [1, 4])],
        [tensor("y", [1, 3])],
        {"w": w},
    )
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = -1  # as Paddle writes a dynamic dim
    vi = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 3])
    vi.type.tensor_type.shape.dim[0].dim_value = -1
    model.graph.value_info.append(vi)
    return model


def test_onnx_negative_dim_is_unknown() -> None:
    model = _minus_one_model()
    onnx.checker.check_model(model, full_check=False)  # the checker accepts it
    msg = _error(model)
    assert "--input-shape x:1x4" in msg  # asks for the unknown dim, no shape-inference error
    lm = load_model(model, input_specs=_specs("x:2x4"))
    assert lm.inputs == [InputSpec("x", (2, 4))]
    x = lm.probe_inputs["x"]
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_allclose(
        lm.reference_outputs["y"], np.maximum(x @ w, 0), rtol=1e-6, atol=1e-5
    )


def test_zero_d_probe_arrays() -> None:
    scalar = [InputSpec("s", ())]
    out = resolve_probe(scalar, {"s": np.array(2.5, np.float32)})
    assert out["s"].shape == () and float(out["s"]) == 2.5
    with pytest.raises(UserInputError, match="has shape"):
        resolve_probe([InputSpec("x", (1,))], {"x": np.array(2.5, np.float32)})
    with pytest.raises(UserInputError, match="has shape"):
        resolve_probe(scalar, {"s": np.ones(3, np.float32)})
    model = onnx_model(
        [helper.make_node("Mul", ["s", "s"], ["y"])], [tensor("s", [])], [tensor("y", [])]
    )
    lm = load_model(model, probe_inputs={"s": np.array(3.0, np.float32)})
    assert float(lm.reference_outputs["y"]) == 9.0


@pytest.mark.parametrize(
    "dims,dtype,need",
    [
        ([1, 2**31], TensorProto.FLOAT, "8.0 GiB"),
        ([1, 2**31], TensorProto.FLOAT16, "4.0 GiB"),
    ],
)
def test_onnx_huge_input_is_refused_before_allocating(
    dims: list[int], dtype: int, need: str
) -> None:
    model = onnx_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor("x", dims, dtype)],
        [tensor("y", dims, dtype)],
    )
    msg = _error(model)
    assert need in msg and "--input-shape" in msg


@pytest.mark.parametrize(
    "spec,need", [("x:559x262144x1048576", "559 TiB"), ("x:7x8x1024x1024x1024", "224 GiB")]
)
def test_huge_input_shape_is_refused(spec: str, need: str) -> None:
    msg = _error(Bad(), input_specs=_specs(spec))
    assert need in msg


def test_unknown_dtype_is_one_line() -> None:
    with pytest.raises(UserInputError, match="unknown dtype 'float128'"):
        parse_input_spec("x:1x3x16x16:float128")


def test_input_graph_macs_are_counted() -> None:
    lm = load_model(Bad(), input_specs=_specs("x:3x8"))
    assert graph_stats(lm.model)["macs"] == 3 * 8 * 2


def test_dynamic_pt2_input_graph_macs_are_counted(tmp_path: Path) -> None:
    """Exported with its dynamic dims, the graph's shape arithmetic hid the MatMul shapes."""

    class Attend(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 8).unbind(2)
            return torch.softmax(q @ k.transpose(1, 2), -1) @ v

    seq = torch.export.Dim("seq", max=16)
    program = torch.export.export(Attend(), (torch.randn(1, 6, 8),), dynamic_shapes=({1: seq},))
    path = tmp_path / "attend.pt2"
    torch.export.save(program, str(path))
    lm = load_model(path, input_specs=_specs("x:1x6x8"))
    stats = graph_stats(lm.model)
    assert stats["macs_unknown"] == []
    assert stats["macs"] == 6 * 8 * 24 + 6 * 6 * 8 * 2
    assert lm.fixed_dims == [{"input": "x", "axis": 1, "dim": lm.fixed_dims[0]["dim"], "value": 6}]
