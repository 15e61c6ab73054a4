"""Dynamic int8 MatMul/Gemm: weight-only int8 graphs (``dynamic-quant``) run as integer matmuls.

Pattern (Relax, as TVM's ONNX importer emits it for ``dynamic-quant`` graphs)::

    matmul(x, dequantize(W_q, s_w, 0))                   x @ W      (MatMul, Gemm transB=0)
    matmul(x, permute_dims(dequantize(W_q, s_w, 0)))     x @ W^T    (Gemm transB=1)

``x`` float32 ``[..., M, K]`` (any rank >= 1, batch axes kept), ``W_q`` a constant int8 matrix,
``s_w`` one scale per output column ``n`` (per-channel) or one scale (per-tensor), zero point 0.
The rewrite (one per matched matmul; bias adds and other consumers are left where they are,
FuseOps puts them in the matmul's epilogue):

1. **Quantize the activations at run time**, asymmetric uint8, as ONNX Runtime's
   ``DynamicQuantizeLinear`` defines it, over a *row* (the ``K`` values of one ``x[..., m, :]``,
   mode ``per-row``, the default) or over the *whole tensor* (mode ``per-tensor``: exactly what
   ``onnxruntime.quantization.quantize_dynamic`` models compute)::

       lo = min(0, min x),  hi = max(0, max x)
       s_x = (hi - lo) / 255            (1 when hi == lo, i.e. x is all zeros: ORT's choice)
       z_x = clip(round(-lo / s_x), 0, 255)
       x_q = clip(round(x / s_x) + z_x, 0, 255)        (uint8; round half to even)

   Two kernels: the row ranges (two reductions and ``s_x``, ``z_x`` in one ``[rows, 2]`` output,
   which the row-reduction rule schedules) and the elementwise rounding (the elementwise rule).
   Both are marked opaque so FuseOps does not inline the rounding into the matmul (it would be
   recomputed for every column block).
2. **Integer matmul** ``acc = matmul(x_q, W_q', out_dtype="int32")`` (``relax.op.matmul``, uint8 x
   int8, exact in int32 while ``K * 255 * 127 < 2^31``, i.e. ``K < 66,000``), ``W_q'`` the
   weight as a constant int8 ``[K, N]`` (Gemm ``transB`` is transposed at compile time), so a
   fast int8 rule and weight packing see a plain 2-D/3-D ``matmul(u8, s8) -> i32``.
3. **Zero-point compensation and scale** (elementwise, fused into the matmul's write-back)::

       y = float(acc - z_x * colsum(W_q')) * (s_x * s_w)       colsum(W_q')[n] = sum_k W_q'[k, n]

   the order of ONNX Runtime's ``MatMulInteger -> Cast -> Mul(s_x * s_w)``.

Per-row vs per-tensor: both need the same two reductions, so they cost the same; a row's range
is at most the tensor's, so per-row rounding errors are never larger (an outlier token no longer
coarsens every other token's step). ``per-tensor`` reproduces ONNX Runtime's ``quantize_dynamic``
arithmetic (useful to compare against it); ``float`` keeps TVM's float lowering (dequantized
float32 weights in the library, float matmul). The mode comes from the ``dynamic-quant`` pass
(``activations=``), recorded in the ONNX model's metadata under :data:`METADATA_KEY`.

Error: ``|y - x @ (W_q s_w)| <= (s_x / 2) * sum_k |W_q'[k, n]| * s_w[n]`` per output (activation
rounding; saturation cannot happen since the range covers the row), on top of the weight
rounding error the weight-only graph already has.

Not matched: activations that are themselves dequantized (static QDQ graphs, whose integer
lowering is :mod:`edgecc.lower.int8`'s). Declined, with a reason in the report (the matmul then
stays float, as before): a non-constant
or non-int8 ``W_q`` or scale, a non-zero weight zero point, a weight of rank other than 2, a
per-channel axis along ``K``, a float16/float64 ``x``, ``K >= 66,000``, and the weight-first
form ``W @ x``. Only CPU (``llvm``) targets use the rewrite; CUDA keeps the float lowering.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgecc.passes.quantize_dynamic import ACTIVATION_MODES, ACTIVATIONS_KEY

log = logging.getLogger(__name__)

METADATA_KEY = ACTIVATIONS_KEY
MODES = ACTIVATION_MODES
DEFAULT_MODE = "per-row"
# K * 255 * 127 must stay below 2^31 for an exact int32 accumulator.
MAX_K = (2**31 - 1) // (255 * 127)
# FuseOps' pattern kind "opaque": the quantize kernel is never fused into a neighbour.
_OPAQUE = 8


def mode_of(model: onnx.ModelProto) -> str:
    """The activation mode recorded by the ``dynamic-quant`` pass (default :data:`DEFAULT_MODE`)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY and prop.value in MODES:
            return prop.value
    return DEFAULT_MODE


