"""``expand-rnn``: unroll static-length ``LSTM``, ``GRU`` and ``RNN`` nodes into plain ops.

TVM 0.27's ONNX importer has no converter for the recurrent ops, so edgecc rewrites each into
MatMul/Add/Mul/Split/Concat and the gate activations, one group of nodes per time step. The
equations are ONNX's (``X_t`` one step of the input, ``H``/``C`` the states, ``W``/``R``/``B``
one direction's slices, ``(.)`` the elementwise product, ``f, g, h`` the activations, default
``Sigmoid, Tanh, Tanh``)::

    LSTM (gates iofc; peepholes P in order iof):
      i = f(X_t W_i^T + H R_i^T + P_i (.) C + Wb_i + Rb_i)
      f = f(X_t W_f^T + H R_f^T + P_f (.) C + Wb_f + Rb_f)      (input_forget=1: f = 1 - i)
      c = g(X_t W_c^T + H R_c^T + Wb_c + Rb_c)
      C' = f (.) C + i (.) c
      o = f(X_t W_o^T + H R_o^T + P_o (.) C' + Wb_o + Rb_o)
      H' = o (.) h(C')
    GRU (gates zrh):
      z = f(X_t W_z^T + H R_z^T + Wb_z + Rb_z)
      r = f(X_t W_r^T + H R_r^T + Wb_r + Rb_r)
      n = g(X_t W_h^T + (r (.) H) R_h^T + Rb_h + Wb_h)          (linear_before_reset=0)
      n = g(X_t W_h^T + r (.) (H R_h^T + Rb_h) + Wb_h)          (linear_before_reset=1)
      H' = (1 - z) (.) n + z (.) H
    RNN (default activation Tanh):
      H' = f(X_t W_i^T + H R_i^T + Wb_i + Rb_i)

``clip`` (when set) clamps every gate's pre-activation (after the peephole term) to
``[-clip, clip]``. Activations are any of the spec's: Relu, Tanh, Sigmoid, Affine
(``alpha*x + beta``), LeakyRelu, ThresholdedRelu, ScaledTanh (``alpha*tanh(beta*x)``),
HardSigmoid, Elu, Softsign, Softplus; ``activation_alpha``/``activation_beta`` are consumed in
order by the activations that take them, with the spec's defaults when the list runs out.

As cuDNN and ONNX Runtime do, the input projection of all steps is one MatMul per direction,
``X W^T + Wb (+ Rb)`` of shape ``(T, batch, gates * hidden)``; each step then does only the
recurrent ``H R^T`` MatMul, so ``dynamic-quant`` finds two constant weights per direction
(``W^T`` and ``R^T``, the latter shared by all steps; GRU with ``linear_before_reset=0`` splits
``R`` into ``R_zr^T`` and ``R_h^T``). A first step with a zero state (no ``initial_h`` /
``initial_c``, or constant zeros as torch exports) skips the terms that would multiply zero.

Directions forward, reverse and bidirectional (the reverse pass walks ``t = T-1 .. 0`` and writes
``Y[t]``); ``layout`` 0 (``X: (T, batch, in)``, ``Y: (T, dirs, batch, hidden)``, states
``(dirs, batch, hidden)``) and 1 (``X: (batch, T, in)``, ``Y: (batch, T, dirs, hidden)``, states
``(batch, dirs, hidden)``). Outputs ``Y``, ``Y_h`` (and ``Y_c`` for LSTM) are built only when the
node has them, under the node's output names.

Declined, with the reason in ``info["declined"]`` (and a warning: TVM cannot import the node):
a sequence length that is not a static integer; ``sequence_lens`` computed at run time, or
constant but shorter than the sequence for some batch entry (the padding semantics would need
per-entry masks); non-constant ``W``/``R``/``B``/``P`` (e.g. already behind a
``DequantizeLinear``: run ``expand-rnn`` before ``dynamic-quant``, as the cleanup stage does);
non-float weights; unknown activations; opsets below 13 (Split and Unsqueeze take their sizes as
inputs from opset 13 on).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from edgecc.passes.graph import (
    GraphIndex,
    attr,
    const_value,
    infer_types,
    remove_if_unused,
    static_shape,
)
from edgecc.passes.manager import PassContext, PassResult, register

logger = logging.getLogger(__name__)

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
# op -> (gate count, default activations of one direction)
GATES = {
    "LSTM": (4, ("Sigmoid", "Tanh", "Tanh")),
    "GRU": (3, ("Sigmoid", "Tanh")),
    "RNN": (1, ("Tanh",)),
}
# activation (lower case) -> (takes alpha, takes beta, default alpha, default beta), as in the spec
ACTIVATIONS: dict[str, tuple[bool, bool, float, float]] = {
    "relu": (False, False, 0.0, 0.0),
    "tanh": (False, False, 0.0, 0.0),
    "sigmoid": (False, False, 0.0, 0.0),
    "affine": (True, True, 1.0, 0.0),
    "leakyrelu": (True, False, 0.01, 0.0),
    "thresholdedrelu": (True, False, 1.0, 0.0),
    "scaledtanh": (True, True, 1.0, 1.0),
    "hardsigmoid": (True, True, 0.2, 0.5),
    "elu": (True, False, 1.0, 0.0),
    "softsign": (False, False, 0.0, 0.0),
    "softplus": (False, False, 0.0, 0.0),
}
MIN_OPSET = 13


class Declined(Exception):
    """The node cannot be expanded; the message says why."""


@dataclass(frozen=True)
class Activation:
    """One activation function with its parameters."""

    name: str
    alpha: float
    beta: float


def parse_activations(node: onnx.NodeProto, directions: int) -> list[list[Activation]]:
    """The activations of each direction, with alphas and betas consumed as the spec says."""
    per_dir = len(GATES[node.op_type][1])
    names = [a.decode() if isinstance(a, bytes) else a for a in attr(node, "activations", [])]
    names = names or list(GATES[node.op_type][1]) * directions
    if len(names) == per_dir and directions == 2:
        names = names * 2
    if len(names) != per_dir * directions:
        raise Declined(f"{len(names)} activations for {directions} direction(s)")
    alphas = list(attr(node, "activation_alpha", []))
    betas = list(attr(node, "activation_beta", []))
    acts = []
    for name in names:
        if name.lower() not in ACTIVATIONS:
            raise Declined(f"unknown activation {name!r}")
        takes_a, takes_b, alpha, beta = ACTIVATIONS[name.lower()]
        if takes_a and alphas:
            alpha = alphas.pop(0)
        if takes_b and betas:
            beta = betas.pop(0)
        acts.append(Activation(name.lower(), float(alpha), float(beta)))
    return [acts[d * per_dir : (d + 1) * per_dir] for d in range(directions)]


class _Builder:
    """Emits the nodes replacing one recurrent node, with fresh names."""

    def __init__(self, index: GraphIndex, node: onnx.NodeProto, dtype: np.dtype):
        self.index, self.prefix, self.dtype = index, node.name or node.op_type, dtype
        self.nodes: list[onnx.NodeProto] = []
        self._scalars: dict[float, str] = {}

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        out = out or self.index.unique(f"{self.prefix}_{op_type.lower()}")
        self.nodes.append(self.index.make_node(op_type, inputs, [out], self.prefix, **attrs))
        return out

    def ops(self, op_type: str, inputs: list[str], count: int, **attrs: Any) -> list[str]:
        outs = [self.index.unique(f"{self.prefix}_{op_type.lower()}") for _ in range(count)]
        self.nodes.append(self.index.make_node(op_type, inputs, outs, self.prefix, **attrs))
        return outs

    def const(self, base: str, value: np.ndarray) -> str:
        return self.index.add_initializer(f"{self.prefix}_{base}", np.asarray(value))

    def scalar(self, value: float) -> str:
        if value not in self._scalars:
            self._scalars[value] = self.const("c", np.asarray(value, self.dtype))
        return self._scalars[value]

    def split(self, x: str, axis: int, sizes: list[int]) -> list[str]:
        if len(sizes) == 1:
            return [x]
        return self.ops(
            "Split", [x, self.const("split", np.array(sizes, np.int64))], len(sizes), axis=axis
        )

    def add(self, a: str | None, b: str | None) -> str | None:
        if a is None or b is None:
            return a if b is None else b
        return self.op("Add", [a, b])

    def activate(self, act: Activation, x: str, clip: float | None) -> str:
        if clip is not None:
            x = self.op("Clip", [x, self.scalar(-clip), self.scalar(clip)])
        name, alpha, beta = act.name, act.alpha, act.beta
        simple = {
            "relu": "Relu",
            "tanh": "Tanh",
            "sigmoid": "Sigmoid",
            "softsign": "Softsign",
            "softplus": "Softplus",
        }
        if name in simple:
            return self.op(simple[name], [x])
        if name == "affine":
            return self.op("Add", [self.op("Mul", [x, self.scalar(alpha)]), self.scalar(beta)])
        if name == "scaledtanh":
            inner = self.op("Tanh", [self.op("Mul", [x, self.scalar(beta)])])
            return self.op("Mul", [inner, self.scalar(alpha)])
        if name == "hardsigmoid":
            return self.op("HardSigmoid", [x], alpha=alpha, beta=beta)
        op = {"leakyrelu": "LeakyRelu", "thresholdedrelu": "ThresholdedRelu", "elu": "Elu"}[name]
        return self.op(op, [x], alpha=alpha)


@register("expand-rnn")
class ExpandRecurrent:
    """Unroll LSTM/GRU/RNN nodes of static sequence length (see module docstring)."""

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        info: dict[str, Any] = {"expanded": [], "declined": []}
        if not any(n.op_type in RECURRENT_OPS for n in model.graph.node):
            return PassResult(model, False, info, reason="no LSTM, GRU or RNN node in the graph")
        index = GraphIndex(model)
        types = infer_types(model)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        new_nodes: list[onnx.NodeProto] = []
        orphans: set[str] = set()
        for node in model.graph.node:
            if node.op_type not in RECURRENT_OPS or node.domain not in ("", "ai.onnx"):
                new_nodes.append(node)
                continue
            try:
                if opset < MIN_OPSET:
                    raise Declined(f"opset {opset} < {MIN_OPSET}")
                nodes, steps, dirs = _expand(node, index, types)
            except Declined as err:
                logger.warning("expand-rnn: %s %s not expanded: %s", node.op_type, node.name, err)
                info["declined"].append({"node": node.name, "op": node.op_type, "reason": str(err)})
                new_nodes.append(node)
                continue
            new_nodes.extend(nodes)
            orphans.update(i for i in node.input if i)
            info["expanded"].append(
                {"node": node.name, "op": node.op_type, "steps": steps, "directions": dirs}
            )
        if not info["expanded"]:
            reasons = "; ".join(f"{d.get('node')}: {d.get('reason')}" for d in info["declined"])
            return PassResult(
                model, False, info, reason=f"every recurrent node declined ({reasons})"
            )
        copies = [onnx.NodeProto() for _ in new_nodes]
        for copy, node in zip(copies, new_nodes, strict=True):
            copy.CopyFrom(node)
        del model.graph.node[:]
        model.graph.node.extend(copies)
        remove_if_unused(model, orphans)
        return PassResult(model, True, info)


def _const(index: GraphIndex, node: onnx.NodeProto, slot: int, types: dict, what: str):
    """The constant value of input ``slot`` (None when absent); declines when not constant."""
    name = node.input[slot] if slot < len(node.input) else ""
    if not name:
        return None
    value = const_value(index, name, types)
    if value is None:
        raise Declined(f"{what} ({name!r}) is not constant")
    return value


def _expand(
    node: onnx.NodeProto, index: GraphIndex, types: dict[str, onnx.TypeProto]
) -> tuple[list[onnx.NodeProto], int, int]:
    """The nodes replacing ``node``, its step count and direction count (or raise Declined)."""
    op = node.op_type
    layout = attr(node, "layout", 0)
    direction = attr(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    dirs = 2 if direction == "bidirectional" else 1
    shape = static_shape(types, node.input[0])
    steps = shape[layout] if shape is not None and len(shape) == 3 else None
    if not isinstance(steps, int) or steps < 1:
        raise Declined(f"sequence length of {node.input[0]!r} is not static ({shape})")
    w = _const(index, node, 1, types, "W")
    r = _const(index, node, 2, types, "R")
    if w is None or r is None:
        raise Declined("W or R missing")
    if w.dtype.kind != "f":
        raise Declined(f"weights are {w.dtype}, not float")
    b = _const(index, node, 3, types, "B")
    if len(node.input) > 4 and node.input[4]:
        lens = const_value(index, node.input[4], types)
        if lens is None:
            raise Declined("sequence_lens is computed at run time")
        if np.any(lens != steps):
            raise Declined(f"sequence_lens {lens.tolist()} differ from the sequence length {steps}")
    peep = _const(index, node, 7, types, "P") if op == "LSTM" else None
    acts = parse_activations(node, dirs)
    clip = attr(node, "clip")
    hidden = int(attr(node, "hidden_size", r.shape[-1]))
    gates = GATES[op][0]
    bld = _Builder(index, node, w.dtype)

    x = node.input[0] if layout == 0 else bld.op("Transpose", [node.input[0]], perm=[1, 0, 2])
    h0 = _states(bld, node, 5, layout, dirs, types)
    c0 = _states(bld, node, 6, layout, dirs, types) if op == "LSTM" else [None] * dirs
    ys, hs, cs = [], [], []
    for d in range(dirs):
        wb, rb = (b[d, : gates * hidden], b[d, gates * hidden :]) if b is not None else (None, None)
        xbias = None
        if b is not None:
            xbias = wb + rb
            if op == "GRU" and attr(node, "linear_before_reset", 0):
                xbias[2 * hidden :] = wb[2 * hidden :]  # Rb_h stays inside r (.) (H R_h^T + Rb_h)
        proj = bld.op("MatMul", [x, bld.const(f"W{d}T", np.ascontiguousarray(w[d].T))])
        if xbias is not None:
            proj = bld.op("Add", [proj, bld.const(f"B{d}", xbias)])
        xs = bld.split(proj, 0, [1] * steps)
        p = peep[d] if peep is not None else None
        cell = _Cell(bld, node, d, acts[d], clip, hidden, r[d], rb, p)
        h, c = h0[d], c0[d]
        out = [""] * steps
        for t in reversed(range(steps)) if _reverse(direction, d) else range(steps):
            h, c = cell.step(xs[t], h, c)
            out[t] = h
        ys.append(bld.op("Concat", out, axis=0) if steps > 1 else out[0])
        hs.append(h)
        cs.append(c)
    names = list(node.output) + [""] * 3
    if names[0]:
        y = [bld.op("Unsqueeze", [v, bld.const("axis1", np.array([1], np.int64))]) for v in ys]
        y = bld.op("Concat", y, axis=1) if dirs == 2 else y[0]
        _finish(bld, y, names[0], [2, 0, 1, 3] if layout else None)
    for name, states in ((names[1], hs), (names[2], cs)):
        if name:
            state = bld.op("Concat", states, axis=0) if dirs == 2 else states[0]
            _finish(bld, state, name, [1, 0, 2] if layout else None)
    return bld.nodes, steps, dirs


def _reverse(direction: str, d: int) -> bool:
    return direction == "reverse" or (direction == "bidirectional" and d == 1)


def _states(bld: _Builder, node: onnx.NodeProto, slot: int, layout: int, dirs: int, types) -> list:
    """Initial states per direction as ``(1, batch, hidden)`` tensors (None: zeros)."""
    name = node.input[slot] if slot < len(node.input) else ""
    value = const_value(bld.index, name, types) if name else None
    if not name or (value is not None and not np.any(value)):  # torch exports zeros explicitly
        return [None] * dirs
    if layout:
        name = bld.op("Transpose", [name], perm=[1, 0, 2])
    return bld.split(name, 0, [1] * dirs)


def _finish(bld: _Builder, value: str, out: str, perm: list[int] | None) -> None:
    """Write ``value`` (transposed by ``perm`` if given) to the original output name ``out``."""
    if perm:
        bld.op("Transpose", [value], out=out, perm=perm)
    else:
        bld.op("Identity", [value], out=out)


class _Cell:
    """One direction's recurrence: weights as initializers, one ``step`` per time step."""

    def __init__(
        self,
        bld: _Builder,
        node: onnx.NodeProto,
        d: int,
        acts: list[Activation],
        clip: float | None,
        hidden: int,
        r: np.ndarray,
        rb: np.ndarray | None,
        peep: np.ndarray | None,
    ):
        op = node.op_type
        self.bld, self.op, self.acts, self.clip, self.hidden = bld, op, acts, clip, hidden
        self.lbr = op == "GRU" and attr(node, "linear_before_reset", 0)
        self.input_forget = op == "LSTM" and attr(node, "input_forget", 0)
        gates = GATES[op][0]
        if op == "GRU" and not self.lbr:  # (r . H) R_h^T needs R_h apart from R_z, R_r
            self.r_zr = bld.const(f"R{d}zrT", np.ascontiguousarray(r[: 2 * hidden].T))
            self.r_h = bld.const(f"R{d}hT", np.ascontiguousarray(r[2 * hidden :].T))
        else:
            self.r_all = bld.const(f"R{d}T", np.ascontiguousarray(r.T))
        self.rbh = bld.const(f"Rb{d}h", rb[2 * hidden :]) if self.lbr and rb is not None else None
        self.peep = None
        if peep is not None:
            parts = zip("iof", np.split(peep, 3), strict=True)
            self.peep = [bld.const(f"P{d}{g}", p) for g, p in parts]
        self.sizes = [hidden] * gates

    def step(self, x: str, h: str | None, c: str | None) -> tuple[str, str | None]:
        return getattr(self, f"_{self.op.lower()}")(x, h, c)

    def _recurrent(self, h: str | None, weight: str) -> str | None:
        return None if h is None else self.bld.op("MatMul", [h, weight])

    def _rnn(self, x: str, h: str | None, c: None) -> tuple[str, None]:
        pre = self.bld.add(x, self._recurrent(h, self.r_all))
        return self.bld.activate(self.acts[0], pre, self.clip), None

    def _lstm(self, x: str, h: str | None, c: str | None) -> tuple[str, str]:
        b, (f_act, g_act, h_act) = self.bld, self.acts
        pre = b.add(x, self._recurrent(h, self.r_all))
        pi, po, pf, pc = b.split(pre, 2, self.sizes)
        i = b.activate(f_act, b.add(pi, self._peephole(0, c)), self.clip)
        cand = b.op("Mul", [i, b.activate(g_act, pc, self.clip)])
        if c is None:
            c_new = cand
        else:
            if self.input_forget:
                f = b.op("Sub", [b.scalar(1.0), i])
            else:
                f = b.activate(f_act, b.add(pf, self._peephole(2, c)), self.clip)
            c_new = b.op("Add", [b.op("Mul", [f, c]), cand])
        o = b.activate(f_act, b.add(po, self._peephole(1, c_new)), self.clip)
        return b.op("Mul", [o, b.activate(h_act, c_new, None)]), c_new

    def _peephole(self, k: int, c: str | None) -> str | None:
        if self.peep is None or c is None:
            return None
        return self.bld.op("Mul", [c, self.peep[k]])

    def _gru(self, x: str, h: str | None, c: None) -> tuple[str, None]:
        b, (f_act, g_act) = self.bld, self.acts
        xz, xr, xh = b.split(x, 2, self.sizes)
        if self.lbr:
            rec = self._recurrent(h, self.r_all)
            hz, hr, hh = b.split(rec, 2, self.sizes) if rec else (None, None, None)
        else:
            rec = self._recurrent(h, self.r_zr)
            hz, hr = b.split(rec, 2, self.sizes[:2]) if rec else (None, None)
        z = b.activate(f_act, b.add(xz, hz), self.clip)
        r = b.activate(f_act, b.add(xr, hr), self.clip)
        if self.lbr:
            lin = b.add(hh, self.rbh)
            reset = None if lin is None else b.op("Mul", [r, lin])
        else:
            reset = None if h is None else b.op("MatMul", [b.op("Mul", [r, h]), self.r_h])
        n = b.activate(g_act, b.add(xh, reset), self.clip)
        if h is None:  # H' = (1 - z) n
            return b.op("Mul", [b.op("Sub", [b.scalar(1.0), z]), n]), None
        return b.op("Add", [n, b.op("Mul", [z, b.op("Sub", [h, n])])]), None  # n + z (H - n)
