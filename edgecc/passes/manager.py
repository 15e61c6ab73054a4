"""Pass manager: pipelines as data, passes looked up by name, instruments around each pass.

A pass is any callable ``pass_(model, ctx) -> PassResult`` registered under a short name with
:func:`register`. Its options are keyword arguments to its constructor, so a pipeline is a list of
``PassSpec(name, options)`` and also a text ``fold-bn,prune(ratio=0.3,round_to=8),qdq`` that
round-trips through :func:`parse_pipeline` / :func:`format_pipeline`.

Instruments (as in TVM's ``PassInstrument``) see every pass before and after it runs: dumps,
timing and reference comparison live there, never inside passes. The manager itself gives new
nodes a unique name and tags them with ``edgecc.pass=<name>`` metadata, so a dump shows where
every node came from.
"""

from __future__ import annotations

import ast
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from edgecc.errors import EdgeccError, PassError, UserInputError

logger = logging.getLogger(__name__)

PASS_TAG = "edgecc.pass"


@dataclass
class PassResult:
    """What a pass returns.

    Attributes:
        model: the (possibly new) model.
        modified: True exactly when the graph changed.
        info: JSON-serialisable facts for the report (per-layer errors, declined rewrites, notes).
    """

    model: onnx.ModelProto
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """Shared, read-only facts a pass may need.

    Attributes:
        target: the target record (``edgecc.targets.Target``) or None when not compiling.
        calibration: a factory giving an iterator of input dicts (for qdq), or None.
        calibration_source: a human-readable description of where calibration data came from.
        probe_inputs: the seeded probe inputs the reference was recorded on.
        seed: seed for anything random.
    """

    target: Any = None
    calibration: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None
    calibration_source: str | None = None
    probe_inputs: dict[str, np.ndarray] | None = None
    seed: int = 0


class Pass(Protocol):
    """The pass protocol: a name and a call."""

    name: str

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult: ...


_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a pass available to pipelines under ``name``."""

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pass name {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_passes() -> dict[str, type]:
    """Name -> class of every registered pass (importing ``edgecc.passes`` registers them all)."""
    import edgecc.passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(_REGISTRY.items()))


@dataclass(frozen=True)
class PassSpec:
    """One pipeline entry: a pass name and its options."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def build(self) -> Pass:
        passes = registered_passes()
        if self.name not in passes:
            raise UserInputError(f"unknown pass {self.name!r}; known passes: {', '.join(passes)}")
        try:
            return passes[self.name](**dict(self.options))
        except TypeError as err:
            raise UserInputError(f"bad options for pass {self.name!r}: {err}") from err

    def text(self) -> str:
        if not self.options:
            return self.name
        opts = ",".join(f"{k}={_format_value(v)}" for k, v in self.options)
        return f"{self.name}({opts})"


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w.\-/]*", value):
        return value
    return repr(value)


