"""Dynamic int8 lowering (edgecc.lower.int8_dynamic): weight-only int8 MatMul/Gemm run as
integer matmuls with activations quantized at run time.

One small graph holds every case (one compile per activation mode). References and tolerances:

* the arithmetic of the module docstring in numpy (int64 accumulation): equal up to float
  rounding of the final scale and bias (FMA contraction): rtol 1e-6, atol 1e-6;
* ONNX Runtime on the same weight-only graph (float activations, optimisations off): activation
  rounding moves each output by at most ``(s_x / 2) * sum_k |W[k, n]|`` (per-row ``s_x``), so
  every element is checked against that bound (+1e-5), and cosine >= 0.9999 per output;
* ONNX Runtime's own ``quantize_dynamic`` model of the float graph (per-channel int8 weights,
  per-tensor uint8 activations, ``reduce_range=True``) against edgecc's ``per-tensor`` mode
  compiled with that model's weights: the same arithmetic, equal up to float rounding (rtol
  1e-6, atol 1e-5). ``reduce_range`` (7-bit weights) because on an AVX2 machine without VNNI
  ONNX Runtime's u8 x s8 kernel adds products in pairs in int16 and saturates with full-range
  weights (measured here: up to 7.0 off on N(0, 1) weights, 0.26 on this graph's); with weights
  in [-64, 64] no pair can reach 2^15, and its outputs equal the int64 reference exactly.

Libraries run in this process (TVM's VM), not through the runner subprocess: one TVM import.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from lower_models import make_model
from onnx import TensorProto, helper, numpy_helper

from edgecc.lower import lower
from edgecc.lower.int8_dynamic import MAX_K, METADATA_KEY, fingerprint, onnx_weight_nodes
from edgecc.passes import PassContext
from edgecc.passes.quantize_dynamic import QuantizeDynamic
from edgecc.report.compare import run_onnx
from edgecc.targets import get_target

F32 = np.float32

# (case, x shape, K, N, op, bias): odd sizes, M = 1, N = 1, 2-D and 3-D activations
CASES = [
    ("mm2d", [5, 37], 37, 29, "MatMul", True),
    ("mm3d", [2, 7, 40], 40, 24, "MatMul", False),
    ("gemm_t", [6, 33], 33, 17, "GemmT", True),
    ("gemm", [3, 19], 19, 12, "Gemm", False),
    ("row", [1, 1, 64], 64, 1, "MatMul", False),
]
SHARED = "shared"  # a second MatMul reading mm3d's input: one quantize kernel for both
PER_TENSOR = "gemm"  # this case's weight gets one scale (per-tensor), the others per-channel


def _float_graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inputs, outputs, inits = [], [], [], []
    for tag, xshape, k, n, op, bias in CASES:
        x = f"{tag}_x"
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, xshape))
        w = rng.standard_normal((n, k) if op == "GemmT" else (k, n)).astype(F32) * 0.2
        inits.append(numpy_helper.from_array(w, f"{tag}_w"))
        ins = [x, f"{tag}_w"]
        y = f"{tag}_y"
        if op == "MatMul":
            nodes.append(helper.make_node("MatMul", ins, [f"{tag}_mm"], name=f"{tag}_mm"))
            if bias:
                inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(F32), "b"))
                nodes.append(helper.make_node("Add", [f"{tag}_mm", "b"], [y], name=f"{tag}_add"))
            else:
                nodes[-1].output[0] = y
        else:
            if bias:
                inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(F32), "c"))
                ins.append("c")
            nodes.append(
                helper.make_node("Gemm", ins, [y], name=f"{tag}_mm", transB=int(op == "GemmT"))
            )
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [*xshape[:-1], n]))
    w2 = rng.standard_normal((40, 8)).astype(F32)
    inits.append(numpy_helper.from_array(w2, f"{SHARED}_w"))
    nodes.append(helper.make_node("MatMul", ["mm3d_x", f"{SHARED}_w"], ["shared_y"], name=SHARED))
    outputs.append(helper.make_tensor_value_info("shared_y", TensorProto.FLOAT, [2, 7, 8]))
    return make_model(nodes, inputs, outputs, inits)


def _per_tensor(model: onnx.ModelProto, tag: str) -> None:
    """Give ``tag``'s weight one scale (max |W| / 127) instead of one per column, in place."""
    inits = {i.name: i for i in model.graph.initializer}
    q = numpy_helper.to_array(inits[f"{tag}_w_quantized"]).astype(F32)
    s = numpy_helper.to_array(inits[f"{tag}_w_scale"])
    w = q * s
    scale = F32(np.abs(w).max() / 127)
    for name, value in (
        (f"{tag}_w_quantized", np.clip(np.round(w / scale), -127, 127).astype(np.int8)),
        (f"{tag}_w_scale", np.array(scale, F32)),
        (f"{tag}_w_zero_point", np.array(0, np.int8)),
    ):
        inits[name].CopyFrom(numpy_helper.from_array(value, name))


