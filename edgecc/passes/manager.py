"""Pass manager: pipelines as data, passes looked up by name, instruments around each pass.

A pass is any callable ``pass_(model, ctx) -> PassResult`` registered under a short name with
:func:`register`. Its options are keyword arguments to its constructor, so a pipeline is a list of
``PassSpec(name, options)`` and also a text ``fold-bn,prune(ratio=0.3,round_to=8),qdq`` that
round-trips through :func:`parse_pipeline` / :func:`format_pipeline`.

Options are checked in one place, before any pass runs: the constructor's type hints are each
pass's option schema (:func:`option_schema`), and :meth:`PassSpec.build` refuses an unknown or
repeated option, or a value not of the declared type, with one line naming the pass, the option
and the expected type (a :class:`~edgecc.errors.UserInputError`, exit code 2). Passes check only
ranges and names.

A pass that leaves the graph unchanged says why in one line (``PassResult.reason``); the
manager logs it, and logs the effective pipeline (without the ``--disable-pass`` entries).

Instruments (as in TVM's ``PassInstrument``) see every pass before and after it runs: dumps,
timing and reference comparison live there, never inside passes. The manager itself gives new
nodes a unique name and tags them with ``edgecc.pass=<name>`` metadata, so a dump shows where
every node came from.
"""

from __future__ import annotations

import ast
import collections.abc
import hashlib
import inspect
import logging
import math
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from edgecc.errors import EdgeccError, PassError, UserInputError

logger = logging.getLogger(__name__)

PASS_TAG = "edgecc.pass"
# Passes that often have nothing to do (cleanup); their "no change" is logged at INFO, not WARNING.
HOUSEKEEPING = frozenset(
    {
        "fold-constants",
        "expand-rnn",
        "qlinear-to-qdq",
        "remove-identity",
        "eliminate-dead",
        "shape-inference",
    }
)


@dataclass
class PassResult:
    """What a pass returns.

    Attributes:
        model: the (possibly new) model.
        modified: True exactly when the graph changed.
        info: JSON-serialisable facts for the report (per-layer errors, declined rewrites, notes).
        reason: when ``modified`` is False, one line saying why nothing changed (e.g. "no
            BatchNormalization in the graph"); the manager logs it and records it in ``info``.
    """

    model: onnx.ModelProto
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


@dataclass
class PassContext:
    """Shared, read-only facts a pass may need.

    Attributes:
        target: the target record (``edgecc.targets.Target``) or None when not compiling.
        calibration: a factory giving an iterator of input dicts (for qdq), or None.
        calibration_source: a human-readable description of where calibration data came from.
        probe_inputs: the seeded probe inputs the reference was recorded on.
        seed: seed for anything random.
        train_data: arrays by input name (plus optional ``labels``) for training passes.
        train_source: a human-readable description of where the training data came from.
        source_model: the float graph the pipeline started from (the teacher of ``distill``);
            :meth:`PassManager.run` fills it in when it is None.
        progress: called with one-line progress messages (training epochs), or None.
    """

    target: Any = None
    calibration: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None
    calibration_source: str | None = None
    probe_inputs: dict[str, np.ndarray] | None = None
    seed: int = 0
    train_data: Mapping[str, np.ndarray] | None = None
    train_source: str | None = None
    source_model: onnx.ModelProto | None = None
    progress: Callable[[str], None] | None = None


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
        """The pass object, after checking the options against the pass's schema."""
        passes = registered_passes()
        if self.name not in passes:
            raise UserInputError(f"unknown pass {self.name!r}; known passes: {', '.join(passes)}")
        check_options(self.name, passes[self.name], self.options)
        try:
            return passes[self.name](**dict(self.options))
        except (TypeError, ValueError) as err:
            raise UserInputError(f"bad options for pass {self.name!r}: {err}") from err

    def text(self) -> str:
        if not self.options:
            return self.name
        opts = ",".join(f"{k}={_format_value(v)}" for k, v in self.options)
        return f"{self.name}({opts})"