def _parse_value(text: str) -> Any:
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if text.startswith("[") and text.endswith("]"):
        return [_parse_value(p) for p in _split_top(text[1:-1])] if text[1:-1].strip() else []
    if text.startswith("{") and text.endswith("}"):
        out = {}
        for part in _split_top(text[1:-1]):
            key, _, val = part.partition(":")
            out[key.strip().strip("'\"")] = _parse_value(val)
        return out
    if text in ("true", "false"):
        return text == "true"
    return text


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if depth or quote:
        raise UserInputError(f"unbalanced brackets or quotes in {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse ``fold-bn,prune(ratio=0.3,skip=[conv1]),qdq`` into pass specs.

    Values are Python literals where they parse as such, else bare strings; lists use ``[]``.
    An empty text (or ``none``) is the empty pipeline.
    """
    if not text.strip() or text.strip() == "none":
        return []
    specs = []
    for item in _split_top(text):
        m = re.fullmatch(r"([A-Za-z][\w\-]*)\s*(?:\((.*)\))?", item, flags=re.S)
        if not m:
            raise UserInputError(f"cannot parse pipeline entry {item!r}")
        name, body = m.group(1), m.group(2)
        options = []
        for part in _split_top(body or ""):
            key, eq, val = part.partition("=")
            if not eq:
                raise UserInputError(f"option {part!r} of pass {name!r} needs the form key=value")
            options.append((key.strip().replace("-", "_"), _parse_value(val)))
        specs.append(PassSpec(name, tuple(options)))
    return specs


def format_pipeline(specs: Sequence[PassSpec]) -> str:
    """The text form of a pipeline; ``parse_pipeline(format_pipeline(s)) == s``."""
    return ",".join(s.text() for s in specs)


class Instrument:
    """Hooks around every pass. Subclass and override what you need."""

    def before_pipeline(self, model: onnx.ModelProto, ctx: PassContext) -> None:  # noqa: B027
        """Called once with the input model."""

    def before_pass(self, index: int, spec: PassSpec, model: onnx.ModelProto) -> None:  # noqa: B027
        """Called before pass number ``index`` (1-based) runs."""

    def after_pass(self, index: int, spec: PassSpec, result: PassResult, seconds: float) -> None:  # noqa: B027
        """Called after the pass ran, with its result."""

    def on_error(
        self, index: int, spec: PassSpec, model: onnx.ModelProto, err: BaseException
    ) -> None:  # noqa: B027
        """Called when the pass raised; ``model`` is its input."""


@dataclass
class PassRecord:
    """What the manager remembers of one pass run."""

    index: int
    spec: PassSpec
    modified: bool
    seconds: float
    info: dict[str, Any]
    skipped: bool = False


class PassManager:
    """Runs a pipeline of passes with instruments.

    Args:
        specs: the pipeline.
        instruments: hooks run around every pass.
        disabled: pass names to skip (``--disable-pass``), for bisecting.
    """

    def __init__(
        self,
        specs: Sequence[PassSpec],
        instruments: Sequence[Instrument] = (),
        disabled: Iterable[str] = (),
    ):
        self.specs = list(specs)
        self.instruments = list(instruments)
        self.disabled = set(disabled)
        known = registered_passes()
        for name in self.disabled:
            if name not in known:
                raise UserInputError(
                    f"--disable-pass {name!r}: unknown pass; known: {', '.join(known)}"
                )
        self.passes = [s.build() for s in self.specs]  # fail on bad options before any work
        self.records: list[PassRecord] = []

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> onnx.ModelProto:
        ctx = ctx or PassContext()
        model = clone(model)
        tag_nodes(model, {}, "input")
        for inst in self.instruments:
            inst.before_pipeline(model, ctx)
        for index, (spec, pass_) in enumerate(zip(self.specs, self.passes, strict=True), start=1):
            if spec.name in self.disabled:
                logger.info("pass %d %s skipped (--disable-pass)", index, spec.name)
                self.records.append(PassRecord(index, spec, False, 0.0, {}, skipped=True))
                continue
            for inst in self.instruments:
                inst.before_pass(index, spec, model)
            start = time.perf_counter()
            try:
                result = pass_(clone(model), ctx)  # each pass edits its own copy
            except EdgeccError as err:
                for inst in self.instruments:
                    inst.on_error(index, spec, model, err)
                raise type(err)(f"pass {index} {spec.text()}: {err}{self._after(index)}") from err
            except Exception as err:
                for inst in self.instruments:
                    inst.on_error(index, spec, model, err)
                raise PassError(
                    f"pass {index} {spec.text()} failed: {type(err).__name__}: {err}"
                    f"{self._after(index)}"
                ) from err
            seconds = time.perf_counter() - start
            tag_nodes(result.model, {n.name: node_tag(n) for n in model.graph.node}, spec.name)
            model = result.model
            self.records.append(PassRecord(index, spec, result.modified, seconds, result.info))
            logger.info(
                "pass %d %s: %s in %.2fs",
                index,
                spec.text(),
                "modified" if result.modified else "no change",
                seconds,
            )
            for inst in self.instruments:
                inst.after_pass(index, spec, result, seconds)
        return model

    def _after(self, index: int) -> str:
        before = [s.text() for s in self.specs[: index - 1] if s.name not in self.disabled]
        return f" (after: {', '.join(before)})" if before else " (first pass)"


def clone(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy, so passes may edit in place without touching the caller's model."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def tag_nodes(model: onnx.ModelProto, previous: dict[str, str], pass_name: str) -> None:
    """Name unnamed nodes uniquely and record which pass created each node.

    A node whose name existed before the pass keeps its old tag (even if the pass rebuilt it
    through onnx-graphsurgeon, which drops metadata); any other node is tagged ``pass_name``.
    """
    used = {n.name for n in model.graph.node if n.name}
    counter = 0
    for node in model.graph.node:
        if not node.name:
            while f"{node.op_type}_{counter}" in used:
                counter += 1
            node.name = f"{node.op_type}_{counter}"
            used.add(node.name)
        tag = previous.get(node.name, pass_name) if previous else node_tag(node, pass_name)
        for i in reversed(range(len(node.metadata_props))):
            if node.metadata_props[i].key == PASS_TAG:
                del node.metadata_props[i]
        entry = node.metadata_props.add()
        entry.key, entry.value = PASS_TAG, tag


def node_tag(node: onnx.NodeProto, default: str = "input") -> str:
    """The pass that created ``node`` (``input`` for nodes of the loaded model)."""
    return next((p.value for p in node.metadata_props if p.key == PASS_TAG), default)


class TimingInstrument(Instrument):
    """Collects per-pass wall time (``--time-passes``)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []

    def after_pass(self, index: int, spec: PassSpec, result: PassResult, seconds: float) -> None:
        self.rows.append((f"{index:03d}_{spec.name}", seconds))


class FailureDumpInstrument(Instrument):
    """Saves the input of a failing pass to ``<dir>/failed_NNN_<pass>.onnx``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def on_error(
        self, index: int, spec: PassSpec, model: onnx.ModelProto, err: BaseException
    ) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"failed_{index:03d}_{spec.name}.onnx"
        onnx.save(model, str(path))
        logger.error("input of failing pass saved to %s", path)
