"""Rule variants: the schedule rules' own knobs, enumerated as tuning candidates.

The rules (:mod:`edgecc.lower.schedules`) take one deterministic decision per kernel from
:class:`~edgecc.lower.schedules.CpuParams`. Their knobs (``accumulators``: the register budget
of the micro-kernel, i.e. its tile size; ``max_vectors``: how many SIMD vectors wide a tile may
be; ``lanes``: the vector width, halved on 16-lane targets; ``parallel_tasks``: the parallel
granularity of matmuls; ``rows_outer``: the conv loop order) have defaults picked by a model of
the CPU; :func:`param_variants` lists other values, so tuning measures the rules' neighbours
first (:mod:`edgecc.lower.tune`): variants of a schedule already known to be good.

Order: the variants that change one knob (in the order of :data:`KNOBS`), then those changing
two, then three...; within a count, in the order the values are listed. The order depends on the
params only (deterministic), so two tunings measure the same candidates first.

Limits: a variant is a set of params, not a schedule: many give the same schedule for a given
kernel (a knob the rule does not read, a tile the shape does not allow). Callers apply the
rule and drop schedules they have seen (:func:`edgecc.lower.tune` hashes the scheduled module).
"""

from __future__ import annotations

import dataclasses
import itertools

from edgecc.lower.schedules import CpuParams


def knob_values(params: CpuParams) -> dict[str, tuple]:
    """Each knob's values, the rule's default first."""
    many = params.lanes >= 16 or params.arch == "aarch64"  # 32 vector registers
    return {
        "accumulators": (0, 8, 16, 4, 24) if many else (0, 8, 4, 6, 16),
        "max_vectors": (0, 2, 1, 4),
        "rows_outer": (False, True),
        "parallel_tasks": (0, 4 * params.cores),
        "lanes": (params.lanes, params.lanes // 2) if params.lanes >= 16 else (params.lanes,),
    }


KNOBS = ("accumulators", "max_vectors", "rows_outer", "parallel_tasks", "lanes")


def param_variants(
    params: CpuParams, knobs: tuple[str, ...] = KNOBS, limit: int | None = None
) -> list[CpuParams]:
    """Params differing from ``params`` (the rule's defaults) in one or more of ``knobs`` (the
    ones a rule reads: ``CpuRule.knobs``), in the module docstring's order; at most ``limit``."""
    values = knob_values(params)
    used = tuple(k for k in KNOBS if k in knobs and len(values[k]) > 1)
    out: list[CpuParams] = []
    for changed in range(1, len(used) + 1):
        for group in itertools.combinations(used, changed):
            for choice in itertools.product(*(values[k][1:] for k in group)):
                out.append(dataclasses.replace(params, **dict(zip(group, choice, strict=True))))
                if limit is not None and len(out) >= limit:
                    return out
    return out
