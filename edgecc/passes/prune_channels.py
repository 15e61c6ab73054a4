"""prune: structured output-channel pruning over coupled channel groups.

The dependency analysis (:mod:`edgecc.passes.channel_groups`) splits the graph's channels into
groups that must shrink together (residual Adds, Concats, depthwise convs, BatchNorms, Flatten
into a Gemm, ...) and, inside each group, into atoms: channel sets that go as one. This pass
ranks atoms, drops the least important ones and rewrites every tensor that the group touches.

Importance (Torch-Pruning's group importance). For every producer in the group (a
Conv/ConvTranspose/Gemm/MatMul whose output channels live there), the norm of each output
channel's weights, ``sum |w|`` (``criterion="l1"``) or ``sqrt(sum w^2)`` (``"l2"``), divided by
the producer's mean norm so producers of different scale weigh alike, times ``|gamma|`` of a
BatchNorm reading the producer's output directly (``use_bn``; after fold-bn gamma is already in
the weights). An atom's importance is the sum over its channels.

Selection. Each prunable group keeps ``n - floor(ratio * n)`` of its ``n`` atoms (``overrides``
gives a producer's group its own ratio; with several, the smallest applies), rounded up to a
multiple of ``round_to`` (counted in atoms: exact for groups without Concat), dropping the least
important. Atoms touching a node named in ``skip`` stay, and every tensor keeps at least one
channel. With ``only``, groups none of whose producers is named there stay whole.

Rewrite. Producer weights and biases lose output channels, consumers (Conv input channels,
Gemm/MatMul rows, whole ``prod(spatial)`` blocks after a Flatten) the matching inputs,
BatchNorm/elementwise constants follow, grouped convolutions lose whole groups (``group``
shrinks), flattening Reshapes get the target ``[N, -1]`` and Resize sizes the new count. Graph
inputs and outputs keep their shapes: groups touching them are declined (``info["declined"]``,
with the reason, e.g. a classifier's logits). Shapes are re-inferred and stale ``value_info``
dropped.

Cumulative (``cumulative=true``, used by gradual pruning, :mod:`edgecc.passes.gradual`): the
atom count of each group before the first prune is kept in the model metadata
(``edgecc.prune.original_atoms``, by tensor name); the group keeps ``n0 - floor(ratio * n0)`` of
its ``n0`` original atoms (never more than it has now).

Limits: lossy by design (fine-tune afterwards); the analysis's limits apply (Split/Slice/Gather
on channels, LayerNorm, attention reshapes leave their groups whole); ``round_to`` counts atoms,
so it is exact per tensor only in groups without Concat; a constant shared by several nodes is
sliced into one copy per node.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx

from edgecc.errors import UserInputError
from edgecc.passes.channel_groups import ChannelAnalysis, ChannelGroup, analyse
from edgecc.passes.graph import (
    GraphIndex,
    const_value,
    infer_types,
    refresh_shapes,
    remove_dead_nodes,
    remove_if_unused,
    set_const_input,
    why_unchanged,
)
from edgecc.passes.manager import PassContext, PassResult, register
from edgecc.report.metrics import graph_stats

logger = logging.getLogger(__name__)


@register("prune")
class PruneChannels:
    """Remove the least important output channels of every prunable channel group.

    Args:
        ratio: fraction of each group's channels to remove, in [0, 1).
        criterion: ``"l1"`` or ``"l2"`` weight norm.
        overrides: node name -> ratio for the group where that node's output channels live.
        round_to: keep a multiple of this many channels per group.
        skip: node names whose channels (inputs and outputs) stay whole.
        use_bn: scale importance by ``|gamma|`` of a BatchNorm right after the producer.
        only: node names: prune only the groups these nodes produce channels for (per-layer
            sensitivity); None prunes every group.
        steps: with a ``distill`` right after, reach ``ratio`` in this many prune/distill steps
            on a cubic schedule (expanded by the pass manager, see
            :mod:`edgecc.passes.gradual`); 1 is one shot.
        cumulative: count ``ratio`` against the channels before the first prune (recorded in
            the model metadata), not the current ones, so successive prunes reach the targets.
    """

    def __init__(
        self,
        ratio: float = 0.3,
        criterion: str = "l1",
        overrides: Mapping[str, float] | None = None,
        round_to: int = 1,
        skip: Iterable[str] = (),
        use_bn: bool = True,
        only: Iterable[str] | None = None,
        steps: int = 1,
        cumulative: bool = False,
    ):
        if steps != 1:
            raise UserInputError(
                f"prune: steps={steps} is expanded by the pass manager (needs distill after it)"
            )
        self.cumulative = cumulative
        self.overrides = dict(overrides or {})
        for name, value in [("ratio", ratio), *self.overrides.items()]:
            if not 0 <= float(value) < 1:
                raise UserInputError(f"prune: ratio for {name!r} must be in [0, 1), got {value}")
        if criterion not in ("l1", "l2"):
            raise UserInputError(f"prune: criterion must be 'l1' or 'l2', got {criterion!r}")
        if int(round_to) < 1:
            raise UserInputError(f"prune: round_to must be >= 1, got {round_to}")
        self.ratio, self.criterion, self.round_to = float(ratio), criterion, int(round_to)
        self.skip = [skip] if isinstance(skip, str) else list(skip)
        self.use_bn = use_bn
        self.only = None if only is None else ([only] if isinstance(only, str) else list(only))

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        analysis = analyse(model)
        named = set(self.skip) | set(self.overrides) | set(self.only or [])
        unknown = sorted(named - set(analysis.node_names))
        if unknown:
            raise UserInputError(f"prune: no node named {', '.join(map(repr, unknown))}")
        index = GraphIndex(model)
        types = infer_types(model)
        values = _Values(index, types, analysis)
        info: dict[str, Any] = {"groups": [], "declined": []}
        keep: dict[str, np.ndarray] = {}
        self._original = original_counts(model)
        for group in analysis.groups:
            if not group.sources:
                continue  # nothing produces these channels (e.g. the graph input's)
            if self.only is not None and not set(group.sources) & set(self.only):
                continue  # restricted to other layers' groups
            if not group.prunable:
                reason = "; ".join(group.reasons[:3])
                logger.info(
                    "prune: group %d (%s) left whole: %s",
                    group.id,
                    ", ".join(group.sources),
                    reason,
                )
                info["declined"].append(
                    {"group": group.id, "sources": group.sources, "reason": reason}
                )
                continue
            kept = self._select(group, analysis, values)
            info["groups"].append(
                {
                    "group": group.id,
                    "sources": group.sources,
                    "kept": int(kept.sum()),
                    "total": group.n_atoms,
                }
            )
            if not kept.all():
                for name, atoms in group.atoms.items():
                    mask = kept[atoms]
                    if not mask.all():
                        keep[name] = np.flatnonzero(mask)
        macs_before = graph_stats(model)["macs"]
        if keep:
            record_counts(model, analysis, self._original)
            self._rewrite(model, index, analysis, values, keep)
        macs_after = graph_stats(model)["macs"] if keep else macs_before
        info.update(
            macs_before=macs_before,
            macs_after=macs_after,
            mac_reduction=1 - macs_after / macs_before if macs_before else 0.0,
        )
        logger.info("prune: MACs %d -> %d", macs_before, macs_after)
        return PassResult(model, bool(keep), info, reason="" if keep else self._why(model, info))

    def _why(self, model: onnx.ModelProto, info: dict[str, Any]) -> str:
        """One line: why nothing was pruned."""
        if info["groups"]:
            largest = max(g["total"] for g in info["groups"])
            return (
                f"ratio {self.ratio:g} removes no channel from the {len(info['groups'])} "
                f"prunable groups (the largest has {largest}; skip and round_to keep channels)"
            )
        nothing = "no Conv/Gemm/MatMul with a constant weight whose output channels can be cut"
        return why_unchanged(model, "prune", info["declined"], nothing)

    def _ratio(self, group: ChannelGroup) -> float:
        ratios = [self.overrides[s] for s in group.sources if s in self.overrides]
        return float(min(ratios)) if ratios else self.ratio

    def _select(
        self, group: ChannelGroup, analysis: ChannelAnalysis, values: _Values
    ) -> np.ndarray:
        """Boolean mask over the group's atoms: which stay."""
        n = group.n_atoms
        base = n
        if self.cumulative:
            base = max([self._original.get(t, n) for t in group.atoms] or [n])
        score = np.zeros(n)
        candidate = np.zeros(n, bool)
        for s in analysis.slices:
            if s.role != "weight_out" or s.space not in group.atoms:
                continue
            weight = np.moveaxis(values.get(s.node, s.input).astype(np.float64), s.axis, 0)
            flat = weight.reshape(weight.shape[0], -1)
            norm = np.abs(flat).sum(1) if self.criterion == "l1" else np.sqrt((flat**2).sum(1))
            norm = norm / norm.mean() if norm.mean() > 0 else norm
            if self.use_bn:
                norm = norm * values.bn_gamma(s.space)
            labels = group.atoms[s.space]
            score += np.bincount(labels, norm, minlength=n)
            candidate[labels] = True
        for name in self.skip:
            for tensor in values.node_tensors(name):
                if tensor in group.atoms:
                    candidate[group.atoms[tensor]] = False
        n_keep = base - math.floor(self._ratio(group) * base + 1e-9)
        n_keep = min(n, math.ceil(n_keep / self.round_to) * self.round_to)
        removable = np.flatnonzero(candidate)
        order = removable[np.argsort(score[removable], kind="stable")]
        kept = np.ones(n, bool)
        kept[order[: max(0, n - n_keep)]] = False
        for atoms in group.atoms.values():  # no tensor may lose all its channels
            if not kept[atoms].any():
                kept[atoms[np.argmax(score[atoms])]] = True
        return kept

    @staticmethod
    def _rewrite(
        model: onnx.ModelProto,
        index: GraphIndex,
        analysis: ChannelAnalysis,
        values: _Values,
        keep: dict[str, np.ndarray],
    ) -> None:
        """Slice every constant, attribute and shape input indexed by a shrunk space."""
        nodes = list(model.graph.node)
        changed: dict[tuple[int, int], np.ndarray] = {}
        for s in analysis.slices:
            if s.space not in keep:
                continue
            idx = keep[s.space]
            if s.stop is not None:
                idx = idx[(idx >= s.start) & (idx < s.stop)] - s.start
            value = changed.get((s.node, s.input), values.get(s.node, s.input))
            changed[(s.node, s.input)] = np.take(value, idx, axis=s.axis)
        orphaned = set()
        for (n, k), value in changed.items():
            orphaned.add(nodes[n].input[k])
            set_const_input(index, nodes[n], k, value, f"{nodes[n].input[k]}_pruned")
        for up in analysis.group_updates:
            if up.space in keep:
                for a in nodes[up.node].attribute:
                    if a.name == "group":
                        a.i = len(keep[up.space]) // up.per_group
        for si in analysis.shape_inputs:
            if si.space in keep:
                value = list(si.value)
                if si.position is not None:
                    value[si.position] = len(keep[si.space])
                orphaned.add(nodes[si.node].input[si.input])
                set_const_input(
                    index,
                    nodes[si.node],
                    si.input,
                    np.array(value, np.int64),
                    f"{nodes[si.node].name or 'shape'}_target",
                )
        remove_if_unused(model, orphaned | remove_dead_nodes(model, orphaned))
        refresh_shapes(model)


