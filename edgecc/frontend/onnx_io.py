"""Read ONNX files and bring any ONNX model to the form the rest of edgecc expects.

:func:`finalize` makes a model self-contained (weights inside the proto), opset >= 17, with
static input shapes, then runs ``onnx.checker`` (full check) and shape inference with data
propagation. It is shared by ONNX files and torch exports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx import external_data_helper, shape_inference, version_converter

from edgecc.errors import UserInputError
from edgecc.frontend.specs import InputSpec, dtype_of_elem_type

logger = logging.getLogger(__name__)

MIN_OPSET = 17


def read_onnx(path: Path) -> onnx.ModelProto:
    """Parse an ONNX file and its external data files (if any) into one proto.

    Raises:
        UserInputError: the file is not a readable ONNX model, or its external data is missing.
    """
    corrupt = f"cannot read {path}: not an ONNX model nor a torch file, or it is truncated/corrupt"
    try:
        model = onnx.load_model(str(path), format="protobuf", load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        logger.debug("onnx.load(%s) failed", path, exc_info=True)
        raise UserInputError(f"{corrupt} ({type(err).__name__}: {first_line(err)})") from err
    if not model.ir_version or not model.opset_import or not model.graph.output:
        raise UserInputError(f"{corrupt} (no IR version, opset or graph outputs)")
    external = {
        dict((e.key, e.value) for e in t.external_data).get("location", "")
        for t in model.graph.initializer
        if external_data_helper.uses_external_data(t)
    }
    missing = sorted(loc for loc in external if not (path.parent / loc).is_file())
    if missing:
        raise UserInputError(
            f"{path}: external data file {', '.join(missing)} (next to the model) is missing"
        )
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as err:
            raise UserInputError(
                f"{path}: cannot read its external data: {first_line(err)}"
            ) from err
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (not initializers listed as inputs, as IR < 4 did)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def onnx_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version (0 when absent)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def finalize(
    model: onnx.ModelProto, specs: Sequence[InputSpec], opset: int, origin: str
) -> tuple[onnx.ModelProto, list[InputSpec], list[dict[str, Any]]]:
    """Self-contained, opset >= 17, static inputs, checked, shapes inferred.

    A negative ``dim_value`` (Paddle's exporter writes ``-1``) is an unknown dimension, as
    ONNX Runtime reads it. Every dimension the model leaves dynamic and a spec fixes is logged
    in one WARNING line (the package then takes only that size) and returned.

    Args:
        model: the model (edited in place where possible).
        specs: user input specs, matched by name (or by position when unnamed); they fill
            dimensions the model leaves symbolic and must agree with the static ones.
        opset: the opset to convert to when the model's is below :data:`MIN_OPSET`.
        origin: what the model came from, for error messages.

    Returns:
        The finished model, the spec of each of its inputs in graph order, and the dynamic
        dimensions fixed: ``{"input", "axis", "dim" (its symbol or "?"), "value"}`` each.
    """
    if any(external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        raise UserInputError(f"{origin}: weights refer to external data files that were not loaded")
    version = onnx_opset(model)
    if version < MIN_OPSET:
        logger.info("%s: converting opset %d to %d", origin, version, opset)
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as err:
            raise UserInputError(
                f"{origin}: opset {version} is below {MIN_OPSET} and converting it to {opset} "
                f"failed: {first_line(err)}"
            ) from err
    _unknown_negative_dims(model)
    resolved, changed, fixed = _static_inputs(model, specs, origin)
    log_fixed_dims(origin, fixed)
    if changed:
        # Symbolic shapes inferred earlier would contradict the new static ones.
        del model.graph.value_info[:]
        for out in model.graph.output:
            for dim in out.type.tensor_type.shape.dim:
                if not dim.HasField("dim_value"):
                    dim.Clear()  # unknown, for inference to fill in
    try:
        model = _check_and_infer(model)
    except Exception:
        # Stale value_info (from whatever wrote the file) can contradict inference: drop it.
        logger.debug("checking %s with its value_info failed; retrying without", origin)
        del model.graph.value_info[:]
        try:
            model = _check_and_infer(model)
        except Exception as err:
            logger.debug("checking %s failed", origin, exc_info=True)
            raise UserInputError(f"{origin}: invalid ONNX model: {first_line(err)}") from err
    return model, resolved, fixed


def log_fixed_dims(origin: str, fixed: Sequence[dict[str, Any]]) -> None:
    """One WARNING line naming every dynamic dimension given a static size, and the size."""
    if fixed:
        logger.warning(
            "%s: dynamic dims fixed: %s (the package takes only these sizes; set them with "
            "--input-shape)",
            origin,
            ", ".join(f"{f['input']}[{f['axis']}] ({f['dim']}) = {f['value']}" for f in fixed),
        )


def _unknown_negative_dims(model: onnx.ModelProto) -> None:
    """``dim_value < 0`` -> unknown (cleared) in inputs, outputs and value_info."""
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if not vi.type.HasField("tensor_type"):
            continue
        for dim in vi.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                logger.debug("%s: dim_value %d read as unknown", vi.name, dim.dim_value)
                dim.Clear()


def _check_and_infer(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    return shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def _static_inputs(
    model: onnx.ModelProto, specs: Sequence[InputSpec], origin: str
) -> tuple[list[InputSpec], bool, list[dict[str, Any]]]:
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    by_name = {s.name: s for s in specs if s.name}
    unnamed = [s for s in specs if not s.name]
    unknown = sorted(set(by_name) - set(names))
    if unknown:
        raise UserInputError(
            f"input spec names {', '.join(unknown)} are not inputs of {origin}; "
            f"its inputs are: {', '.join(names)}"
        )
    if len(by_name) + len(unnamed) > len(names):
        raise UserInputError(f"{len(specs)} input specs given but {origin} has {len(names)} inputs")
    resolved, changed, fixed = [], False, []
    for inp in inputs:
        spec = by_name.get(inp.name) or (unnamed.pop(0) if unnamed else None)
        shape = _resolve_shape(inp, spec, origin)
        dims = inp.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if not (dim.HasField("dim_value") and dim.dim_value > 0):
                fixed.append(
                    {"input": inp.name, "axis": axis, "dim": _dim_text(dim), "value": shape[axis]}
                )
        if [d.dim_value if d.HasField("dim_value") else None for d in dims] != list(shape):
            changed = True
            inp.type.tensor_type.shape.ClearField("dim")
            for d in shape:
                inp.type.tensor_type.shape.dim.add().dim_value = d
        dtype = dtype_of_elem_type(inp.type.tensor_type.elem_type)
        if spec is not None and spec.dtype != dtype:
            logger.debug(
                "input %s: model dtype %s used instead of spec dtype %s",
                inp.name,
                dtype,
                spec.dtype,
            )
        resolved.append(InputSpec(inp.name, shape, dtype))
    return resolved, changed, fixed


def _resolve_shape(
    inp: onnx.ValueInfoProto, spec: InputSpec | None, origin: str
) -> tuple[int, ...]:
    if not inp.type.HasField("tensor_type"):
        raise UserInputError(f"input {inp.name!r} of {origin} is not a tensor")
    has_shape = inp.type.tensor_type.HasField("shape")
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in inp.type.tensor_type.shape.dim
    ]
    pretty = "x".join(_dim_text(d) for d in inp.type.tensor_type.shape.dim) or "unknown"
    if spec is None:
        if has_shape and None not in dims:
            return tuple(dims)
        example = "x".join(str(d or 1) for d in dims) if has_shape and dims else "1x3x224x224"
        raise UserInputError(
            f"input {inp.name!r} of {origin} has shape {pretty}: pass its static shape with "
            f"--input-shape {inp.name}:{example}"
        )
    if has_shape and (
        len(dims) != len(spec.shape)
        or any(d not in (None, s) for d, s in zip(dims, spec.shape, strict=True))
    ):
        raise UserInputError(
            f"input {inp.name!r}: shape {spec.text()} does not match the model's {pretty}"
        )
    return spec.shape


def _dim_text(dim: onnx.TensorShapeProto.Dimension) -> str:
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return str(dim.dim_value)
    return dim.dim_param or "?"


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (messages to users are one line)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
