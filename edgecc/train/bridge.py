"""ONNX <-> torch bridge: a trainable torch module of an ONNX graph, and the weights written back.

Why onnx2torch: it is maintained (ENOT-AutoDL, releases through 2024), covers the operators our
exporters emit (Conv, Gemm, MatMul, BatchNorm, LayerNormalization, Gather, Erf, Softmax, Reshape,
Slice, ...), builds a ``torch.fx.GraphModule`` whose submodules are named after the ONNX nodes
and, with ``attach_onnx_mapping=True``, records for each submodule the ONNX tensor names it reads
and writes. That mapping is what this module needs twice: to write trained weights back into
the ONNX initializers, and to hook intermediate tensors by their ONNX names (feature
distillation). It is installed with ``--no-deps``: it declares torchvision, which cannot be
installed beside our torch; only its NMS and RoiAlign converters import torchvision, and
:func:`import_onnx2torch` puts a stub in ``sys.modules`` around the import so that converting
those two operators fails with a clear message instead.

Where the weights live after conversion (``onnx2torch`` 1.5):

- Conv/ConvTranspose, BatchNormalization, LayerNormalization, InstanceNormalization with
  constant parameters become ``nn`` modules: ``weight = input[1]``, ``bias = input[2]`` as is;
- Gemm with constant B (and C) becomes ``nn.Linear``: ``weight = alpha * (B if transB else B^T)``,
  ``bias = beta * C``; written back as ``B = weight / alpha`` (transposed back) and
  ``C = bias / beta``;
- every other initializer becomes a buffer ``initializers.onnx_initializer_<k>``, numbered in
  the order the nodes read them (a new buffer per use: shared initializers are tied here).

Trainable: float initializers of more than one element (weights, biases, embeddings, norm
scales); scalars (scales like ``1/sqrt(d)``, exponents, epsilons) and BatchNorm running
statistics stay fixed. The module runs in eval mode (BatchNorm uses its running statistics).

Batch: exports fix the batch dimension in Reshape targets (``[1, 784]``). For training in
batches the training copy of the graph gets a symbolic batch dimension and Reshape targets whose
first entry equals the fixed batch get ``0`` ("copy that dimension"); :meth:`TorchGraph.check`
compares the batched module with the ONNX graph run one sample at a time, and callers fall back
to the graph's own batch size when that rewrite does not hold.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgecc.errors import PassError, UserInputError

logger = logging.getLogger(__name__)

FLOAT_TYPES = (onnx.TensorProto.FLOAT,)
# op type -> {input index: torch parameter name} for converters that absorb their constants
ABSORBED = {
    "Conv": {1: "weight", 2: "bias"},
    "ConvTranspose": {1: "weight", 2: "bias"},
    "BatchNormalization": {1: "weight", 2: "bias"},
    "LayerNormalization": {1: "weight", 2: "bias"},
    "InstanceNormalization": {1: "weight", 2: "bias"},
}


class _TorchvisionStub(types.ModuleType):
    """Stands in for torchvision while onnx2torch imports (only its NMS/RoiAlign need it)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _TorchvisionStub(f"{self.__name__}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UserInputError(
            "this graph has a NonMaxSuppression or RoiAlign node: converting it to torch needs "
            "torchvision, which cannot be installed beside edgecc's torch"
        )


@contextlib.contextmanager
def _torchvision_stub() -> Iterator[None]:
    names = ["torchvision", "torchvision.ops"]
    saved = {n: sys.modules.get(n) for n in names}
    if saved["torchvision"] is None:
        root = _TorchvisionStub("torchvision")
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = root, root.ops
    try:
        yield
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)


def import_onnx2torch() -> Any:
    """The ``onnx2torch`` module, imported with a torchvision stub (see the module docstring)."""
    with _torchvision_stub():
        try:
            import onnx2torch
        except ImportError as err:
            raise UserInputError(
                f"training passes need onnx2torch (pip install --no-deps onnx2torch): {err}"
            ) from err
    from edgecc.train.converters import register_converters

    register_converters()
    return onnx2torch