ORIGINAL_KEY = "edgecc.prune.original_atoms"


def original_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> atom count of its channel group before the first prune (metadata)."""
    for p in model.metadata_props:
        if p.key == ORIGINAL_KEY:
            return {k: int(v) for k, v in json.loads(p.value).items()}
    return {}


def record_counts(
    model: onnx.ModelProto, analysis: ChannelAnalysis, known: Mapping[str, int]
) -> None:
    """Store every group's atom count before this prune where none is recorded yet."""
    counts = dict(known)
    for group in analysis.groups:
        base = max([known.get(t, 0) for t in group.atoms] or [0]) or group.n_atoms
        for t in group.atoms:
            counts.setdefault(t, base)
    for i in reversed(range(len(model.metadata_props))):
        if model.metadata_props[i].key == ORIGINAL_KEY:
            del model.metadata_props[i]
    entry = model.metadata_props.add()
    entry.key, entry.value = ORIGINAL_KEY, json.dumps(counts, sort_keys=True)


class _Values:
    """Constant inputs of the analysed nodes, read once."""

    def __init__(
        self, index: GraphIndex, types: dict[str, onnx.TypeProto], analysis: ChannelAnalysis
    ):
        self.index, self.types, self.analysis = index, types, analysis
        self.nodes = list(index.graph.node)
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def get(self, node: int, k: int) -> np.ndarray:
        if (node, k) not in self._cache:
            self._cache[(node, k)] = const_value(self.index, self.nodes[node].input[k], self.types)
        return self._cache[(node, k)]

    def bn_gamma(self, space: str) -> np.ndarray | float:
        """``|gamma|`` of a BatchNorm reading ``space`` directly, else 1."""
        for s in self.analysis.slices:
            node = self.nodes[s.node]
            if s.role == "gamma" and s.space == space and node.op_type == "BatchNormalization":
                return np.abs(self.get(s.node, s.input).astype(np.float64))
        return 1.0

    def node_tensors(self, name: str) -> list[str]:
        """Input and output tensor names of the node called ``name``."""
        node = self.nodes[self.analysis.node_names.index(name)]
        return [*node.input, *node.output]