def fingerprint(weight: np.ndarray) -> str:
    """A short content hash of an int8 ``[K, N]`` weight (to find its ONNX node again)."""
    data = np.ascontiguousarray(weight, dtype=np.int8)
    return hashlib.sha1(repr(data.shape).encode() + data.tobytes()).hexdigest()[:16]


def onnx_weight_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Fingerprint of each int8 weight, oriented ``[K, N]`` -> the MatMul/Gemm nodes reading its
    ``DequantizeLinear`` (analysis only; names the kernels in the report)."""
    inits = {i.name: i for i in model.graph.initializer}
    dequantized: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input and node.input[0] in inits:
            dequantized[node.output[0]] = node.input[0]
    found: dict[str, list[str]] = {}
    arrays: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = dequantized.get(node.input[1])
        if weight is None:
            continue
        if weight not in arrays:
            arrays[weight] = numpy_helper.to_array(inits[weight])
        w = arrays[weight]
        if w.dtype != np.int8 or w.ndim != 2:
            continue
        attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        if node.op_type == "Gemm" and attrs.get("transB", 0):
            w = w.T
        found.setdefault(fingerprint(w), []).append(node.name or node.output[0])
    return found


@dataclass
class DynamicInt8Report:
    """What the rewrite did: one entry per rewritten matmul, and the declined ones.

    Attributes:
        mode: ``per-row``, ``per-tensor`` or ``float``.
        names: weight fingerprint -> ONNX node names (:func:`onnx_weight_nodes`).
        rewritten: ``{"node", "shape": [M, K, N], "weight": per-channel|per-tensor,
            "fingerprint"}`` and, once kernels are known, ``"kernel"`` and ``"rule"``.
        declined: ``{"node", "reason"}``.
    """

    mode: str = DEFAULT_MODE
    names: dict[str, list[str]] = field(default_factory=dict)
    rewritten: list[dict[str, Any]] = field(default_factory=list)
    declined: list[dict[str, str]] = field(default_factory=list)

    @staticmethod
    def of(model: onnx.ModelProto) -> DynamicInt8Report:
        """An empty report for ``model``: its mode and its int8 weights' node names."""
        return DynamicInt8Report(mode=mode_of(model), names=onnx_weight_nodes(model))

    def summary(self, schedules: dict[str, str | None] | None = None) -> dict[str, Any]:
        """JSON view for the manifest (``library.int8_dynamic``): per layer, which kernel runs
        it as integers and which schedule rule scheduled that kernel."""
        layers = []
        for entry in self.rewritten:
            row = {k: v for k, v in entry.items() if k != "fingerprint"}
            row["mode"] = f"dynamic-int8 ({self.mode})"
            if schedules is not None and row.get("kernel") in schedules:
                row["rule"] = schedules[row["kernel"]] or "none"
            layers.append(row)
        return {
            "activations": self.mode,
            "int8_matmuls": len(layers),
            "layers": layers,
            "declined": list(self.declined),
        }


def _const(expr: Any) -> np.ndarray | None:
    import tvm

    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def _row_params_te(x: Any, per_tensor: bool) -> Any:
    """TE of step 1's range: ``params[..., 0] = s_x``, ``params[..., 1] = z_x`` (float32), shaped
    ``x.shape[:-1] + [2]`` (per row) or ``[1, 2]`` (per tensor). One output block, so TVM's row
    reduction rule can compute the two reductions inside the parallel row loop."""
    from tvm import te, tirx

    rank = len(x.shape)
    red_axes = list(range(rank)) if per_tensor else [rank - 1]
    rows = [1] if per_tensor else list(x.shape[:-1])

    def reduce(fn: Any, name: str) -> Any:
        ks = [te.reduce_axis((0, x.shape[a]), f"k{a}") for a in red_axes]

        def body(*idx: Any) -> Any:
            full = list(ks) if per_tensor else [*idx, ks[0]]
            return fn(x[tuple(full)], axis=ks)

        return te.compute(rows, body, name=name)

    hi = reduce(te.max, "row_max")
    lo = reduce(te.min, "row_min")
    f32 = "float32"
    zero, one, qmax = (tirx.const(v, f32) for v in (0.0, 1.0, 255.0))

    def params(*i: Any) -> Any:
        r = i[:-1]
        low = tirx.min(lo[r], zero)
        span = tirx.max(hi[r], zero) - low
        scale = tirx.Select(span == zero, one, span / qmax)
        zp = tirx.max(tirx.min(tirx.round(zero - low / scale), qmax), zero)
        return tirx.Select(i[-1] == 0, scale, zp)

    return te.compute([*rows, 2], params, name="act_params")


