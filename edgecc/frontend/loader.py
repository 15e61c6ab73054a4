"""``load_model``: any supported model source -> a checked ONNX model plus a reference output.

What each source goes through (torch 2.13):

==================  ============================================================================
source              path
==================  ============================================================================
``.onnx`` file      read with external data, opset upgraded to >= 17, reference from ONNX Runtime
TorchScript file    ``torch.jit.load`` -> legacy exporter (``dynamo=False``, no constant folding)
``.pt2`` file       ``torch.export.load`` -> ``torch.onnx.export(dynamo=True, optimize=False)``
``torch.save`` of   refused unless ``trust_pickle`` (unpickling runs arbitrary code); then as an
a whole module      in-memory module
``torch.save`` of   refused: weights without an architecture
a state_dict
``nn.Module``       ``torch.onnx.export(dynamo=True, optimize=False)``
==================  ============================================================================

Torch sources get their reference from torch itself on the probe inputs, and the exported graph
is run once with ONNX Runtime against it (``LoadedModel.export_check``). File kinds are told apart
without unpickling anything (:mod:`edgecc.frontend.detect`); ``torch.save`` pickles are probed
with ``torch.load(weights_only=True)``; ``.pt2`` archives are checked for pickled members before
``torch.export.load`` (which would unpickle them) runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgecc.errors import UnsupportedOperatorError, UserInputError
from edgecc.frontend import detect
from edgecc.frontend import trust as trust_mod
from edgecc.frontend.onnx_io import MIN_OPSET, finalize, first_line, log_fixed_dims, read_onnx
from edgecc.frontend.probe import check_probe_size, index_bounds, placeholder_inputs, resolve_probe
from edgecc.frontend.specs import InputSpec, canonical_dtype
from edgecc.report.compare import compare_outputs, run_onnx

logger = logging.getLogger(__name__)

# Export agreement below these bounds is logged as a warning (the export may be wrong).
_EXPORT_WARN_COSINE = 0.9999
_EXPORT_WARN_REL = 1e-3


@dataclass
class LoadedModel:
    """A model ready for the passes.

    Attributes:
        model: ONNX model: checked (full check), shapes inferred, opset >= 17, static inputs,
            weights inside the proto.
        inputs: one spec per graph input, in graph order.
        output_names: graph output names, in order.
        source_format: ``torchscript``, ``export``, ``pickle``, ``module`` or ``onnx``.
        source_sha256: SHA-256 of the source file (None for in-memory sources).
        probe_inputs: the seeded inputs the reference was computed on.
        reference_outputs: float outputs of the source model on ``probe_inputs``, by output name.
        reference_source: what computed the reference (torch or ONNX Runtime, with versions).
        export_check: for torch sources, ``compare_outputs`` of ONNX Runtime on the exported
            graph against the torch reference; None for ONNX sources.
        source: the file path, or a description of the in-memory object.
        input_values: non-tensor ``forward`` arguments fixed as constants, by name.
        fixed_dims: dynamic input dimensions given a static size (see ``finalize``).
    """

    model: onnx.ModelProto
    inputs: list[InputSpec]
    output_names: list[str]
    source_format: str
    source_sha256: str | None
    probe_inputs: dict[str, np.ndarray]
    reference_outputs: dict[str, np.ndarray]
    reference_source: str
    export_check: dict[str, float] | None = None
    source: str = ""
    input_values: dict[str, Any] = field(default_factory=dict)
    fixed_dims: list[dict[str, Any]] = field(default_factory=list)


ExampleInputs = tuple | Mapping[str, Any] | None


def load_model(
    source: str | Path | Any,
    input_specs: Sequence[InputSpec] | None = None,
    example_inputs: ExampleInputs = None,
    trust_pickle: bool = False,
    seed: int = 0,
    opset: int = 18,
    probe_inputs: Mapping[str, np.ndarray] | None = None,
    trust_code: bool = False,
    input_values: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load a model file or object, export it to ONNX if needed, and record a reference output.

    Args:
        source: path to a ``.onnx``, TorchScript, ``.pt2`` or ``torch.save`` file; or an
            in-memory ``torch.nn.Module``, ``torch.jit.ScriptModule``,
            ``torch.export.ExportedProgram`` or ``onnx.ModelProto``.
        input_specs: input names/shapes/dtypes where the source does not fix them (unnamed
            specs match inputs by position).
        example_inputs: example tensors (a tuple of positional inputs or a dict of keyword
            inputs) for torch sources; they fix the input shapes and are what the export traces.
            Python numbers among them are constant arguments, as ``input_values``.
        trust_pickle: alias of ``trust_code``.
        seed: seed of the probe inputs.
        probe_inputs: the probe itself (arrays by input name; a leading dataset axis is cut to
            the input's batch), instead of seeded random inputs.
        opset: ONNX opset for torch exports, and the target when upgrading ONNX files below 17.
        trust_code: allow what runs code from the file: unpickling a ``torch.save``-d module or
            pickled ``.pt2`` members, TorchScript code calling file/network operators
            (:mod:`edgecc.frontend.trust`).
        input_values: values of non-tensor ``forward`` arguments (``{"sr": 16000}``), fixed
            as constants of the exported graph.

    Raises:
        UserInputError: missing/corrupt/unsupported file, unknown input shapes, failed export.
    """
    if opset < MIN_OPSET:
        raise UserInputError(f"opset {opset} is too old: edgecc needs opset >= {MIN_OPSET}")
    specs = list(input_specs or [])
    trust = trust_code or trust_pickle
    values = dict(input_values or {})
    if probe_inputs is not None:
        seed = probe_inputs  # the helpers below take "seed or the probe arrays"
    if isinstance(source, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(source)  # finalize edits in place; leave the caller's proto alone
        return _from_onnx(copy, specs, seed, opset, "onnx model", None, values)
    if isinstance(source, (str, Path)):
        return _from_file(Path(source), specs, example_inputs, trust, seed, opset, values)
    return _from_torch_object(source, specs, example_inputs, seed, opset, None, None, values)


def _from_file(
    path: Path,
    specs: list[InputSpec],
    example_inputs: ExampleInputs,
    trust: bool,
    seed: int | Mapping[str, np.ndarray],
    opset: int,
    values: dict[str, Any],
) -> LoadedModel:
    kind = detect.detect_format(path)
    digest = _sha256(path)
    if kind == detect.ONNX:
        return _from_onnx(read_onnx(path), specs, seed, opset, str(path), digest, values)
    import torch

    from edgecc.frontend.torch_export import quiet

    if kind == detect.TORCHSCRIPT:
        if not trust:
            _refuse_untrusted(path, "a TorchScript archive", trust_mod.torchscript_problem(path))
        try:
            with quiet():
                obj = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            raise UserInputError(f"cannot load TorchScript file {path}: {first_line(err)}") from err
    elif kind == detect.EXPORT:
        obj = _load_exported_program(path, trust)
    else:
        obj = _load_pickle(path, trust)
    return _from_torch_object(
        obj, specs, example_inputs, seed, opset, path, digest, values, pickled=kind == detect.PICKLE
    )


def _refuse_untrusted(path: Path, what: str, problem: str) -> None:
    if problem:
        raise UserInputError(
            f"{path} is {what} with {problem}: loading it runs code from the file; rerun with "
            "--trust-code (trust_code=True) if you trust it"
        )


def _from_onnx(
    model: onnx.ModelProto,
    specs: list[InputSpec],
    seed: int | Mapping[str, np.ndarray],
    opset: int,
    origin: str,
    digest: str | None,
    values: dict[str, Any],
) -> LoadedModel:
    import onnxruntime

    if values:
        raise UserInputError(
            f"--input-value {', '.join(values)}: ONNX models take tensors only; pass inputs' "
            "shapes with --input-shape"
        )
    model, inputs, fixed = finalize(model, specs, opset, origin)
    _stamp(model, "onnx", digest)
    probe = resolve_probe(inputs, seed, index_bounds(model))
    reference = _run_ort(model, probe, origin)
    return LoadedModel(
        model=model,
        inputs=inputs,
        output_names=[o.name for o in model.graph.output],
        source_format="onnx",
        source_sha256=digest,
        probe_inputs=probe,
        reference_outputs=reference,
        reference_source=f"onnxruntime {onnxruntime.__version__} (CPU, graph optimisations off)",
        source=origin,
        fixed_dims=fixed,
    )


def _run_ort(
    model: onnx.ModelProto, probe: dict[str, np.ndarray], what: str
) -> dict[str, np.ndarray]:
    """ONNX Runtime on the probe; custom-domain ops it cannot run are reported as unsupported."""
    try:
        return run_onnx(model, probe)
    except Exception as err:
        custom: dict[str, list[str]] = {}
        for node in model.graph.node:
            if node.domain not in ("", "ai.onnx", "ai.onnx.ml"):
                custom.setdefault(node.op_type, []).append(node.name or node.output[0])
        if custom:
            raise UnsupportedOperatorError(
                [(op, len(names), names) for op, names in sorted(custom.items())]
            ) from err
        raise UserInputError(f"ONNX Runtime cannot run {what}: {first_line(err)}") from err


# --- torch sources -------------------------------------------------------------------------


@dataclass
class _TorchPlan:
    """How to call and export one torch object."""

    fmt: str
    describe: str
    call: Callable[..., Any]
    pack: Callable[[dict[str, Any]], tuple[tuple, dict]]
    export: Callable[[tuple, dict, list[str], list[str]], onnx.ModelProto]
    specs: list[InputSpec]
    examples: dict[str, Any] | None
    hint: str = ""
    constants: dict[str, Any] = field(default_factory=dict)
    dynamic_dims: list[tuple[str, int, str]] = field(default_factory=list)


def _from_torch_object(
    obj: Any,
    specs: list[InputSpec],
    example_inputs: ExampleInputs,
    seed: int | Mapping[str, np.ndarray],
    opset: int,
    path: Path | None,
    digest: str | None,
    values: dict[str, Any] | None = None,
    pickled: bool = False,
) -> LoadedModel:
    import torch

    values = dict(values or {})
    if isinstance(obj, torch.export.ExportedProgram):
        if values:
            raise UserInputError(
                f"--input-value {', '.join(values)}: an ExportedProgram fixed its non-tensor "
                "arguments when it was exported"
            )
        plan = _exported_plan(obj, specs, example_inputs, opset)
    elif isinstance(obj, torch.jit.ScriptModule):
        plan = _script_plan(obj, specs, example_inputs, values, opset)
    elif isinstance(obj, torch.nn.Module):
        fmt = "pickle" if pickled else "module"
        plan = _module_plan(obj, specs, example_inputs, values, opset, fmt)
    else:
        raise UserInputError(
            f"cannot compile a {type(obj).__name__}: pass a model file, an nn.Module, a "
            "ScriptModule, an ExportedProgram or an onnx.ModelProto"
        )
    origin = str(path) if path else plan.describe
    with _eval_mode(obj):
        return _export_and_reference(plan, origin, digest, seed, opset)


def _export_and_reference(
    plan: _TorchPlan,
    origin: str,
    digest: str | None,
    seed: int | Mapping[str, np.ndarray],
    opset: int,
) -> LoadedModel:
    import torch

    from edgecc.frontend.torch_export import error_line, run_torch

    check_probe_size(plan.specs)
    example = plan.examples or _as_torch(placeholder_inputs(plan.specs))
    args, kwargs = plan.pack(example)
    try:
        traced_outputs = run_torch(plan.call, args, kwargs)
    except Exception as err:
        raise UserInputError(
            f"running {origin} on example inputs failed: {error_line(err)}"
        ) from err
    names = [name for name, _ in traced_outputs]
    try:
        model = plan.export(args, kwargs, [s.name for s in plan.specs], names)
    except Exception as err:
        logger.debug("export of %s failed", origin, exc_info=True)
        raise UserInputError(
            f"exporting {origin} to ONNX failed: {error_line(err)}{plan.hint}"
        ) from err
    model.doc_string = (
        f"exported by edgecc from {plan.fmt} ({plan.describe}) with torch {torch.__version__}"
    )
    model, inputs, fixed = finalize(model, plan.specs, opset, origin)
    if plan.dynamic_dims:  # exported static (see _exported_plan): name the dims fixed here
        shapes = {s.name: s.shape for s in inputs}
        fixed = [
            {"input": name, "axis": axis, "dim": symbol, "value": shapes[name][axis]}
            for name, axis, symbol in plan.dynamic_dims
            if name in shapes
        ]
        log_fixed_dims(origin, fixed)
    _stamp(model, plan.fmt, digest)
    output_names = [o.name for o in model.graph.output]
    if len(output_names) != len(names):
        raise UserInputError(
            f"exporting {origin}: torch returns {len(names)} tensors but the ONNX graph has "
            f"{len(output_names)} outputs"
        )
    probe = resolve_probe(inputs, seed, index_bounds(model))
    unused = [s.name for s in plan.specs if s.name not in probe]
    if unused:  # the exporter dropped inputs the graph never reads; torch still takes them
        logger.warning("%s: inputs %s do not affect the outputs", origin, ", ".join(unused))
    args, kwargs = plan.pack(_as_torch({**placeholder_inputs(plan.specs), **probe}))
    try:
        outputs = run_torch(plan.call, args, kwargs)
    except Exception as err:
        raise UserInputError(
            f"running {origin} on the probe inputs failed: {error_line(err)}"
        ) from err
    reference = {name: value for name, (_, value) in zip(output_names, outputs, strict=True)}
    check = compare_outputs(_run_ort(model, probe, f"the graph exported from {origin}"), reference)
    level = logging.INFO
    if check["cosine"] < _EXPORT_WARN_COSINE or check["max_rel_diff"] > _EXPORT_WARN_REL:
        level = logging.WARNING
    logger.log(level, "%s: exported graph vs torch on the probe: %s", origin, check)
    return LoadedModel(
        model=model,
        inputs=inputs,
        output_names=output_names,
        source_format=plan.fmt,
        source_sha256=digest,
        probe_inputs=probe,
        reference_outputs=reference,
        reference_source=f"torch {torch.__version__} ({plan.describe}, CPU)",
        export_check=check,
        source=origin,
        input_values=plan.constants,
        fixed_dims=fixed,
    )


@dataclass
class _Params:
    """A ``forward`` signature: what binding by name needs.

    Attributes:
        names: parameter names in order (``self`` excluded).
        closed: no ``*args``/``**kwargs``: a name outside ``names`` is an error.
        types: type of each parameter where known (TorchScript: ``Tensor``, ``int``...).
        defaults: default values of parameters that have one.
    """

    names: list[str]
    closed: bool
    types: dict[str, str]
    defaults: dict[str, Any]

    def is_tensor(self, name: str) -> bool:
        kind = self.types.get(name, "Tensor")
        return "Tensor" in kind

    def signature(self) -> str:
        return ", ".join(
            f"{n}: {self.types[n]}" if n in self.types and not self.is_tensor(n) else n
            for n in self.names
        )


@dataclass
class _Binding:
    specs: list[InputSpec]
    examples: dict[str, Any] | None
    by_keyword: bool
    constants: dict[str, Any]


def _module_plan(
    module: Any,
    specs: list[InputSpec],
    example_inputs: ExampleInputs,
    values: dict[str, Any],
    opset: int,
    fmt: str,
) -> _TorchPlan:
    from edgecc.frontend.torch_export import export_dynamo

    params = _forward_params(module)
    bind = _bind_inputs(specs, example_inputs, values, params, type(module).__name__, True)
    return _TorchPlan(
        fmt=fmt,
        describe=f"nn.Module {type(module).__name__}",
        call=module,
        pack=_packer(bind, params),
        export=lambda a, k, i, o: export_dynamo(module, a, k, i, o, opset),
        specs=bind.specs,
        examples=bind.examples,
        constants=bind.constants,
    )


def _script_plan(
    module: Any,
    specs: list[InputSpec],
    example_inputs: ExampleInputs,
    values: dict[str, Any],
    opset: int,
) -> _TorchPlan:
    from edgecc.frontend.torch_export import export_torchscript

    arguments = module.forward.schema.arguments[1:]
    params = _Params(
        names=[a.name for a in arguments],
        closed=True,
        types={a.name: str(a.type) for a in arguments},
        defaults={a.name: a.default_value for a in arguments if a.has_default_value()},
    )
    bind = _bind_inputs(specs, example_inputs, values, params, "TorchScript module", False)
    pack = _packer(bind, params)
    positional = [n for n in params.names if n in bind.constants or n in _spec_names(bind)]
    return _TorchPlan(
        fmt="torchscript",
        describe="TorchScript module",
        call=module,
        pack=pack,
        export=lambda a, k, i, o: export_torchscript(
            module, a, positional[: len(a)], o, opset, bind.constants
        ),
        specs=bind.specs,
        examples=bind.examples,
        constants=bind.constants,
        hint=(
            " (TorchScript goes through torch's legacy exporter, which cannot export dict "
            "outputs or some ops; a torch.export.save .pt2 file uses the newer exporter)"
        ),
    )


def _spec_names(bind: _Binding) -> set[str]:
    return {s.name for s in bind.specs}


def _exported_plan(
    program: Any, specs: list[InputSpec], example_inputs: ExampleInputs, opset: int
) -> _TorchPlan:
    import torch
    from torch.utils import _pytree

    from edgecc.frontend.torch_export import export_dynamo

    names = list(program.graph_signature.user_inputs)
    in_spec = program.call_spec.in_spec
    stored = program.example_inputs
    if example_inputs is None and stored is not None:
        flat = _pytree.tree_leaves(stored)
        if len(flat) != len(names) or not all(isinstance(t, torch.Tensor) for t in flat):
            raise UserInputError(
                "the ExportedProgram's example inputs are not one tensor per input"
            )
        by_name = _named_specs(specs, names, "the ExportedProgram")
        specs = [by_name.get(n, _spec_of(n, t)) for n, t in zip(names, flat, strict=True)]
        examples = {n: t for n, t in zip(names, flat, strict=True) if n not in by_name}
        examples = examples if len(examples) == len(names) else None
    else:
        params = _Params(names, True, {}, {})
        bind = _bind_inputs(specs, example_inputs, {}, params, "ExportedProgram", True)
        specs, examples = bind.specs, bind.examples

    def pack(values: dict[str, Any]) -> tuple[tuple, dict]:
        args, kwargs = _pytree.tree_unflatten([values[n] for n in names], in_spec)
        return tuple(args), dict(kwargs)

    # A program with dynamic dims is re-exported from its module at the chosen static shapes:
    # exported as is, its shape arithmetic hides static sizes from ONNX shape inference (the
    # input graph's MatMuls had unknown shapes and counted 0 MACs).
    dynamic = _dynamic_dims(program, names)
    module = program.module()
    source = module if dynamic else program
    return _TorchPlan(
        fmt="export",
        describe="torch.export ExportedProgram",
        call=module,
        pack=pack,
        export=lambda a, k, i, o: export_dynamo(source, a, k, i, o, opset),
        specs=specs,
        examples=examples,
        dynamic_dims=dynamic,
    )


def _dynamic_dims(program: Any, names: list[str]) -> list[tuple[str, int, str]]:
    """(input, axis, symbol) of every symbolic dimension of the program's user inputs."""
    import torch

    out = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in names:
            continue
        value = node.meta.get("val")
        for axis, dim in enumerate(getattr(value, "shape", ())):
            if isinstance(dim, torch.SymInt):
                out.append((node.name, axis, str(dim)))
    return out


def _named_specs(specs: list[InputSpec], names: list[str], what: str) -> dict[str, InputSpec]:
    """Specs by name; unnamed ones take the inputs in order; unknown names are refused."""
    unknown = [s.name for s in specs if s.name and s.name not in names]
    if unknown:
        raise UserInputError(
            f"--input-shape names {', '.join(unknown)} are not inputs of {what}; its inputs "
            f"are: {', '.join(names)}"
        )
    by_name = {s.name: s for s in specs if s.name}
    free = iter(n for n in names if n not in by_name)
    for spec in specs:
        if not spec.name:
            name = next(free, None)
            if name is None:
                raise UserInputError(f"{len(specs)} input specs given but {what} has {len(names)}")
            by_name[name] = InputSpec(name, spec.shape, spec.dtype)
    return by_name


def _bind_inputs(
    specs: list[InputSpec],
    example_inputs: ExampleInputs,
    values: dict[str, Any],
    params: _Params,
    what: str,
    keywords_ok: bool,
) -> _Binding:
    """Input specs in ``forward`` order, example tensors (or None), constants, call style.

    Example inputs win (their shapes are what the user traced with); named specs must then
    agree with them. Without examples, specs name the inputs (unnamed ones take the tensor
    parameters in order). Names are bound to ``forward``'s parameter names, never by the order
    they were given in.
    """
    constants = _constants(values, params, what)
    if example_inputs is not None:
        return _bind_examples(specs, example_inputs, constants, params, what, keywords_ok)
    tensor_params = [n for n in params.names if n not in constants and params.is_tensor(n)]
    if not specs:
        required = tensor_params[:1] or ["input"]
        raise UserInputError(
            f"input shapes of the {what} are unknown: pass them with --input-shape "
            f"{required[0]}:1x3x224x224 (one per input; forward({params.signature() or '?'}))"
        )
    if params.closed or not params.names:
        names = tensor_params or [s.name or f"input_{i}" for i, s in enumerate(specs)]
        for spec in specs:
            if spec.name in params.names and not params.is_tensor(spec.name):
                raise UserInputError(
                    f"forward argument {spec.name!r} is a {params.types[spec.name]}, not a "
                    f"tensor: give its value with --input-value {spec.name}=VALUE"
                )
        by_name = _named_specs(specs, names, f"forward({params.signature()})")
    else:  # **kwargs: names outside the signature are accepted as keywords
        by_name = {s.name: s for s in specs if s.name}
        free = iter(n for n in tensor_params if n not in by_name)
        for spec in specs:
            if not spec.name:
                name = next(free, f"input_{len(by_name)}")
                by_name[name] = InputSpec(name, spec.shape, spec.dtype)
    _check_required(params, set(by_name) | set(constants), what)
    order = [n for n in params.names if n in by_name]
    order += [n for n in by_name if n not in params.names]
    by_keyword = keywords_ok and all(s.name for s in specs)
    return _Binding([by_name[n] for n in order], None, by_keyword, constants)


def _bind_examples(
    specs: list[InputSpec],
    example_inputs: ExampleInputs,
    constants: dict[str, Any],
    params: _Params,
    what: str,
    keywords_ok: bool,
) -> _Binding:
    import torch

    by_keyword = isinstance(example_inputs, Mapping)
    if by_keyword:
        items = list(example_inputs.items())
    else:
        values = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        items = [(_param_name(params.names, i), v) for i, v in enumerate(values)]
    unknown = [n for n, _ in items if params.closed and params.names and n not in params.names]
    if unknown:
        raise UserInputError(
            f"example inputs {', '.join(unknown)} are not arguments of "
            f"forward({params.signature()})"
        )
    examples = {}
    for name, value in items:
        if isinstance(value, (bool, int, float)) and not isinstance(value, np.ndarray):
            constants[name] = value
            continue
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value.copy())
        if not isinstance(value, torch.Tensor):
            raise UserInputError(
                f"example input {name!r} is a {type(value).__name__}, not a tensor or a number"
            )
        examples[name] = value
    resolved = [_spec_of(n, t) for n, t in examples.items()]
    given = {s.name: s for s in specs if s.name}
    extra = sorted(set(given) - set(examples))
    if extra:
        raise UserInputError(
            f"--input-shape names {', '.join(extra)} are not among the example inputs "
            f"({', '.join(examples)})"
        )
    for spec in resolved:
        if spec.name in given and given[spec.name].shape != spec.shape:
            raise UserInputError(
                f"input {spec.name!r}: --input-shape {given[spec.name].text()} disagrees "
                f"with the example input's shape {spec.text()}"
            )
    _check_required(params, set(examples) | set(constants), what)
    return _Binding(resolved, examples, by_keyword and keywords_ok, constants)


