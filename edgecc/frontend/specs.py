"""Input specifications: a name, a static shape and a dtype per model input.

The text form, used by ``--input-shape``, is ``name:1x3x224x224[:dtype]``; the name may be left
out (``1x3x224x224``) for a model whose inputs are matched by position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from onnx import helper

from edgecc.errors import UserInputError

# Accepted spellings -> canonical numpy dtype name.
_DTYPE_ALIASES = {
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
    "f16": "float16",
    "float64": "float64",
    "double": "float64",
    "fp64": "float64",
    "f64": "float64",
    "int64": "int64",
    "long": "int64",
    "i64": "int64",
    "int32": "int32",
    "int": "int32",
    "i32": "int32",
    "int16": "int16",
    "i16": "int16",
    "int8": "int8",
    "i8": "int8",
    "uint8": "uint8",
    "u8": "uint8",
    "bool": "bool",
}

_SUPPORTED = frozenset(_DTYPE_ALIASES.values()) | {"uint16", "uint32", "uint64"}

_SHAPE_RE = re.compile(r"\d+(?:[x*]\d+)*")


@dataclass(frozen=True)
class InputSpec:
    """One model input.

    Attributes:
        name: the input's name in the model ("" to match by position).
        shape: static shape, every dimension a positive integer.
        dtype: canonical numpy dtype name (``float32``, ``int64``, ``bool``...).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if any(d <= 0 for d in self.shape):
            raise UserInputError(
                f"input {self.name!r}: every dimension must be positive, got {self.shape}"
            )

    @property
    def is_float(self) -> bool:
        """True for floating-point inputs."""
        return self.dtype in ("float16", "float32", "float64")

    def text(self) -> str:
        """The ``name:1x3x224x224:dtype`` form (round-trips through :func:`parse_input_spec`)."""
        shape = "x".join(str(d) for d in self.shape)
        body = f"{self.name}:{shape}" if self.name else shape
        return body if self.dtype == "float32" else f"{body}:{self.dtype}"


def canonical_dtype(text: str) -> str:
    """The canonical numpy dtype name for a spelling such as ``fp16`` or ``long``."""
    key = str(text).strip().lower().removeprefix("torch.").removeprefix("np.")
    if key in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key]
    try:
        dtype = np.dtype(key)
    except TypeError:
        dtype = np.dtype(object)
    if dtype.name in _SUPPORTED:  # float128, longdouble...: numpy has them, ONNX does not
        return dtype.name
    known = ", ".join(sorted(_SUPPORTED))
    raise UserInputError(f"unknown dtype {text!r}; known: {known}")


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``name:1x3x224x224[:dtype]`` (or a bare ``1x3x224x224``) into an :class:`InputSpec`.

    Raises:
        UserInputError: when the text does not have that form.
    """
    usage = "expected name:1x3x224x224 or name:1x3x224x224:dtype"
    parts = [p.strip() for p in str(text).strip().split(":")]
    if len(parts) == 1:
        name, shape, dtype = "", parts[0], "float32"
    elif len(parts) == 2:
        name, shape, dtype = parts[0], parts[1], "float32"
    elif len(parts) == 3:
        name, shape, dtype = parts
    else:
        raise UserInputError(f"bad input spec {text!r}: {usage}")
    if not _SHAPE_RE.fullmatch(shape):
        raise UserInputError(f"bad shape {shape!r} in input spec {text!r}: {usage}")
    if len(parts) > 1 and not name:
        raise UserInputError(f"empty input name in input spec {text!r}: {usage}")
    return InputSpec(name, tuple(int(d) for d in re.split(r"[x*]", shape)), dtype or "float32")


def onnx_elem_type(dtype: str) -> int:
    """The ONNX ``TensorProto`` element type of a canonical dtype name."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def dtype_of_elem_type(elem_type: int) -> str:
    """The canonical dtype name of an ONNX element type."""
    try:
        name = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError) as err:
        raise UserInputError(f"unsupported input element type {elem_type}") from err
    return canonical_dtype(name)