def _quantize_te(x: Any, params: Any, per_tensor: bool) -> Any:
    """TE of step 1's rounding: ``x_q = clip(round(x / s_x) + z_x, 0, 255)`` as uint8."""
    from tvm import te, tirx

    f32 = "float32"
    zero, qmax = tirx.const(0.0, f32), tirx.const(255.0, f32)

    def quantize(*i: Any) -> Any:
        r = (0,) if per_tensor else i[:-1]
        q = tirx.round(x[i] / params[(*r, 0)]) + params[(*r, 1)]
        return tirx.Cast("uint8", tirx.max(tirx.min(q, qmax), zero))

    return te.compute(x.shape, quantize, name="act_quantized")


def _match(mutator: Any, call: Any) -> tuple[dict[str, Any] | None, str | None]:
    """``(parts, None)`` for a matmul of the pattern, ``(None, reason)`` for a declined
    ``matmul(x, dequantize(...))``, ``(None, None)`` for any other call."""
    from tvm import relax

    if getattr(call.op, "name", "") != "relax.matmul" or len(call.args) != 2:
        return None, None
    x, w = call.args
    x_bound = mutator.lookup_binding(x) if isinstance(x, relax.Var) else x
    if _is_dequantize(x_bound):
        if _const(x_bound.args[0]) is None:
            return None, None  # a static QDQ activation: edgecc.lower.int8's pattern, not ours
        return None, "the weight is the first operand (W @ x)"
    bound = mutator.lookup_binding(w) if isinstance(w, relax.Var) else w
    transposed = False
    if isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == "relax.permute_dims":
        axes = bound.attrs.axes
        if axes is not None and [int(a) for a in axes] != [1, 0]:
            return None, None
        transposed = True
        inner = bound.args[0]
        bound = mutator.lookup_binding(inner) if isinstance(inner, relax.Var) else inner
    if not _is_dequantize(bound):
        return None, None
    w_q, scale, zero = (_const(a) for a in bound.args)
    if w_q is None or scale is None or zero is None:
        return None, "non-constant weight, scale or zero point"
    if w_q.dtype != np.int8:
        return None, f"weight is {w_q.dtype}, not int8"
    if w_q.ndim != 2:
        return None, f"weight of rank {w_q.ndim}, not 2"
    if np.any(zero != 0):
        return None, "weight zero point is not 0"
    if scale.dtype != np.float32:
        return None, f"weight scale is {scale.dtype}, not float32"
    x_dtype = str(x.ty.dtype)
    if x_dtype != "float32":
        return None, f"activation is {x_dtype}, not float32"
    axis = int(bound.attrs.axis) % 2
    n_axis = 0 if transposed else 1
    if scale.size != 1 and axis != n_axis:
        return None, "per-channel scales along K (not one scale per output column)"
    weight = w_q.T if transposed else w_q
    if weight.shape[0] > MAX_K:
        return None, f"K = {weight.shape[0]} >= {MAX_K + 1} (int32 accumulator could overflow)"
    return {
        "x": x,
        "weight": np.ascontiguousarray(weight),
        "scale": scale.reshape(-1).astype(np.float32) if scale.size != 1 else scale.reshape(()),
    }, None


def _is_dequantize(expr: Any) -> bool:
    from tvm import relax

    return isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.dequantize"


def _quantize(bb: Any, x: Any, per_tensor: bool) -> tuple[Any, Any, Any]:
    """Step 1 emitted into ``bb``: ``(x_q, s_x, z_x)``, ``s_x`` float32 and ``z_x`` int32 shaped
    to broadcast against the matmul's output. Both kernels are opaque to FuseOps."""
    from tvm import relax

    opaque = {"op_pattern": _OPAQUE}
    params = bb.emit(
        bb.call_te(
            _row_params_te,
            x,
            per_tensor,
            primfunc_name_hint="dynamic_quantize_range",
            primfunc_attrs=opaque,
        )
    )
    x_q = bb.emit(
        bb.call_te(
            _quantize_te,
            x,
            params,
            per_tensor,
            primfunc_name_hint="dynamic_quantize_act",
            primfunc_attrs=opaque,
        )
    )
    last = len(params.ty.shape) - 1

    def column(c: int) -> Any:
        return bb.emit(relax.op.strided_slice(params, axes=[last], begin=[c], end=[c + 1]))

    s_x, z_x = column(0), bb.emit(relax.op.astype(column(1), "int32"))
    return x_q, s_x, z_x