def _quantized(mode: str, weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """The ``dynamic-quant`` graph (``weights``: replacement initializers by name)."""
    model = QuantizeDynamic(activations=mode)(_float_graph(), PassContext()).model
    _per_tensor(model, PER_TENSOR)
    for init in model.graph.initializer:
        if init.name in (weights or {}):
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    return model


def _ort_model(folder) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """ONNX Runtime's ``quantize_dynamic`` model of the float graph (per-channel, 7-bit
    weights) and its weights renamed as the ``dynamic-quant`` graph's initializers."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    source, out = folder / "float.onnx", folder / "ort.onnx"
    onnx.save(_float_graph(), str(source))
    quantization.quantize_dynamic(
        str(source),
        str(out),
        per_channel=True,
        reduce_range=True,
        weight_type=quantization.QuantType.QInt8,
    )
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = {}
    for tag, *_, op, _ in CASES:
        if tag == PER_TENSOR:
            continue
        prefix = f"{tag}_w_Transposed" if op == "GemmT" else f"{tag}_w"
        q = inits[f"{prefix}_quantized"]
        weights[f"{tag}_w_quantized"] = q.T.copy() if op == "GemmT" else q
        weights[f"{tag}_w_scale"] = inits[f"{prefix}_scale"]
    weights[f"{SHARED}_w_quantized"] = inits[f"{SHARED}_w_quantized"]
    weights[f"{SHARED}_w_scale"] = inits[f"{SHARED}_w_scale"]
    return model, weights


_VMS: dict[str, object] = {}


def _run(library, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Run an x86 library in this process (outputs by name, in the graph's order)."""
    import tvm
    from tvm import relax

    key = str(library)
    if key not in _VMS:
        _VMS[key] = relax.VirtualMachine(tvm.runtime.load_module(key), tvm.cpu())
    out = _VMS[key]["main"](*(tvm.runtime.tensor(a) for a in feeds.values()))
    values = [out] if len(names) == 1 else list(out)
    return {n: v.numpy() for n, v in zip(names, values, strict=True)}


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {
        i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input
    }


def _feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {k: (rng.standard_normal(v) * 2).astype(F32) for k, v in _shapes(model).items()}
    x = feeds["mm2d_x"]
    x[0] = 0.0  # an all-zero row: scale 1, zero point 0
    x[1] = np.abs(x[1])  # a row without negatives: zero point 0
    x[2] = -np.abs(x[2])  # a row without positives: zero point 255
    x[3, :4] = 0.5  # ties
    return feeds


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    ort_model, ort_weights = _ort_model(tmp_path_factory.mktemp("ort"))
    out = {"ort": ort_model}
    for mode in ("per-row", "per-tensor"):
        model = _quantized(mode, ort_weights if mode == "per-tensor" else None)
        shapes = _shapes(model)
        path = tmp_path_factory.mktemp(mode) / "m.so"
        lib = lower(model, get_target("x86"), shapes, dict.fromkeys(shapes, "float32"), path)
        out[mode] = (model, lib)
    return out


def _weights(model: onnx.ModelProto, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """``tag``'s int8 weight as ``[K, N]`` and its scale (scalar or ``[N]``)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q, s = inits[f"{tag}_w_quantized"], inits[f"{tag}_w_scale"]
    transposed = any(op == "GemmT" for t, *_, op, _ in CASES if t == tag)
    return (q.T if transposed else q), s


def reference(x: np.ndarray, q: np.ndarray, s_w: np.ndarray, per_tensor: bool) -> np.ndarray:
    """The module docstring's arithmetic in numpy (exact integer products in int64)."""
    axis = None if per_tensor else -1
    lo = np.minimum(x.min(axis=axis, keepdims=True), F32(0))
    hi = np.maximum(x.max(axis=axis, keepdims=True), F32(0))
    span = (hi - lo).astype(F32)
    s_x = np.where(span == 0, F32(1), span / F32(255)).astype(F32)
    z_x = np.clip(np.round(F32(0) - lo / s_x), 0, 255).astype(F32)
    x_q = np.clip(np.round(x / s_x) + z_x, 0, 255).astype(np.int64)
    acc = np.matmul(x_q, q.astype(np.int64)) - z_x.astype(np.int64) * q.astype(np.int64).sum(0)
    return acc.astype(F32) * (s_x * s_w).astype(F32)


def _bias(model: onnx.ModelProto, tag: str) -> np.ndarray:
    bias = {t: b for t, *_, b in CASES}.get(tag)
    if not bias:
        return np.zeros((), F32)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return inits["b" if tag == "mm2d" else "c"]


def _inputs_of(tag: str) -> str:
    return "mm3d_x" if tag == SHARED else f"{tag}_x"


TAGS = [c[0] for c in CASES] + [SHARED]


@pytest.mark.parametrize("mode", ["per-row", "per-tensor"])
def test_matches_the_integer_arithmetic(libraries, mode: str) -> None:
    model, lib = libraries[mode]
    feeds = _feeds(model)
    names = [o.name for o in model.graph.output]
    got = _run(lib.path, feeds, names)
    for tag in TAGS:
        q, s = _weights(model, tag)
        want = reference(feeds[_inputs_of(tag)], q, s, mode == "per-tensor") + _bias(model, tag)
        np.testing.assert_allclose(got[f"{tag}_y"], want, rtol=1e-6, atol=1e-6, err_msg=tag)


def test_within_the_activation_rounding_bound_of_the_float_graph(libraries) -> None:
    model, lib = libraries["per-row"]
    feeds = _feeds(model)
    names = [o.name for o in model.graph.output]
    got = _run(lib.path, feeds, names)
    ref = run_onnx(model, feeds)  # ONNX Runtime, optimisations off, float activations
    for tag in TAGS:
        x = feeds[_inputs_of(tag)]
        q, s = _weights(model, tag)
        lo = np.minimum(x.min(axis=-1, keepdims=True), 0)
        s_x = (np.maximum(x.max(axis=-1, keepdims=True), 0) - lo) / 255
        bound = s_x / 2 * (np.abs(q.astype(np.float64)) * s).sum(axis=0) + 1e-5
        a, b = got[f"{tag}_y"], ref[f"{tag}_y"]
        assert np.all(np.abs(a - b) <= bound), (tag, float(np.max(np.abs(a - b) - bound)))
        cos = float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))
        assert cos >= 0.9999, (tag, cos)


