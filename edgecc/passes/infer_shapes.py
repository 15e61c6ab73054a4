"""``shape-inference``: annotate every intermediate tensor with its type and shape.

Runs ONNX shape inference with data propagation (so shapes computed by ``Shape -> Gather ->
Concat -> Reshape`` chains resolve to numbers). Existing ``value_info`` is kept as a hint first:
the exporter's entries come from torch's traced shapes and know dimensions ONNX inference alone
cannot derive. When inference contradicts an entry (an earlier pass changed shapes, e.g. pruned
channels, without refreshing them), all ``value_info`` is dropped and inference reruns from
scratch. The result is stored in ``graph.value_info``; declared graph output types are refined
where inference knows more.

``modified`` is True exactly when ``value_info`` or the graph output types differ from before
(compared as a set of entries; order is not significant).

Limits: a stale entry that inference cannot check (its own result there is unknown) is kept;
passes that change shapes should refresh them. Tensors inside subgraphs (If/Loop bodies) are
annotated only as far as ONNX inference goes; ops of custom domains get no shapes; models over
2 GB cannot be serialised for inference. With ``strict=True`` (the default) an inconsistent
graph raises, naming the node, instead of being silently left half-annotated.
"""

from __future__ import annotations

import logging

import onnx
from onnx import shape_inference

from edgecc.passes.manager import PassContext, PassResult, register

logger = logging.getLogger(__name__)


def _entries(values: list[onnx.ValueInfoProto]) -> set[bytes]:
    return {v.SerializeToString(deterministic=True) for v in values}


@register("shape-inference")
class InferShapes:
    """Re-infer all intermediate shapes (with data propagation) into ``value_info``.

    Args:
        strict: raise on inference errors (inconsistent graphs) instead of skipping the node.
    """

    def __init__(self, strict: bool = True):
        self.strict = strict

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        try:
            inferred = self._infer(model)
        except shape_inference.InferenceError as err:
            logger.info("shape inference contradicts existing value_info (%s); re-inferring", err)
            stripped = onnx.ModelProto()
            stripped.CopyFrom(model)
            del stripped.graph.value_info[:]
            inferred = self._infer(stripped)
        before_vi, after_vi = _entries(model.graph.value_info), _entries(inferred.graph.value_info)
        before_out, after_out = _entries(model.graph.output), _entries(inferred.graph.output)
        info = {
            "value_info": len(inferred.graph.value_info),
            "added": len(after_vi - before_vi),
            "removed": len(before_vi - after_vi),
        }
        if before_vi == after_vi and before_out == after_out:
            return PassResult(model, False, info, reason="every shape is already inferred")
        return PassResult(inferred, True, info)

    def _infer(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return shape_inference.infer_shapes(
            model, check_type=True, strict_mode=self.strict, data_prop=True
        )