def _constants(values: Mapping[str, Any], params: _Params, what: str) -> dict[str, Any]:
    """``--input-value`` values, checked against the signature and cast to its types."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if params.closed and params.names and name not in params.names:
            raise UserInputError(
                f"--input-value {name}: not an argument of forward({params.signature()})"
            )
        kind = params.types.get(name, "")
        if "Tensor" in kind:
            raise UserInputError(
                f"--input-value {name}: that argument is a tensor; give its shape with "
                f"--input-shape {name}:..."
            )
        try:
            out[name] = {"int": int, "float": float, "bool": bool, "str": str}.get(
                kind, lambda v: v
            )(value)
        except (TypeError, ValueError) as err:
            raise UserInputError(f"--input-value {name}={value!r}: not a {kind}") from err
    return out


def _check_required(params: _Params, bound: set[str], what: str) -> None:
    """Non-tensor parameters without a value or a default are an error."""
    for name in params.names:
        if name in bound or name in params.defaults or params.is_tensor(name):
            continue
        raise UserInputError(
            f"forward argument {name!r} of the {what} is a {params.types[name]}, not a tensor: "
            f"give its value with --input-value {name}=VALUE"
        )


def _packer(bind: _Binding, params: _Params) -> Callable[[dict[str, Any]], tuple[tuple, dict]]:
    """Arguments for ``forward`` from the input tensors by name, with the constants."""
    tensor_names = [s.name for s in bind.specs]
    constants = bind.constants

    def pack(values: dict[str, Any]) -> tuple[tuple, dict]:
        merged = {**constants, **{n: values[n] for n in tensor_names}}
        if bind.by_keyword:
            return (), merged
        if not params.names:
            return tuple(merged[n] for n in tensor_names), {}
        given = [i for i, n in enumerate(params.names) if n in merged]
        upto = params.names[: given[-1] + 1] if given else []
        args = tuple(merged[n] if n in merged else params.defaults.get(n) for n in upto)
        return args, {}

    return pack


def _forward_params(module: Any) -> _Params:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return _Params([], False, {}, {})
    kinds = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )
    params = [p for p in sig.parameters.values() if p.kind in kinds]
    closed = len(params) == len(sig.parameters)
    return _Params(
        names=[p.name for p in params],
        closed=closed,
        types={},
        defaults={p.name: p.default for p in params if p.default is not p.empty},
    )


def _param_name(params: list[str], i: int) -> str:
    return params[i] if i < len(params) else f"input_{i}"


def _spec_of(name: str, tensor: Any) -> InputSpec:
    return InputSpec(name, tuple(tensor.shape), canonical_dtype(str(tensor.dtype)))


def _as_torch(values: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    return {
        k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))
        for k, v in values.items()
    }


@contextmanager
def _eval_mode(obj: Any) -> Iterator[None]:
    """Put a module in eval mode for the export; restore its previous mode afterwards."""
    module = obj if hasattr(obj, "train") and hasattr(obj, "training") else None
    was_training = bool(module is not None and module.training)
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if was_training:
            module.train()


# --- reading torch files safely --------------------------------------------------------------


def _load_pickle(path: Path, trust_pickle: bool) -> Any:
    """A ``torch.save`` file: a state_dict is refused, a module needs ``trust_pickle``."""
    import torch

    from edgecc.frontend.torch_export import quiet

    try:
        with quiet():
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise UserInputError(
                f"{path} is a pickled module{_unsafe_globals(path)}: unpickling it runs arbitrary "
                "code from the file; rerun with --trust-code (trust_code=True) if you trust it"
            ) from err
    except Exception as err:
        raise UserInputError(
            f"cannot read {path}: corrupt or truncated torch file ({first_line(err)})"
        ) from err
    else:
        raise _not_a_model(path, obj)
    try:
        with quiet():
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as err:
        raise UserInputError(
            f"cannot unpickle {path}: its module class is not importable here ({first_line(err)}); "
            "import the class first, or save the model with torch.jit.save / torch.export.save"
        ) from err
    if not isinstance(obj, torch.nn.Module):
        raise _not_a_model(path, obj)
    return obj


def _not_a_model(path: Path, obj: Any) -> UserInputError:
    if isinstance(obj, Mapping):
        return UserInputError(
            f"{path} holds a state_dict: weights only, without the architecture. Pass the "
            "nn.Module through the Python API (edgecc.compile(module, ...)), or save the model "
            "with torch.jit.save or torch.export.save"
        )
    return UserInputError(f"{path} holds a {type(obj).__name__}, not a model")


def _unsafe_globals(path: Path) -> str:
    """`` (classes: a, b)`` as listed by torch without unpickling, or ''."""
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return ""
    names = sorted(names, key=lambda n: (n.startswith("torch."), n))  # the user's classes first
    return f" (classes: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""


def _load_exported_program(path: Path, trust: bool) -> Any:
    """``torch.export.load``, after checking that it will run nothing from the file.

    See :mod:`edgecc.frontend.trust` for what torch 2.13 would run and what is checked; the
    load itself runs with ``torch.load`` held to ``weights_only=True`` unless trusted.
    """
    import torch

    from edgecc.frontend.torch_export import quiet

    guard = contextlib.nullcontext()
    if not trust:
        _refuse_untrusted(path, "a torch.export archive", trust_mod.pt2_problem(path))
        guard = trust_mod.no_unsafe_unpickling()
    try:
        with quiet(), guard:
            return torch.export.load(str(path))
    except Exception as err:
        raise UserInputError(f"cannot load torch.export archive {path}: {first_line(err)}") from err


def _stamp(model: onnx.ModelProto, fmt: str, digest: str | None) -> None:
    """Record where the model came from in its metadata (replacing earlier edgecc entries)."""
    props = {p.key: p.value for p in model.metadata_props if not p.key.startswith("edgecc.")}
    props["edgecc.source_format"] = fmt
    if digest:
        props["edgecc.source_sha256"] = digest
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
