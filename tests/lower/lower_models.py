"""Small ONNX graphs built in code for the lowering tests (each compiles in well under a second)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), functions=(), opsets=()) -> onnx.ModelProto:
    """A checked model from helper parts, default opset 17 plus any extra ``(domain, version)``."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    imports = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in opsets]
    model = helper.make_model(graph, opset_imports=imports, functions=list(functions))
    if not any(d not in ("", "ai.onnx") for d, _ in opsets):
        onnx.checker.check_model(model, full_check=True)
    return model


def conv_net() -> onnx.ModelProto:
    """x[1,3,16,16] -> Conv(8, 3x3) -> BatchNorm -> Relu -> GlobalAveragePool -> y[1,8,1,1]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, 8).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn"
        ),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 1, 1])
    return make_model(nodes, [x], [y], inits)


def two_in_two_out() -> onnx.ModelProto:
    """a[2,3], b[3,4] -> (MatMul(a, b) [2,4], Softmax(a) [2,3]): input order and tuple outputs."""
    nodes = [
        helper.make_node("MatMul", ["a", "b"], ["mm"], name="matmul"),
        helper.make_node("Softmax", ["a"], ["sm"], name="softmax", axis=-1),
    ]
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 4]),
    ]
    outputs = [
        helper.make_tensor_value_info("mm", TensorProto.FLOAT, [2, 4]),
        helper.make_tensor_value_info("sm", TensorProto.FLOAT, [2, 3]),
    ]
    return make_model(nodes, inputs, outputs)


def feeds_for(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 inputs for every graph input, in the model's input order."""
    rng = np.random.default_rng(seed)
    return {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(
            np.float32
        )
        for i in model.graph.input
    }


def shapes_of(model: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """``(input_shapes, input_dtypes)`` as :func:`edgecc.lower.lower` takes them."""
    shapes = {
        i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input
    }
    return shapes, dict.fromkeys(shapes, "float32")


def fused_kernels(model: onnx.ModelProto, target_name: str = "x86") -> dict:
    """The fused TIR kernels of ``model`` as :func:`edgecc.lower.lower` offers them to the
    schedule rules and the tuning (name -> PrimFunc), lowered for ``target_name``."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from edgecc.lower.build import import_relax
    from edgecc.lower.schedules import CpuParams, pre_legalize_passes
    from edgecc.lower.tune import _kernels, tuning_target
    from edgecc.targets import get_target

    target = get_target(target_name)
    shapes, dtypes = shapes_of(model)
    mod = import_relax(model, shapes, dtypes, lambda _: None)
    tvm_target = tuning_target(target)
    with tvm_target:  # _pipeline up to the schedule rules, where the record pass runs
        mod = tvm.transform.Sequential(
            [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                *cpu.library_dispatch_passes(tvm_target),
                *pre_legalize_passes(CpuParams.of(target)),
                *cpu.legalize_passes(tvm_target),
                relax.transform.AttachAttrLayoutFreeBuffers(),
            ]
        )(mod)
    return {name: func for name, (_, func) in _kernels(mod).items()}
