"""Seeded probe inputs: the inputs every reference output and comparison is computed on.

Float inputs are drawn from N(0, 1) with ``np.random.default_rng(seed)``. Integer inputs are
token ids or masks: an input whose name contains ``mask`` is all ones; any other integer input is
drawn uniformly from ``[0, bound)``, where ``bound`` is the smallest table it indexes (the first
dimension of a constant ``Gather`` data tensor it reaches through shape-only ops), capped at
:data:`MAX_INDEX`. Boolean inputs are all True. The same specs, graph and seed always give the
same arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from edgecc.frontend.specs import InputSpec
from edgecc.passes.graph import GraphIndex, attr

MAX_INDEX = 1000

# Ops through which an integer input keeps being "the same ids" (only reshaped or re-typed).
_TRANSPARENT = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For each integer graph input, the size of the smallest constant table it indexes.

    Inputs that index no constant table are left out (the caller uses :data:`MAX_INDEX`).
    """
    index = GraphIndex(model)
    bounds: dict[str, int] = {}
    for inp in model.graph.input:
        if inp.name in index.initializers:
            continue
        todo, seen, sizes = [inp.name], set(), []
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in index.consumers.get(name, []):
                if node.op_type in _TRANSPARENT and node.input[0] == name:
                    todo.extend(o for o in node.output if o)
                elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
                    data = index.const(node.input[0])
                    if data is not None and data.ndim:
                        sizes.append(data.shape[int(attr(node, "axis", 0))])
        if sizes:
            bounds[inp.name] = min(sizes)
    return bounds


def make_probe_inputs(
    specs: Sequence[InputSpec], seed: int = 0, bounds: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Deterministic inputs for ``specs`` (see the module docstring for the distributions).

    Args:
        specs: the inputs, in order; each draws from the generator in that order.
        seed: seed for ``np.random.default_rng``.
        bounds: per-input exclusive upper bound for integer ids (default :data:`MAX_INDEX`).
    """
    rng = np.random.default_rng(seed)
    bounds = bounds or {}
    probe: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.is_float:
            value = rng.standard_normal(spec.shape).astype(spec.dtype)
        elif spec.dtype == "bool" or "mask" in spec.name.lower():
            value = np.ones(spec.shape, dtype=spec.dtype)
        else:
            high = max(1, min(MAX_INDEX, bounds.get(spec.name, MAX_INDEX)))
            if np.issubdtype(np.dtype(spec.dtype), np.integer):
                high = min(high, int(np.iinfo(np.dtype(spec.dtype)).max) + 1)
            value = rng.integers(0, high, size=spec.shape).astype(spec.dtype)
        probe[spec.name] = value
    return probe


def placeholder_inputs(specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """Inputs that are valid for any model with these specs: zeros ids, ones masks, N(0,1) floats.

    Used to trace an export before the graph (and so the id bounds) is known.
    """
    return make_probe_inputs(specs, seed=0, bounds={s.name: 1 for s in specs})
