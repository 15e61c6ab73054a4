"""Every file format loads (or is refused with a clear one-line message), without unpickling.

One ResNetish saved in every format torch 2.13 writes; each load must give a checked ONNX model
with static inputs, opset >= 17, its BatchNormalizations intact, and a reference that matches
ONNX Runtime on the exported graph (max abs diff <= 1e-4).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgecc.errors import UnsupportedOperatorError, UserInputError
from edgecc.frontend import InputSpec, LoadedModel, load_model, parse_input_spec
from edgecc.report.compare import run_onnx
from tests.models import make_model, onnx_model, tensor

SPEC = [parse_input_spec("x:1x3x32x32")]
N_BATCHNORMS = 8  # ResNetish: stem 1 + blocks 2 + 3 (downsample) + 2
TOL = 1e-4


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    return make_model("resnetish")


@pytest.fixture(scope="module")
def files(resnet: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("formats")
    ex = resnet.example_inputs()
    paths = {
        k: d / v
        for k, v in {
            "traced": "traced.pt",
            "scripted": "scripted.pt",
            "pt2": "model.pt2",
            "pickle": "full.pt",
            "state_dict": "weights.pt",
            "checkpoint": "ckpt.pth",
            "onnx": "model.onnx",
            "tensor": "tensor.pt",
            "legacy_pickle": "legacy.pt",
        }.items()
    }
    torch.jit.save(torch.jit.trace(resnet, ex), str(paths["traced"]))
    torch.jit.save(torch.jit.script(resnet), str(paths["scripted"]))
    torch.export.save(torch.export.export(resnet, ex), str(paths["pt2"]))
    torch.save(resnet, paths["pickle"])
    torch.save(resnet.state_dict(), paths["state_dict"])
    torch.save({"model": resnet.state_dict(), "epoch": 3}, paths["checkpoint"])
    torch.save(torch.ones(3), paths["tensor"])
    torch.save(resnet, paths["legacy_pickle"], _use_new_zipfile_serialization=False)
    program = torch.onnx.export(resnet, ex, dynamo=True, optimize=False, verbose=False)
    onnx.save(program.model_proto, str(paths["onnx"]))
    return paths


def _check_loaded(lm: LoadedModel, fmt: str) -> None:
    assert lm.source_format == fmt
    onnx.checker.check_model(lm.model, full_check=True)
    assert next(o.version for o in lm.model.opset_import if o.domain == "") >= 17
    assert lm.inputs == [InputSpec("x", (1, 3, 32, 32), "float32")]
    dims = [d.dim_value for d in lm.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 32, 32]
    assert lm.output_names == [o.name for o in lm.model.graph.output]
    ops = Counter(n.op_type for n in lm.model.graph.node)
    assert ops["BatchNormalization"] == N_BATCHNORMS, "the exporter folded BatchNorm"
    assert not any(t.data_location == TensorProto.EXTERNAL for t in lm.model.graph.initializer)
    ort = run_onnx(lm.model, lm.probe_inputs)
    for name in lm.output_names:
        np.testing.assert_allclose(ort[name], lm.reference_outputs[name], rtol=0, atol=TOL)


@pytest.mark.parametrize(
    "key,fmt,kwargs,reference",
    [
        ("traced", "torchscript", {"input_specs": SPEC}, "TorchScript"),
        ("scripted", "torchscript", {"input_specs": SPEC}, "TorchScript"),
        ("pt2", "export", {}, "ExportedProgram"),
        ("pickle", "pickle", {"input_specs": SPEC, "trust_pickle": True}, "nn.Module"),
        ("onnx", "onnx", {}, "onnxruntime"),
    ],
)
def test_format_loads(
    files: dict[str, Path], key: str, fmt: str, kwargs: dict, reference: str
) -> None:
    lm = load_model(files[key], **kwargs)
    _check_loaded(lm, fmt)
    assert lm.source_sha256 == hashlib.sha256(files[key].read_bytes()).hexdigest()
    assert reference in lm.reference_source
    assert str(files[key]) == lm.source


def test_torch_file_reference_matches_torch(
    files: dict[str, Path], resnet: torch.nn.Module
) -> None:
    lm = load_model(files["pt2"])
    with torch.no_grad():
        expected = resnet(torch.from_numpy(lm.probe_inputs["x"])).numpy()
    np.testing.assert_allclose(lm.reference_outputs["output"], expected, rtol=0, atol=1e-6)
    assert lm.export_check is not None and lm.export_check["max_abs_diff"] <= TOL


def test_in_memory_sources(resnet: torch.nn.Module, files: dict[str, Path]) -> None:
    lm = load_model(resnet, example_inputs=resnet.example_inputs())
    _check_loaded(lm, "module")
    assert lm.source_sha256 is None
    _check_loaded(load_model(resnet, input_specs=SPEC), "module")
    _check_loaded(load_model(resnet, example_inputs={"x": resnet.example_inputs()[0]}), "module")
    _check_loaded(load_model(torch.export.load(str(files["pt2"]))), "export")
    _check_loaded(load_model(torch.jit.load(str(files["traced"])), input_specs=SPEC), "torchscript")
    proto = onnx.load(str(files["onnx"]))
    before = proto.SerializeToString()
    _check_loaded(load_model(proto), "onnx")
    assert proto.SerializeToString() == before  # the caller's proto is left alone


def test_training_mode_is_restored(resnet: torch.nn.Module) -> None:
    model = make_model("fashion_cnn").train()
    lm = load_model(model, example_inputs=model.example_inputs())
    assert model.training
    assert Counter(n.op_type for n in lm.model.graph.node)["BatchNormalization"] == 2
    # exported in eval mode: BatchNorm uses running stats, so the reference is deterministic
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(lm.probe_inputs["x"])).numpy()
    np.testing.assert_allclose(lm.reference_outputs["output"], expected, rtol=0, atol=1e-6)


def test_load_is_silent(
    resnet: torch.nn.Module, files: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    load_model(resnet, input_specs=SPEC)
    load_model(files["traced"], input_specs=SPEC)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# --- refusals ----------------------------------------------------------------------------------


def _user_error(*args: object, match: str, **kwargs: object) -> str:
    with pytest.raises(UserInputError) as info:
        load_model(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for part in match.split("|"):
        assert part in message, message
    return message


def test_pickled_module_needs_trust(files: dict[str, Path]) -> None:
    msg = _user_error(
        files["pickle"], input_specs=SPEC, match="pickled module|arbitrary code|--trust-code"
    )
    assert "tests.models.ResNetish" in msg  # listed without unpickling
    _user_error(files["legacy_pickle"], input_specs=SPEC, match="pickled module|--trust-code")


@pytest.mark.parametrize("key", ["state_dict", "checkpoint"])
def test_state_dict_is_explained(files: dict[str, Path], key: str) -> None:
    _user_error(files[key], match="state_dict|architecture|edgecc.compile(module|torch.jit.save")
    _user_error(files[key], trust_pickle=True, match="state_dict")


def test_pickled_tensor_is_not_a_model(files: dict[str, Path]) -> None:
    _user_error(files["tensor"], match="holds a Tensor, not a model")


def test_torchscript_without_shapes_asks_for_them(files: dict[str, Path]) -> None:
    _user_error(files["traced"], match="--input-shape x:")


def test_module_without_shapes_asks_for_them(resnet: torch.nn.Module) -> None:
    _user_error(resnet, match="--input-shape x:")


def test_pt2_with_pickled_members_needs_trust(files: dict[str, Path], tmp_path: Path) -> None:
    """torch.export.load unpickles members flagged use_pickle: refuse before it runs."""
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(files["pt2"]) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    _user_error(tampered, match="pickled member|--trust-code")


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("random.pt", "random", "random.pt|corrupt"),
        ("random.onnx", "random", "random.onnx|corrupt"),
        ("truncated.onnx", "truncated", "truncated.onnx|truncated"),
        ("empty.onnx", b"", "empty.onnx"),
        ("other.zip", "zip", "not a TorchScript, torch.export (.pt2) or torch.save file"),
    ],
)
def test_corrupt_files(
    files: dict[str, Path], tmp_path: Path, name: str, content: object, match: str
) -> None:
    path = tmp_path / name
    if content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif content == "truncated":
        data = files["onnx"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("a/readme.txt", "hello")
    else:
        path.write_bytes(content)
    _user_error(path, match=match)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    _user_error(tmp_path / "nope.pt", match="nope.pt|does not exist")
    _user_error(tmp_path, match="is a directory")


def test_old_opset_is_refused_for_export(resnet: torch.nn.Module) -> None:
    _user_error(resnet, input_specs=SPEC, opset=13, match="opset 13")


# --- ONNX specifics ---------------------------------------------------------------------------


def _dynamic_batch_model() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    return onnx_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", ["N", 4])],
        [tensor("y", ["N", 3])],
        {"w": w},
    )


def test_onnx_dynamic_dims_need_a_spec(tmp_path: Path) -> None:
    path = tmp_path / "dyn.onnx"
    onnx.save(_dynamic_batch_model(), str(path))
    _user_error(path, match="--input-shape x:1x4|N")
    lm = load_model(path, input_specs=[parse_input_spec("x:5x4")])
    assert lm.inputs == [InputSpec("x", (5, 4))]
    out_dims = [d.dim_value for d in lm.model.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == [5, 3]
    assert lm.reference_outputs["y"].shape == (5, 3)
    lm = load_model(path, input_specs=[parse_input_spec("5x4")])  # unnamed: by position
    assert lm.inputs == [InputSpec("x", (5, 4))]


@pytest.mark.parametrize(
    "spec,match",
    [
        ("x:5x7", "does not match"),
        ("z:5x4", "not inputs of|its inputs are: x"),
        ("x:5x4x1", "does not match"),
    ],
)
def test_onnx_spec_conflicts(tmp_path: Path, spec: str, match: str) -> None:
    path = tmp_path / "dyn.onnx"
    onnx.save(_dynamic_batch_model(), str(path))
    _user_error(path, input_specs=[parse_input_spec(spec)], match=match)


def test_onnx_old_opset_is_upgraded(tmp_path: Path) -> None:
    model = onnx_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Unsqueeze", ["r"], ["y"], axes=[0]),
        ],
        [tensor("x", [2, 3])],
        [tensor("y", [1, 2, 3])],
        opset=11,
    )
    lm = load_model(model)
    assert next(o.version for o in lm.model.opset_import if o.domain == "") == 18
    x = lm.probe_inputs["x"]
    np.testing.assert_array_equal(lm.reference_outputs["y"], np.maximum(x, 0)[None])


def test_onnx_external_data_is_inlined(files: dict[str, Path], tmp_path: Path) -> None:
    model = onnx.load(str(files["onnx"]))
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnx.save(
        model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    assert (path.parent / "weights.bin").exists()
    lm = load_model(path)
    _check_loaded(lm, "onnx")
    (path.parent / "weights.bin").unlink()
    _user_error(path, match="external data")


def test_onnx_custom_op_is_unsupported(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("FancyOp", ["r"], ["y"], domain="com.example"),
        ],
        "g",
        [tensor("x", [1, 4])],
        [tensor("y", [1, 4])],
    )
    model = helper.make_model(
        graph,
        ir_version=10,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)],
    )
    with pytest.raises(UnsupportedOperatorError, match="FancyOp"):
        load_model(model)


def test_onnx_integer_inputs_are_bounded_by_their_tables() -> None:
    table = np.arange(70, dtype=np.float32).reshape(7, 10)
    model = onnx_model(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"]),
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
            helper.make_node("Mul", ["emb", "m3"], ["y"]),
        ],
        [
            tensor("ids", [2, 50], TensorProto.INT64),
            tensor("attention_mask", [2, 50], TensorProto.INT64),
        ],
        [tensor("y", [2, 50, 10])],
        {"table": table, "axis": np.array([-1], np.int64)},
    )
    lm = load_model(model)
    ids = lm.probe_inputs["ids"]
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 7
    assert len(np.unique(ids)) == 7  # 100 draws cover a 7-row table
    assert (lm.probe_inputs["attention_mask"] == 1).all()