def _integer_matmul(parts: dict[str, Any], quantized: tuple[Any, Any, Any]) -> Any:
    """Steps 2-3 of the module docstring on the quantized activation; the float32 result."""
    from tvm import relax

    weight, scale = parts["weight"], parts["scale"]
    x_q, s_x, z_x = quantized
    acc = relax.op.matmul(x_q, relax.const(weight), out_dtype="int32")
    colsum = weight.astype(np.int32).sum(axis=0, dtype=np.int32)
    centred = relax.op.subtract(acc, relax.op.multiply(z_x, relax.const(colsum)))
    scales = relax.op.multiply(s_x, relax.const(scale))
    return relax.op.multiply(relax.op.astype(centred, "float32"), scales)


def rewrite_pass(report: DynamicInt8Report) -> Any:
    """The module pass: rewrite every matched matmul (see the module docstring), record each in
    ``report``. Mode ``float`` leaves the module unchanged."""
    import tvm
    from tvm import relax

    per_tensor = report.mode == "per-tensor"

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        # (x, its quantized triple): Q, K and V projections read one x, quantized once.
        done: list[tuple[Any, tuple[Any, Any, Any]]]

        def quantized(self, x: Any) -> tuple[Any, Any, Any]:
            for seen, triple in self.done:
                if seen.same_as(x):
                    return triple
            triple = _quantize(self.builder_, x, per_tensor)
            self.done.append((x, triple))
            return triple

        def visit_dataflow_block_(self, block):  # noqa: ANN001, ANN202
            self.done = []  # a dataflow var is not visible outside its block
            return super().visit_dataflow_block_(block)

        def visit_binding_block_(self, block):  # noqa: ANN001, ANN202
            self.done = []
            return super().visit_binding_block_(block)

        def visit_call_(self, call):  # noqa: ANN001, ANN202 - TVM's visitor signature
            call = super().visit_call_(call)
            parts, reason = _match(self, call)
            if parts is None:
                if reason is not None:
                    report.declined.append({"node": "?", "reason": reason})
                return call
            weight = parts["weight"]
            fp = fingerprint(weight)
            k, n = weight.shape
            rows = [int(d) for d in parts["x"].ty.shape][:-1] or [1]
            report.rewritten.append(
                {
                    "node": ", ".join(report.names.get(fp, ["?"])),
                    "shape": [*rows, k, n],
                    "weight": "per-tensor" if parts["scale"].ndim == 0 else "per-channel",
                    "fingerprint": fp,
                }
            )
            return _integer_matmul(parts, self.quantized(parts["x"]))

    @tvm.transform.module_pass(opt_level=0, name="EdgeccInt8Dynamic")
    def _pass(mod, _ctx):
        if report.mode == "float":
            return mod
        rewriter = _Rewrite(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        mod = rewriter.builder_.get()
        if report.rewritten:
            log.info("int8-dynamic: %d matmuls run as integers", len(report.rewritten))
        return relax.transform.DeadCodeElimination()(mod)

    return _pass


def locate_pass(report: DynamicInt8Report) -> Any:
    """A module pass that changes nothing: after fusion, it names the kernel that runs each
    rewritten matmul (the ``call_tir`` whose arguments hold its int8 weight) in ``report``."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="EdgeccInt8DynamicKernels")
    def _pass(mod, _ctx):
        if not report.rewritten:
            return mod
        kernels: dict[str, str] = {}

        def visit(expr: Any) -> None:
            if not (
                isinstance(expr, relax.Call)
                and getattr(expr.op, "name", "") == "relax.call_tir"
                and len(expr.args) >= 2
            ):
                return
            for arg in expr.args[1].fields:
                value = _const(arg)
                if value is not None and value.dtype == np.int8 and value.ndim == 2:
                    kernels.setdefault(fingerprint(value), expr.args[0].name_hint)

        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                relax.analysis.post_order_visit(func, visit)
        for entry in report.rewritten:
            entry["kernel"] = kernels.get(entry["fingerprint"], "?")
        return mod

    return _pass


# run --check on a package whose MatMuls run as dynamic int8: ONNX Runtime runs model.onnx with
# float activations, the library quantizes them, so the outputs differ by activation rounding
# (tiny transformer and MiniLM: see tests/test_int8_dynamic_end_to_end.py for the figures).
CHECK_MAX_REL_DIFF = 0.05
CHECK_MIN_COSINE = 0.999


def check_rule(rule: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    """The ``run --check`` rule of a package: ``rule`` (the graph's own) unless the library runs
    MatMuls as dynamic int8 (``details["int8_dynamic"]``), then the looser ``dynamic-int8``
    rule (max rel diff :data:`CHECK_MAX_REL_DIFF`, cosine :data:`CHECK_MIN_COSINE`)."""
    facts = details.get("int8_dynamic") or {}
    if not facts.get("int8_matmuls") or rule.get("kind") != "fp32":
        return rule
    return {
        "kind": "dynamic-int8",
        "max_rel_diff": CHECK_MAX_REL_DIFF,
        "min_cosine": CHECK_MIN_COSINE,
    }
