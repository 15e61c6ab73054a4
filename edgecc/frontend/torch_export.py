"""Export torch models to ONNX quietly, and run them for reference outputs.

Two exporter paths, as torch 2.13 offers them:

* ``nn.Module`` and ``torch.export.ExportedProgram``: ``torch.onnx.export(..., dynamo=True,
  optimize=False)``. ``optimize=False`` keeps BatchNormalization (and every other op) as the
  model wrote it: folding is edgecc's passes' job, visibly.
* TorchScript (``torch.jit.ScriptModule``): ``torch.export`` refuses ScriptModules, so they go
  through the legacy TorchScript exporter (``dynamo=False``) with ``do_constant_folding=False``;
  that flag also disables its eval-mode Conv+BatchNorm fusion (``_jit_pass_onnx_eval_peephole``
  only runs with constant folding on).

Both exporters print progress, emit warnings and log through torch's own stderr handlers;
:func:`quiet` routes all of that to this module's logger at DEBUG level.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch

from edgecc.errors import UserInputError

logger = logging.getLogger(__name__)


class _Reroute(logging.Filter):
    """A handler filter that re-logs torch's records here at DEBUG and drops them."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger.debug("[%s] %s", record.name, record.getMessage())
        return False


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence stdout/stderr prints, warnings and torch log handlers; log them at DEBUG."""
    reroute = _Reroute()
    torch_loggers = [logging.getLogger("torch")] + [
        lg
        for name, lg in logging.Logger.manager.loggerDict.items()
        if name.startswith("torch.") and isinstance(lg, logging.Logger)
    ]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        for handler in {h for lg in torch_loggers for h in lg.handlers}:
            handler.addFilter(reroute)
            stack.callback(handler.removeFilter, reroute)
        stack.callback(_log_streams, out, err)
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            yield
        finally:
            for w in caught:
                logger.debug("warning: %s: %s", w.category.__name__, w.message)


def _log_streams(out: io.StringIO, err: io.StringIO) -> None:
    for stream, text in (("stdout", out.getvalue()), ("stderr", err.getvalue())):
        if text.strip():
            logger.debug("exporter %s:\n%s", stream, text.rstrip())


def flatten_outputs(value: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """The tensors of a model's output in pytree order, with stable names.

    A single tensor is ``output``; a tuple/list gives ``output_0, output_1...``; a mapping (dict,
    Hugging Face ``ModelOutput``) gives its keys; nesting joins with ``.`` and ``_<i>``. ``None``
    entries are skipped, as the exporters skip them.
    """
    if isinstance(value, torch.Tensor):
        return [(prefix or "output", value)]
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [
            item
            for key, sub in value.items()
            for item in flatten_outputs(sub, f"{prefix}.{key}" if prefix else str(key))
        ]
    if isinstance(value, (tuple, list)):
        return [
            item
            for i, sub in enumerate(value)
            for item in flatten_outputs(sub, f"{prefix}_{i}" if prefix else f"output_{i}")
        ]
    raise UserInputError(
        f"model output {prefix or 'output'} is a {type(value).__name__}; only tensors "
        "(in tuples, lists and dicts) can be exported"
    )


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy of ``tensor`` (bfloat16 widened to float32, which numpy lacks)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy().copy()


def run_torch(
    fn: Callable[..., Any], args: Sequence[torch.Tensor], kwargs: Mapping[str, torch.Tensor]
) -> list[tuple[str, np.ndarray]]:
    """Run ``fn(*args, **kwargs)`` without gradients; flattened, named numpy outputs."""
    with torch.no_grad(), quiet():
        result = fn(*args, **kwargs)
    return [(name, to_numpy(t)) for name, t in flatten_outputs(result)]


def export_dynamo(
    model: torch.nn.Module | torch.export.ExportedProgram,
    args: tuple[torch.Tensor, ...],
    kwargs: dict[str, torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
) -> onnx.ModelProto:
    """Export through ``torch.export`` (``dynamo=True, optimize=False``)."""
    with quiet():
        program = torch.onnx.export(
            model,
            args,
            kwargs=kwargs,
            dynamo=True,
            optimize=False,
            verbose=False,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            external_data=False,
        )
    return program.model_proto


def export_torchscript(
    module: torch.jit.ScriptModule,
    args: tuple[Any, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
    constants: Mapping[str, Any] | None = None,
) -> onnx.ModelProto:
    """Export a ScriptModule with the legacy TorchScript exporter, no constant folding.

    ``args`` are ``forward``'s positional arguments, named by ``input_names``; the legacy
    exporter makes graph inputs even of Python numbers, so the inputs named in ``constants``
    become initializers holding those values.
    """
    buffer = io.BytesIO()
    with quiet():
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            do_constant_folding=False,
            verbose=False,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            training=torch.onnx.TrainingMode.EVAL,
        )
    model = onnx.load_from_string(buffer.getvalue())
    _inputs_to_constants(model, constants or {})
    return model


def _inputs_to_constants(model: onnx.ModelProto, constants: Mapping[str, Any]) -> None:
    graph = model.graph
    for inp in list(graph.input):
        if inp.name not in constants:
            continue
        ttype = inp.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        dims = [d.dim_value for d in ttype.shape.dim]
        value = np.array(constants[inp.name], dtype=dtype).reshape(dims)
        graph.initializer.append(onnx.numpy_helper.from_array(value, inp.name))
        graph.input.remove(inp)


_TS_FAILED = "The following operation failed in the TorchScript interpreter"
_ERROR_LINE = re.compile(r"(?:[\w.]*(?:Error|Exception)): (.+)")


def error_line(err: BaseException) -> str:
    """One line saying why ``err`` happened.

    TorchScript's interpreter errors start with a fixed sentence and a TorchScript traceback;
    the reason is the last ``SomeError: ...`` line, which is what is returned for them.
    """
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith(_TS_FAILED):
        for line in reversed(lines):
            match = _ERROR_LINE.fullmatch(line)
            if match:
                return match.group(1)
    return lines[0] if lines else type(err).__name__
