"""Seeded probe inputs: the inputs every reference output and comparison is computed on.

Float inputs are drawn from N(0, 1) with ``np.random.default_rng(seed)``. Integer inputs are
token ids or masks: an input whose name contains ``mask`` is all ones; any other integer input is
drawn uniformly from ``[0, bound)``, where ``bound`` is the smallest table it indexes (the first
dimension of a constant ``Gather`` data tensor it reaches through shape-only ops), capped at
:data:`MAX_INDEX`. Boolean inputs are all True. The same specs, graph and seed always give the
same arrays. A user may give the probe instead (``--probe``): real data makes the per-pass
cosine in the dumps meaningful for lossy passes whose calibration expects real inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from edgecc.errors import UserInputError
from edgecc.frontend.specs import InputSpec
from edgecc.passes.graph import GraphIndex, attr

MAX_INDEX = 1000
# Probe inputs larger than this are refused before anything is allocated: they are held several
# times over (probe, reference run, ONNX Runtime, reference.npz), and no edge model's single
# input comes near it.
MAX_PROBE_BYTES = 2 << 30

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


def probe_bytes(specs: Sequence[InputSpec]) -> int:
    """Bytes the inputs of ``specs`` take together (Python integers: no overflow)."""
    return sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in specs)


def check_probe_size(specs: Sequence[InputSpec]) -> None:
    """Refuse inputs whose probe would need more than :data:`MAX_PROBE_BYTES`.

    Raises:
        UserInputError: naming the largest input and the memory it would need.
    """
    need = probe_bytes(specs)
    if need <= MAX_PROBE_BYTES:
        return
    big = max(specs, key=lambda s: math.prod(s.shape) * np.dtype(s.dtype).itemsize)
    raise UserInputError(
        f"the inputs need {format_bytes(need)} of memory (input {big.text()} alone "
        f"{format_bytes(math.prod(big.shape) * np.dtype(big.dtype).itemsize)}); edgecc refuses "
        f"probes above {format_bytes(MAX_PROBE_BYTES)}: pass a smaller --input-shape"
    )


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units, e.g. ``224 GiB``."""
    value, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "bytes" or value >= 10 else f"{value:.1f} {unit}"


def make_probe_inputs(
    specs: Sequence[InputSpec], seed: int = 0, bounds: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Deterministic inputs for ``specs`` (see the module docstring for the distributions).

    Args:
        specs: the inputs, in order; each draws from the generator in that order.
        seed: seed for ``np.random.default_rng``.
        bounds: per-input exclusive upper bound for integer ids (default :data:`MAX_INDEX`).
    """
    check_probe_size(specs)
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


def resolve_probe(
    specs: Sequence[InputSpec],
    probe: int | Mapping[str, np.ndarray],
    bounds: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """The probe inputs: seeded ones for an int ``probe``, else the given arrays, checked.

    Given arrays must name every input; each must have the input's shape, or that shape with
    more rows on the first axis (a dataset: its first rows are taken). Dtypes of the same kind
    are cast.

    Raises:
        UserInputError: missing names, wrong shapes or dtypes.
    """
    if isinstance(probe, int):
        return make_probe_inputs(specs, probe, bounds)
    from edgecc.package import name_single

    probe = name_single(probe, [s.name for s in specs])
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in probe:
            raise UserInputError(
                f"probe data has no array {spec.name!r}; the model's inputs are "
                f"{[s.name for s in specs]}"
            )
        arr = np.asarray(probe[spec.name])
        if (  # a dataset: more rows than the batch (a 0-d array or input has no dataset axis)
            arr.ndim
            and spec.shape
            and arr.shape[1:] == tuple(spec.shape[1:])
            and arr.shape[0] >= spec.shape[0]
        ):
            arr = arr[: spec.shape[0]]
        if arr.shape != tuple(spec.shape):
            raise UserInputError(
                f"probe array {spec.name!r} has shape {list(arr.shape)}, the input is "
                f"{list(spec.shape)}"
            )
        if arr.dtype.kind != np.dtype(spec.dtype).kind:
            raise UserInputError(
                f"probe array {spec.name!r} has dtype {arr.dtype}, the input is {spec.dtype}"
            )
        out[spec.name] = arr.astype(spec.dtype, order="C")  # ascontiguousarray makes 0-d 1-d
    return out


def placeholder_inputs(specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """Inputs that are valid for any model with these specs: zeros ids, ones masks, N(0,1) floats.

    Used to trace an export before the graph (and so the id bounds) is known.
    """
    return make_probe_inputs(specs, seed=0, bounds={s.name: 1 for s in specs})
