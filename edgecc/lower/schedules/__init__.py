"""edgecc's CPU schedule rules: fast TIR for every fused kernel, without tuning.

TVM 0.27 schedules nothing on CPU (every fused kernel is a serial loop nest). These rules do, the
way dlight does for GPUs: after operator fusion each PrimFunc is offered to the rules in
:data:`RULES` order; the first rule that returns a schedule wins and the kernel is marked
scheduled. A kernel no rule matches keeps TVM's default (serial) code, and the coverage
(:class:`ScheduleCoverage`: kernel -> rule name or ``None``) goes into the manifest, so what was
scheduled, and by what, is visible.

Each rule lives in its own file of this package, is a :class:`CpuRule` (a dlight
``ScheduleRule``) built from :class:`CpuParams` (vector lanes, cores and cache sizes from the
target record, never from the compiling host), and registers itself with :func:`register_rule`
at a priority: specific rules (matmul, conv) before generic ones (reduction, elementwise).
Rules must be deterministic: the same kernel and params give the same schedule, so libraries stay
byte-for-byte reproducible.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgecc.targets import Target

log = logging.getLogger(__name__)

# Rule modules, imported on first use (each registers its rules). Listed here so the set of rules
# is data: a new rule is a new file plus one entry.
RULE_MODULES: tuple[str, ...] = (
    "int8_matmul",
    "int8_conv2d",
    "int8_batch_matmul",
    "conv2d",
    "depthwise",
    "pooling",
    "matmul",
    "reduction",
    "elementwise",
)


@dataclass(frozen=True)
class CpuParams:
    """What a rule may know about the CPU it schedules for.

    Attributes:
        lanes: fp32 lanes of one SIMD register (AVX-512 16, AVX2 8, NEON 4).
        cores: threads the parallel loops are split for.
        l1d_bytes: L1 data cache per core.
        l2_bytes: L2 cache per core.
        arch: ``x86_64`` or ``aarch64``.
    """

    lanes: int
    cores: int
    l1d_bytes: int
    l2_bytes: int
    arch: str

    @staticmethod
    def of(target: Target) -> CpuParams:
        """The params of a CPU target record (``vector_bits`` / 32 lanes)."""
        return CpuParams(
            lanes=max(1, target.vector_bits // 32),
            cores=max(1, target.cores),
            l1d_bytes=target.l1d_bytes,
            l2_bytes=target.l2_bytes,
            arch=target.arch,
        )


class CpuRule:
    """Base of edgecc's CPU rules: a dlight ``ScheduleRule`` holding :class:`CpuParams`.

    Subclasses set ``name`` and implement ``apply(func, target, tunable)``, returning a
    ``tvm.s_tir.Schedule`` or None when the kernel is not theirs. They must not raise for a
    kernel they decline; an exception inside a rule is logged and treated as a decline, so a
    rule's bug costs speed, never a build.
    """

    name: str = "cpu-rule"

    def __init__(self, params: CpuParams):
        self.params = params

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def is_target_available(self, target: Any) -> bool:
        return target.kind.name == "llvm"


@dataclass(order=True)
class _Entry:
    priority: int
    name: str = field(compare=True)
    factory: Callable[[CpuParams], CpuRule] = field(compare=False, default=None)  # type: ignore


_REGISTRY: list[_Entry] = []


def register_rule(priority: int) -> Callable[[type[CpuRule]], type[CpuRule]]:
    """Class decorator: register a :class:`CpuRule` at ``priority`` (lower is tried first)."""

    def wrap(cls: type[CpuRule]) -> type[CpuRule]:
        if not any(e.name == cls.name for e in _REGISTRY):
            _REGISTRY.append(_Entry(priority, cls.name, cls))
            _REGISTRY.sort()
        return cls

    return wrap


def schedules_enabled(schedules: bool | None = None) -> bool:
    """Whether the CPU schedule rules run: ``schedules`` if given, else not ``EDGECC_SCHEDULES``
    = ``off`` (also ``0``, ``false``, ``no``, ``none``). The one reader of that variable."""
    if schedules is not None:
        return schedules
    value = os.environ.get("EDGECC_SCHEDULES", "on").strip().lower()
    return value not in ("off", "0", "false", "no", "none")


def rules_for(params: CpuParams) -> list[CpuRule]:
    """Every registered rule, in the order they are tried, built for ``params``.

    ``EDGECC_SCHEDULES=off`` in the environment gives none (TVM's unscheduled default build, for
    before/after comparisons in the benchmarks).
    """
    if not schedules_enabled():
        return []
    for module in RULE_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return [entry.factory(params) for entry in _REGISTRY]


@dataclass
class ScheduleCoverage:
    """Which rule scheduled each kernel (``None``: no rule matched; TVM's serial default)."""

    kernels: dict[str, str | None] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON view: per-kernel rule, and counts per rule (``none`` for unscheduled kernels)."""
        counts: dict[str, int] = {}
        for rule in self.kernels.values():
            counts[rule or "none"] = counts.get(rule or "none", 0) + 1
        return {
            "kernels": dict(sorted(self.kernels.items())),
            "counts": dict(sorted(counts.items())),
        }


_CONSTANTS: contextvars.ContextVar[dict[int, Any] | None] = contextvars.ContextVar(
    "edgecc_kernel_constants", default=None
)


def constants() -> dict[int, Any]:
    """While :func:`apply_schedules` offers a kernel to the rules: the compile-time values
    (numpy) of its int8 parameters bound to constants, by parameter index (kernels called once
    only); empty otherwise (e.g. under MetaSchedule tuning). Rules whose exactness depends on
    the weights' values (:mod:`.int8_x86`) read them here."""
    return _CONSTANTS.get() or {}


def _int8_constants(mod: Any) -> dict[str, dict[int, Any]]:
    """Per PrimFunc name: its int8 constant arguments (index -> numpy), for kernels with exactly
    one ``call_tir`` site."""
    import tvm
    from tvm import relax

    found: dict[str, dict[int, Any]] = {}
    calls: dict[str, int] = {}

    def visit(expr: Any) -> None:
        if not isinstance(expr, relax.Call) or getattr(expr.op, "name", "") != "relax.call_tir":
            return
        name = getattr(expr.args[0], "name_hint", "")
        calls[name] = calls.get(name, 0) + 1
        args = getattr(expr.args[1], "fields", [])
        found[name] = {
            i: a.value.numpy()
            for i, a in enumerate(args)
            if isinstance(a, tvm.ir.expr.Constant) and str(a.value.dtype) == "int8"
        }

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return {name: values for name, values in found.items() if calls[name] == 1}


def apply_schedules(params: CpuParams, coverage: ScheduleCoverage):
    """A TVM module pass that schedules every unscheduled PrimFunc with the first matching rule.

    Records the winner of each kernel in ``coverage``. Only TIR functions are touched.
    """
    import tvm
    from tvm import tirx

    rules = rules_for(params)

    @tvm.transform.module_pass(opt_level=0, name="EdgeccApplyCpuSchedules")
    def _apply(mod, _ctx):
        from tvm import relax

        # Mark kernel parameters bound to constants (weights) as ``layout_free_buffers``: rules
        # may re-lay them out (see post_schedule_passes).
        mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
        # The smallest constant int8 weight of each kernel (the NEON int8 intrinsics need it).
        from edgecc.lower.schedules.int8_neon import weight_range_pass

        mod = weight_range_pass()(mod)
        values = _int8_constants(mod)
        updated = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)) == 1:
                continue
            name = gvar.name_hint
            target = tvm.target.Target.current(allow_none=False)
            coverage.kernels[name] = None
            token = _CONSTANTS.set(values.get(name))
            for rule in rules:
                try:
                    sch = rule.apply(func, target, False)
                except Exception as err:  # a rule bug must not break the build
                    log.warning("schedule rule %s failed on %s: %s", rule.name, name, err)
                    log.debug("rule failure", exc_info=True)
                    continue
                if sch is None:
                    continue
                updated[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                coverage.kernels[name] = rule.name
                break
            _CONSTANTS.reset(token)
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod

    return _apply


def pre_legalize_passes(params: CpuParams) -> list:
    """Relax passes run before legalization (layout choices such as channels-last convs).

    Rules that need a data layout other than the model's (blocked activations, packed weights)
    add the Relax rewrite here; constant weights are then re-laid out once, at compile time, by
    the ``FoldConstant`` that follows legalization.
    """
    from edgecc.lower.schedules.layout import channels_last_pass

    return [channels_last_pass()]


def post_schedule_passes(params: CpuParams) -> list:
    """Passes run right after the rules: weight-layout pre-processing blocks that rules put in
    kernels (``meta_schedule.layout_rewrite_preproc``, e.g. the matmul rule's packed weights)
    become functions of their own, which ``FoldConstant`` evaluates on the constant weights, so
    weights are re-laid out once, at compile time."""
    from tvm import relax

    return [relax.transform.SplitLayoutRewritePreproc(), relax.transform.FoldConstant()]