def option_schema(cls: type) -> dict[str, tuple[Any, Any]]:
    """Option name -> (type hint, default) a pass declares: its constructor's keyword arguments.

    The hints are read with :func:`typing.get_type_hints`, so they are the pass's one schema.
    """
    init = cls.__init__
    if init is object.__init__:
        return {}
    module = sys.modules.get(cls.__module__)
    namespace = {**vars(collections.abc), **vars(typing), **(vars(module) if module else {})}
    try:
        hints = typing.get_type_hints(init, globalns=namespace)
    except Exception:  # an unresolvable hint: accept any value for that option
        hints = {}
    return {
        name: (hints.get(name, Any), p.default)
        for name, p in inspect.signature(init).parameters.items()
        if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def check_options(pass_name: str, cls: type, options: Sequence[tuple[str, Any]]) -> None:
    """Refuse unknown or repeated options and values not of the declared type (one line each)."""
    schema = option_schema(cls)
    seen: set[str] = set()
    for key, value in options:
        if key in seen:
            raise UserInputError(f"{pass_name}: option {key!r} given twice")
        seen.add(key)
        if key not in schema:
            known = ", ".join(schema) or "none"
            raise UserInputError(f"{pass_name}: unknown option {key!r}; its options: {known}")
        hint = schema[key][0]
        if not _conforms(value, hint):
            raise UserInputError(
                f"{pass_name}: option {key}={_format_value(value)} must be {_describe(hint)}"
            )


def _union_args(hint: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


def _conforms(value: Any, hint: Any) -> bool:
    """True when ``value`` (as parsed from pipeline text) has the type ``hint`` describes."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if (args := _union_args(hint)) is not None:
        return any(_conforms(value, a) for a in args)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (collections.abc.Mapping, dict):
        key_t, val_t = args or (Any, Any)
        return isinstance(value, dict) and all(
            _conforms(k, key_t) and _conforms(v, val_t) for k, v in value.items()
        )
    if origin in (collections.abc.Sequence, collections.abc.Iterable, list, tuple):
        item = args[0] if args else Any
        if isinstance(value, str):  # a str is a sequence of names of length one here
            return _conforms(value, item)
        return isinstance(value, (list, tuple)) and all(_conforms(v, item) for v in value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    """``hint`` in words, for an error message."""
    if (args := _union_args(hint)) is not None:
        return " or ".join(_describe(a) for a in args)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (collections.abc.Mapping, dict):
        key_t, val_t = args or (Any, Any)
        return f"a map {{{_describe(key_t)}:{_describe(val_t)}}}"
    if origin in (collections.abc.Sequence, collections.abc.Iterable, list, tuple):
        return f"a list [...] of {_describe(args[0]) if args else 'values'}"
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a name"}
    if hint is None or hint is type(None):
        return "None"
    return words.get(hint, getattr(hint, "__name__", str(hint)))


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
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
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


MAX_NESTING = 8  # brackets deeper than this are refused (no pass option nests that deep)


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
            if depth > MAX_NESTING:
                raise UserInputError(
                    f"brackets nested more than {MAX_NESTING} deep in the pipeline"
                )
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise UserInputError(f"unbalanced brackets in {text!r}")
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
            key = key.strip().replace("-", "_")
            if not eq or not key.isidentifier():
                raise UserInputError(f"option {part!r} of pass {name!r} needs the form key=value")
            if key in dict(options):
                raise UserInputError(f"{name}: option {key!r} given twice")
            options.append((key, _parse_value(val)))
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
        from edgecc.passes.gradual import expand_gradual

        self.specs = expand_gradual(specs)
        self.instruments = list(instruments)
        self.disabled = set(disabled)
        known = registered_passes()
        for name in self.disabled:
            if name not in known:
                raise UserInputError(
                    f"--disable-pass {name!r}: unknown pass; known: {', '.join(known)}"
                )
        for name in sorted(self.disabled - {s.name for s in self.specs}):
            logger.warning(
                "--disable-pass %s has no effect: %s is not in the pipeline %s",
                name,
                name,
                format_pipeline(self.specs) or "(empty)",
            )
            self.disabled.discard(name)  # not recorded as used
        self.passes = [s.build() for s in self.specs]  # fail on bad options before any work
        self.records: list[PassRecord] = []

    @property
    def effective(self) -> list[PassSpec]:
        """The passes that will run: the pipeline without the disabled ones."""
        return [s for s in self.specs if s.name not in self.disabled]

    def uses(self, name: str) -> bool:
        """True when a pass called ``name`` will run."""
        return any(s.name == name for s in self.effective)

    def run(self, model: onnx.ModelProto, ctx: PassContext | None = None) -> onnx.ModelProto:
        ctx = ctx or PassContext()
        model = clone(model)
        tag_nodes(model, {}, "input")
        if ctx.source_model is None:
            ctx.source_model = clone(model)
        for inst in self.instruments:
            inst.before_pipeline(model, ctx)
        skipped = [s.text() for s in self.specs if s.name in self.disabled]
        logger.info(
            "pipeline: %s%s",
            format_pipeline(self.effective) or "(empty)",
            f" (disabled: {', '.join(skipped)})" if skipped else "",
        )
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
            tag_nodes(result.model, _origins(model), spec.name)
            model = result.model
            if not result.modified:
                reason = result.reason or "nothing to do (the pass gave no reason)"
                result.info.setdefault("no_change", reason)
            self.records.append(PassRecord(index, spec, result.modified, seconds, result.info))
            if result.modified:
                logger.info("pass %d %s: modified in %.2fs", index, spec.text(), seconds)
            else:  # a compression pass that does nothing deserves a warning; housekeeping not
                logger.log(
                    logging.INFO if spec.name in HOUSEKEEPING else logging.WARNING,
                    "pass %d %s: no change: %s",
                    index,
                    spec.text(),
                    result.info["no_change"],
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


REWRITE_TAG = "edgecc.rewritten"


def _fingerprint(node: onnx.NodeProto, digests: Mapping[str, str]) -> str:
    """The node without its metadata, plus the digests of the initializers it reads."""
    bare = onnx.NodeProto()
    bare.CopyFrom(node)
    del bare.metadata_props[:]
    body = bare.SerializeToString() + "|".join(digests.get(i, "") for i in node.input).encode()
    return hashlib.sha1(body).hexdigest()


def _digests(model: onnx.ModelProto) -> dict[str, str]:
    return {
        t.name: hashlib.sha1(t.SerializeToString()).hexdigest() for t in model.graph.initializer
    }


def _origins(model: onnx.ModelProto) -> dict[str, tuple[str, str, str]]:
    """Node name -> (creating pass, passes that rewrote it, fingerprint), before a pass runs."""
    digests = _digests(model)
    return {
        n.name: (node_tag(n), _meta(n, REWRITE_TAG), _fingerprint(n, digests))
        for n in model.graph.node
    }


def _meta(node: onnx.NodeProto, key: str, default: str = "") -> str:
    return next((p.value for p in node.metadata_props if p.key == key), default)


def _set_meta(node: onnx.NodeProto, key: str, value: str) -> None:
    for i in reversed(range(len(node.metadata_props))):
        if node.metadata_props[i].key == key:
            del node.metadata_props[i]
    if value:
        entry = node.metadata_props.add()
        entry.key, entry.value = key, value


def tag_nodes(
    model: onnx.ModelProto, previous: Mapping[str, tuple[str, str, str]], pass_name: str
) -> None:
    """Name unnamed nodes uniquely and record which pass created or rewrote each node.

    A node whose name existed before the pass keeps its creator tag (even if the pass rebuilt
    it through onnx-graphsurgeon, which drops metadata); when its inputs, attributes or the
    initializers it reads changed, ``pass_name`` is added to its ``edgecc.rewritten`` list. Any
    other node is tagged ``pass_name``. ``previous`` comes from :func:`_origins`.
    """
    used = {n.name for n in model.graph.node if n.name}
    digests = _digests(model) if previous else {}
    counter = 0
    for node in model.graph.node:
        if not node.name:
            while f"{node.op_type}_{counter}" in used:
                counter += 1
            node.name = f"{node.op_type}_{counter}"
            used.add(node.name)
        if not previous:
            tag, rewritten = node_tag(node, pass_name), _meta(node, REWRITE_TAG)
        elif node.name in previous:
            tag, rewritten, before = previous[node.name]
            if _fingerprint(node, digests) != before and pass_name not in rewritten.split(","):
                rewritten = f"{rewritten},{pass_name}" if rewritten else pass_name
        else:
            tag, rewritten = pass_name, ""
        _set_meta(node, PASS_TAG, tag)
        _set_meta(node, REWRITE_TAG, rewritten)


def node_tag(node: onnx.NodeProto, default: str = "input") -> str:
    """The pass that created ``node`` (``input`` for nodes of the loaded model)."""
    return _meta(node, PASS_TAG, default)


def node_origin(node: onnx.NodeProto) -> str:
    """Where ``node`` came from, e.g. ``input`` or ``input, rewritten by fold-bn, prune``."""
    rewritten = _meta(node, REWRITE_TAG)
    tag = node_tag(node)
    return f"{tag}, rewritten by {rewritten.replace(',', ', ')}" if rewritten else tag


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
