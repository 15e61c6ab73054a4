"""QDQ graphs built in code for the int8 lowering tests, and running them with TVM and ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

NP = {"int8": np.int8, "uint8": np.uint8, "int32": np.int32}


class QdqGraph:
    """A QDQ ONNX graph under construction.

    ``exact=True`` picks power-of-two scales and small integers, so ONNX Runtime's float
    reference is itself exact and an integer kernel must match it bit for bit; ``exact=False``
    picks arbitrary float scales (the reference then rounds its float sums).
    """

    def __init__(self, exact: bool, seed: int = 0):
        self.exact = exact
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.steps: dict[str, float] = {}  # output -> its quantization step (0: float output)
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, value: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def input(self, shape: list[int]) -> str:
        name = self.name("in")
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name

    def scale(self, size: int | None = None) -> np.ndarray:
        shape = () if size is None else (size,)
        if self.exact:
            return (2.0 ** -self.rng.integers(3, 7, shape)).astype(np.float32)
        return self.rng.uniform(0.004, 0.03, shape).astype(np.float32)

    def q(self, x: str, s: float, zp: int, dtype: str) -> str:
        return self.node(
            "QuantizeLinear", [x, self.const(np.float32(s)), self.const(NP[dtype](zp))]
        )

    def dq(self, q: str, s: float, zp: int, dtype: str) -> str:
        return self.node(
            "DequantizeLinear", [q, self.const(np.float32(s)), self.const(NP[dtype](zp))]
        )

    def qdq(self, x: str, dtype: str = "uint8", zp: int = 0, s: float | None = None) -> tuple:
        """``DQ(Q(x))`` with its parameters (returns the DQ output and ``(s, zp, dtype)``)."""
        s = float(self.scale()) if s is None else s
        return self.dq(self.q(x, s, zp, dtype), s, zp, dtype), (s, zp, dtype)

    def weight(self, shape: list[int], axis: int | None, dtype: str = "int8", zp: int = 0) -> tuple:
        """A constant int weight read through DQ (per channel along ``axis``, or per tensor)."""
        lo, hi = (-127, 128) if dtype == "int8" else (0, 256)
        w = self.rng.integers(lo, hi, shape).astype(NP[dtype])
        if axis is None:
            s = self.scale()
            out = self.node(
                "DequantizeLinear", [self.const(w), self.const(s), self.const(NP[dtype](zp))]
            )
            return out, np.full(shape[0], s, np.float32)
        s = self.scale(shape[axis])
        z = np.full(shape[axis], zp, NP[dtype])
        out = self.node(
            "DequantizeLinear", [self.const(w), self.const(s), self.const(z)], axis=axis
        )
        return out, s

    def bias(self, s_x: float, s_w: np.ndarray) -> str:
        """An int32 bias read through DQ with scale ``s_x * s_w`` (the QDQ convention)."""
        b = self.rng.integers(-2000, 2000, s_w.shape).astype(np.int32)
        scale = (np.float32(s_x) * s_w).astype(np.float32)
        return self.node(
            "DequantizeLinear",
            [self.const(b), self.const(scale), self.const(np.zeros_like(b))],
            axis=0,
        )

    def output_q(self, y: str, dtype: str = "uint8", zp: int = 0) -> str:
        """Quantize ``y`` for the output (its DQ is the graph output; the step is recorded)."""
        s = float(self.scale()) * 4
        out, _ = self.qdq(y, dtype, zp, s)
        self.outputs.append(out)
        self.steps[out] = s
        return out

    def output_float(self, y: str) -> None:
        self.outputs.append(y)
        self.steps[y] = 0.0

    def model(self) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in self.outputs]
        graph = helper.make_graph(self.nodes, "int8", self.inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=10)
        model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model)
        return model


def input_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {
        i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input
    }


def feeds(model: onnx.ModelProto, seed: int = 1, scale: float = 1.5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: (rng.standard_normal(v) * scale).astype(np.float32)
        for k, v in input_shapes(model).items()
    }


def ort_run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime with graph optimisations off (its fusions would change the reference)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def tvm_build(model: onnx.ModelProto, out_dir: Path, target: str = "x86"):
    """Lower ``model`` with edgecc for ``target``; returns (the VM main function, build details)."""
    import tvm
    from tvm import relax

    from edgecc.lower.build import lower
    from edgecc.targets import get_target

    shapes = input_shapes(model)
    lib = lower(
        model, get_target(target), shapes, dict.fromkeys(shapes, "float32"), out_dir / "lib.so"
    )
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib.path)), tvm.cpu())

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        got = vm["main"](*[tvm.runtime.tensor(inputs[i.name]) for i in model.graph.input])
        if hasattr(got, "numpy"):
            return [got.numpy()]
        return [g.numpy() for g in got]

    return run, lib.details