def test_equals_onnxruntime_quantize_dynamic(libraries) -> None:
    model, lib = libraries["per-tensor"]
    ort_model = libraries["ort"]
    assert any(n.op_type == "DynamicQuantizeLinear" for n in ort_model.graph.node)
    feeds = _feeds(model)
    names = [o.name for o in model.graph.output]
    got = _run(lib.path, feeds, names)
    ref = run_onnx(ort_model, feeds)
    for tag in TAGS:
        if tag == PER_TENSOR:  # ORT's weights there are per-channel, edgecc's per-tensor
            continue
        name = f"{tag}_y"
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, atol=1e-5, err_msg=tag)


def test_every_matmul_is_integer_and_reported(libraries) -> None:
    model, lib = libraries["per-row"]
    facts = lib.details["int8_dynamic"]
    assert facts["activations"] == "per-row" and facts["declined"] == []
    layers = {row["node"]: row for row in facts["layers"]}
    assert set(layers) == {f"{t}_mm" for t, *_ in CASES} | {SHARED}
    assert layers[f"{PER_TENSOR}_mm"]["weight"] == "per-tensor"
    assert layers["mm2d_mm"]["weight"] == "per-channel"
    assert layers["gemm_t_mm"]["shape"] == [6, 33, 17]  # [rows..., K, N], Gemm transB=1
    kernels = lib.details["schedules"]["kernels"]
    for row in layers.values():
        assert row["kernel"] in kernels and row["rule"] == kernels[row["kernel"]], row
        assert row["rule"] != "none", row
    ranges = [k for k in kernels if k.startswith("dynamic_quantize_range")]
    rounding = [k for k in kernels if k.startswith("dynamic_quantize_act")]
    assert len(ranges) == len(rounding) == len(CASES)  # mm3d's input quantized once for two
    assert all(kernels[k] in ("reduction", "row-reduction") for k in ranges), kernels
    assert all(kernels[k] == "elementwise" for k in rounding), kernels
    json.dumps(facts)  # goes into the manifest