@dataclass
class _Weight:
    """One ONNX initializer and the torch parameter that holds it."""

    onnx_name: str
    param: Any  # torch.nn.Parameter
    to_onnx: Callable[[np.ndarray], np.ndarray]


def batch_free(model: onnx.ModelProto, batched: bool = True) -> onnx.ModelProto:
    """The copy of ``model`` that is converted to torch.

    Reshapes with a constant target and no ``0`` in it lose ``allowzero=1`` (it changes nothing
    there, and onnx2torch refuses it). With ``batched``, the inputs get a symbolic batch
    dimension and Reshape targets whose first entry equals the fixed batch get ``0``.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name for t in model.graph.initializer}
    batches = set()
    for inp in out.graph.input if batched else ():
        if inp.name in inits or not inp.type.tensor_type.shape.dim:
            continue
        dim = inp.type.tensor_type.shape.dim[0]
        if dim.HasField("dim_value"):
            batches.add(dim.dim_value)
        dim.Clear()
        dim.dim_param = "batch"
    batch = next(iter(batches)) if len(batches) == 1 else None
    if batched:
        del out.graph.value_info[:]
        for o in out.graph.output:
            if o.type.tensor_type.shape.dim:
                o.type.tensor_type.shape.dim[0].Clear()
                o.type.tensor_type.shape.dim[0].dim_param = "batch"
    by_name = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type != "Reshape" or node.input[1] not in by_name:
            continue
        target = numpy_helper.to_array(by_name[node.input[1]]).copy()
        if target.ndim != 1 or (target == 0).any():
            continue
        for i in reversed(range(len(node.attribute))):
            if node.attribute[i].name == "allowzero":
                del node.attribute[i]
        if batch is not None and target.size and target[0] == batch:
            target[0] = 0
            name = f"{node.input[1]}_batch_free_{node.name}"
            out.graph.initializer.append(numpy_helper.from_array(target, name))
            node.input[1] = name
    return out


class TorchGraph:
    """A torch module computing an ONNX graph, with its weights mapped to the initializers.

    Args:
        model: the ONNX graph (not modified).
        trainable: True to make the weights (see the module docstring) ``nn.Parameter``s.
        batched: give the module a free batch dimension (:func:`batch_free`).
    """

    def __init__(self, model: onnx.ModelProto, trainable: bool = True, batched: bool = True):
        import torch

        onnx2torch = import_onnx2torch()
        from onnx2torch.onnx_graph import OnnxGraph, ValueType

        self.model = model
        # onnx2torch's Slice indexes with a list (a torch deprecation warning, harmless here)
        warnings.filterwarnings(
            "ignore", message="Using a non-tuple sequence", category=UserWarning
        )
        source = batch_free(model, batched)
        try:
            self.module = onnx2torch.convert(source, attach_onnx_mapping=True).eval()
        except NotImplementedError as err:
            raise UserInputError(f"cannot make this graph trainable (onnx2torch): {err}") from err
        inits = {t.name: t for t in model.graph.initializer}
        graph = OnnxGraph(onnx2torch.utils.safe_shape_inference.safe_shape_inference(source).graph)
        self.weights: dict[str, _Weight] = {}
        self.outputs: dict[str, Any] = {}  # ONNX tensor name -> submodule writing it
        container = getattr(self.module, "initializers", None)  # absent when nothing reads it
        buffer_index = 0
        retarget: dict[str, str] = {}
        for (name, _node), proto in zip(graph.nodes.items(), source.graph.node, strict=True):
            sub = self.module.get_submodule(name)
            mapping = sub.onnx_mapping
            if len(mapping.outputs) == 1:
                self.outputs[mapping.outputs[0]] = sub
            for value in mapping.inputs:
                if graph.value_type(value) != ValueType.GRAPH_INITIALIZER:
                    continue
                buf = f"onnx_initializer_{buffer_index}"
                buffer_index += 1
                if value not in inits:  # the batch-free Reshape targets: not trained
                    continue
                if value in self.weights:
                    retarget[buf] = self.weights[value].param_name  # type: ignore[attr-defined]
                    continue
                if trainable and _trainable(inits[value]):
                    tensor = getattr(container, buf)
                    delattr(container, buf)
                    param = torch.nn.Parameter(tensor.clone())
                    container.register_parameter(buf, param)
                    w = _Weight(value, param, lambda a: a)
                    w.param_name = buf  # type: ignore[attr-defined]
                    self.weights[value] = w
            if trainable:
                self._absorbed(proto, sub, inits)
        for node in self.module.graph.nodes:  # shared initializers: one parameter
            if node.op == "get_attr" and node.target.split(".")[-1] in retarget:
                node.target = f"initializers.{retarget[node.target.split('.')[-1]]}"
        self.module.recompile()
        for p in self.module.parameters():
            if not any(p is w.param for w in self.weights.values()):
                p.requires_grad_(False)
        self.input_names = [i.name for i in model.graph.input if i.name not in inits]
        self.output_names = [o.name for o in model.graph.output]

    def _absorbed(self, proto: onnx.NodeProto, sub: Any, inits: Mapping[str, Any]) -> None:
        """Map the parameters an ``nn`` module took from the node's initializers."""
        import torch

        roles: dict[int, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
            k: (v, lambda a: a) for k, v in ABSORBED.get(proto.op_type, {}).items()
        }
        if proto.op_type == "Gemm" and isinstance(sub, torch.nn.Linear):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in proto.attribute}
            alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
            trans_b = bool(attrs.get("transB", 0))
            roles = {1: ("weight", lambda a: (a if trans_b else a.T) / alpha)}
            roles[2] = ("bias", lambda a: a / beta)
        for k, (attr, to_onnx) in roles.items():
            param = getattr(sub, attr, None)
            if k >= len(proto.input) or not isinstance(param, torch.nn.Parameter):
                continue
            name = proto.input[k]
            if name not in inits or not _trainable(inits[name]) or name in self.weights:
                param.requires_grad_(False)  # shared with another node's copy: kept fixed
                continue
            self.weights[name] = _Weight(name, param, to_onnx)

    def parameters(self) -> list[Any]:
        """The trainable parameters."""
        return [w.param for w in self.weights.values()]

    @contextlib.contextmanager
    def capture(self, names: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Record the tensors called ``names`` (outputs of single-output nodes) while inside."""
        seen: dict[str, Any] = {}
        handles = []
        for name in names:

            def hook(_m: Any, _i: Any, out: Any, name: str = name) -> None:
                seen[name] = out

            handles.append(self.outputs[name].register_forward_hook(hook))
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()

    def __call__(self, feeds: Mapping[str, Any]) -> Any:
        """Run on torch tensors by input name; returns the first output."""
        out = self.module(*[feeds[n] for n in self.input_names])
        return out[0] if isinstance(out, (list, tuple)) else out

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` with every mapped initializer replaced by the trained value (in place)."""
        by_name = {t.name: t for t in model.graph.initializer}
        for name, w in self.weights.items():
            old = by_name[name]
            value = w.to_onnx(w.param.detach().cpu().numpy().astype(np.float32))
            new = numpy_helper.from_array(np.ascontiguousarray(value.reshape(old.dims)), name)
            old.CopyFrom(new)
        return model


def _trainable(tensor: onnx.TensorProto) -> bool:
    size = int(np.prod(tensor.dims)) if tensor.dims else 1
    return tensor.data_type in FLOAT_TYPES and size > 1


def check_write_back(
    model: onnx.ModelProto,
    student: TorchGraph,
    feeds: Mapping[str, np.ndarray],
    tolerance: float = 1e-4,
) -> float:
    """Max abs difference of ORT on the written-back ``model`` vs the torch module, checked.

    Raises:
        PassError: the difference exceeds ``tolerance * max(1, max |torch output|)``.
    """
    import torch

    from edgecc.report.compare import run_onnx

    ort_first = run_onnx(model, dict(feeds))[model.graph.output[0].name]
    with torch.no_grad():
        ref = student({k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}).numpy()
    diff = float(np.max(np.abs(ort_first - ref))) if ref.size else 0.0
    limit = tolerance * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    if not diff <= limit:
        raise PassError(
            f"trained weights written back to ONNX disagree with the torch module: max abs diff "
            f"{diff:.3g} > {limit:.3g}"
        )
    return diff