def test_library_stores_int8_weights(tmp_path) -> None:
    """One 512 x 512 weight: the float build stores it dequantized (1 MiB of float32), the
    integer build as int8 (256 KiB), so the library shrinks by about 3/4 of the float bytes."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((512, 512)).astype(F32)
    graph = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 512])],
        [numpy_helper.from_array(w, "w")],
    )
    sizes = {}
    for mode in ("float", "per-row"):
        model = onnx.ModelProto()
        model.CopyFrom(graph)  # the pass edits its input in place
        model = QuantizeDynamic(activations=mode)(model, PassContext()).model
        lib = lower(
            model, get_target("x86"), {"x": (4, 512)}, {"x": "float32"}, tmp_path / f"{mode}.so"
        )
        assert ("int8_dynamic" in lib.details) == (mode != "float")  # float: the old lowering
        sizes[mode] = lib.path.stat().st_size
    assert sizes["float"] - sizes["per-row"] >= 0.6 * w.nbytes, sizes


def test_declines_what_it_cannot_run_as_integers(tmp_path) -> None:
    rng = np.random.default_rng(2)
    w = rng.integers(-127, 128, (8, 6)).astype(np.int8)
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.full(6, 0.01, F32), "s"),
        numpy_helper.from_array(np.zeros(6, np.int8), "z"),
        numpy_helper.from_array(np.full(8, 0.01, F32), "s_k"),
        numpy_helper.from_array(np.zeros(8, np.int8), "z_k"),
        numpy_helper.from_array(np.ones(6, np.int8), "z1"),
        numpy_helper.from_array(np.array(0.02, F32), "s_a"),
        numpy_helper.from_array(np.array(128, np.uint8), "z_a"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wd"], axis=1, name="dq"),
        helper.make_node("DequantizeLinear", ["w", "s_k", "z_k"], ["wk"], axis=0, name="dqk"),
        helper.make_node("DequantizeLinear", ["w", "s", "z1"], ["w1"], axis=1, name="dq1"),
        helper.make_node("MatMul", ["wd", "a"], ["first"], name="weight_first"),
        helper.make_node("MatMul", ["b", "wk"], ["along_k"], name="scales_along_k"),
        helper.make_node("MatMul", ["b", "w1"], ["zp"], name="zero_point_1"),
        # static QDQ (activation quantized by the graph): edgecc.lower.int8's, not matched here
        helper.make_node("QuantizeLinear", ["b", "s_a", "z_a"], ["bq"], name="q_act"),
        helper.make_node("DequantizeLinear", ["bq", "s_a", "z_a"], ["bd"], name="dq_act"),
        helper.make_node("MatMul", ["bd", "wk"], ["static"], name="static_qdq"),
    ]
    model = make_model(
        nodes,
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [6, 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [4, 8]),
        ],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
            for n, s in (("first", [8, 3]), ("along_k", [4, 6]), ("zp", [4, 6]), ("static", [4, 6]))
        ],
        inits,
    )
    shapes = {"a": (6, 3), "b": (4, 8)}
    lib = lower(
        model, get_target("x86"), shapes, dict.fromkeys(shapes, "float32"), tmp_path / "m.so"
    )
    facts = lib.details["int8_dynamic"]
    assert facts["int8_matmuls"] == 0
    reasons = sorted(d["reason"] for d in facts["declined"])
    assert reasons == sorted(
        [
            "the weight is the first operand (W @ x)",
            "per-channel scales along K (not one scale per output column)",
            "weight zero point is not 0",
        ]
    )
    feeds = {k: rng.standard_normal(v).astype(F32) for k, v in shapes.items()}
    got = _run(lib.path, feeds, ["first", "along_k", "zp", "static"])
    ref = run_onnx(model, feeds)
    for name, value in ref.items():  # still right: the float lowering
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_weight_fingerprints_name_the_onnx_nodes() -> None:
    model = _quantized("per-row")
    names = onnx_weight_nodes(model)
    q, _ = _weights(model, "gemm_t")
    assert names[fingerprint(q)] == ["gemm_t_mm"]
    assert {p.key: p.value for p in model.metadata_props}[METADATA_KEY] == "per-row"
    assert MAX_K == 66311  # K * 255 * 127 < 2^31


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_tiny_transformer_end_to_end(tmp_path, capsys) -> None:
    """``edgecc compile --passes dynamic-quant``: every Linear runs as an integer matmul, the
    package passes its own ``run --check`` (the dynamic-int8 rule) and stays within cosine
    0.999 of torch (activation and weight rounding: measured 0.99997)."""
    import torch

    from edgecc.cli import main
    from edgecc.package import Package
    from tests.models import make_model as make_torch_model

    net = make_torch_model("tiny_transformer")
    (ids,) = net.example_inputs()
    source = tmp_path / "t.onnx"
    torch.onnx.export(net, (ids,), str(source), input_names=["input_ids"], dynamo=False)
    out = tmp_path / "pkg"
    spec = "input_ids:1x16:int64"
    args = ["-q", "compile", source, "--target", "x86", "--input-shape", spec, "-o", out]
    assert main([str(a) for a in [*args, "--passes", "dynamic-quant"]]) == 0
    pkg = Package(out)
    facts = pkg.manifest["library"]["int8_dynamic"]
    linears = sum(isinstance(m, torch.nn.Linear) for m in net.modules())
    assert facts["int8_matmuls"] == linears and not facts["declined"], facts
    assert pkg.manifest["check"]["kind"] == "dynamic-int8"
    capsys.readouterr()
    # --min-cosine: against torch's outputs on the probe input, recorded at compile time
    assert main(["--json", "run", str(out), "--check", "--min-cosine", "0.999"]) == 0
    assert json.loads(capsys.readouterr().out)["check"]["passed"]
    assert main(["inspect", str(out)]) == 0
    assert f"int8 dyn  {linears} MatMul/Gemm" in capsys.readouterr().out


def test_activations_option_is_recorded_and_checked() -> None:
    from edgecc.errors import UserInputError
    from edgecc.passes import PassManager, parse_pipeline

    out = PassManager(parse_pipeline("dynamic-quant(activations=per-tensor)")).run(_float_graph())
    assert {p.key: p.value for p in out.metadata_props}[METADATA_KEY] == "per-tensor"
    with pytest.raises(UserInputError, match="activations=nope must be one of per-row"):
        QuantizeDynamic(activations="nope")
