"""Batched runners the evaluator drives: ONNX graphs under ONNX Runtime, and compiled packages.

:class:`OnnxRunner` runs a graph with ONNX Runtime, graph optimisations off (the numerical
reference of :mod:`edgecc.report.compare`). A graph whose inputs fix the batch dimension (edgecc's
frontend fixes every dimension) is first given a symbolic batch dimension: the copy is used when
ONNX Runtime runs it on two samples and agrees with two single-sample runs (1e-5), else the graph
runs in batches of its fixed size, the tail padded with copies of the last sample and the padding
dropped.

:class:`PackageRunner` runs a package's library where it runs (natively, or aarch64 under qemu;
see :mod:`edgecc.runtime`) at the package's fixed input shapes: the samples are cut into input
sets of the package's batch (padding the tail as above) and up to ``chunk`` samples go to one
runner process as a stacked input (``run.py --stacked``), so process start (about 15 s under
emulation) is paid once per chunk, not per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from edgecc.errors import UserInputError
from edgecc.evaluation.data import InputInfo

logger = logging.getLogger(__name__)

DYNAMIC_BATCH = "edgecc_batch"
AGREE = 1e-5
PACKAGE_CHUNK = 1024  # samples per runner process


def _pad(feeds: Mapping[str, np.ndarray], step: int) -> tuple[dict[str, np.ndarray], int]:
    """``feeds`` padded along axis 0 to a multiple of ``step`` with copies of the last sample."""
    n = len(next(iter(feeds.values())))
    extra = -n % step
    if not extra:
        return dict(feeds), n
    return {k: np.concatenate([a, np.repeat(a[-1:], extra, 0)]) for k, a in feeds.items()}, n


def _dim0(vi: onnx.ValueInfoProto) -> int | None:
    dims = vi.type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


class OnnxRunner:
    """An ONNX graph under ONNX Runtime (optimisations off), any number of samples per call.

    Args:
        model: the graph (static or dynamic batch).
        threads: ONNX Runtime intra-op threads.
    """

    def __init__(self, model: onnx.ModelProto, threads: int = 2):
        from edgecc.evaluation.ort import session

        inits = {t.name for t in model.graph.initializer}
        graph_inputs = [i for i in model.graph.input if i.name not in inits]
        self.inputs = [_info(vi) for vi in graph_inputs]
        self.output_names = [o.name for o in model.graph.output]
        self.fixed = self._fixed_batch(graph_inputs)
        self._sess = session(model, threads=threads)
        if self.fixed:
            relaxed = _relax_batch(model)
            if relaxed is not None and self._agrees(relaxed, threads):
                self.fixed = None
        self.description = "ONNX Runtime (CPU, graph optimisations off)"

    @staticmethod
    def _fixed_batch(graph_inputs: list[onnx.ValueInfoProto]) -> int | None:
        dims = {_dim0(vi) for vi in graph_inputs}
        return dims.pop() if len(dims) == 1 and None not in dims else None

    def _agrees(self, relaxed: onnx.ModelProto, threads: int) -> bool:
        """Use ``relaxed`` when it runs two samples as the fixed graph runs each one."""
        from edgecc.evaluation.ort import session

        rng = np.random.default_rng(0)
        one = [
            {i.name: _sample(i, rng, self.fixed or 1) for i in self.inputs},
            {i.name: _sample(i, rng, self.fixed or 1) for i in self.inputs},
        ]
        try:
            sess = session(relaxed, threads=threads)
            both = sess.run(None, {k: np.concatenate([o[k] for o in one]) for k in one[0]})
            apart = [self._sess.run(None, o) for o in one]
        except Exception as err:  # noqa: BLE001  (any failure: keep the fixed batch)
            logger.debug("symbolic batch not usable: %s", err)
            return False
        for k, joint in enumerate(both):
            want = np.concatenate([a[k] for a in apart])
            if joint.shape != want.shape or not np.allclose(joint, want, atol=AGREE, rtol=AGREE):
                return False
        self._sess = sess
        return True

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for the samples in ``feeds`` (samples on axis 0)."""
        if not self.fixed:
            return dict(zip(self.output_names, self._sess.run(None, dict(feeds)), strict=True))
        padded, n = _pad(feeds, self.fixed)
        parts = [
            self._sess.run(None, {k: a[s : s + self.fixed] for k, a in padded.items()})
            for s in range(0, len(next(iter(padded.values()))), self.fixed)
        ]
        return {
            name: np.concatenate([p[k] for p in parts])[:n]
            for k, name in enumerate(self.output_names)
        }


class PackageRunner:
    """A compiled package, run natively or under emulation, at its fixed input shapes.

    Args:
        package: the :class:`edgecc.package.Package`.
        target: the target record to run it as (default: the manifest's).
        chunk: samples per runner process.
    """

    def __init__(self, package: Any, target: Any = None, chunk: int = PACKAGE_CHUNK):
        self.package = package
        self.target = target or package.target()
        spec = package.manifest["inputs"]
        self.inputs = [InputInfo(i["name"], tuple(i["shape"][1:]), i["dtype"]) for i in spec]
        batches = {int(i["shape"][0]) for i in spec if i["shape"]}
        if len(batches) != 1 or any(not i["shape"] for i in spec):
            raise UserInputError(
                f"package {package.path}: inputs {[i['name'] for i in spec]} do not share a "
                "batch axis; evaluation needs one"
            )
        self.batch = batches.pop()
        self.output_names = package.output_names
        self.chunk = max(self.batch, chunk - chunk % self.batch)
        self.description = f"package {package.path} ({self.target.name})"
        package.verify_library()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for the samples in ``feeds``: one runner process per chunk."""
        from edgecc.runtime import run_library

        padded, n = _pad(feeds, self.batch)
        total = len(next(iter(padded.values())))
        parts = []
        for start in range(0, total, self.chunk):
            stacked = {
                k: a[start : start + self.chunk].reshape(-1, self.batch, *a.shape[1:])
                for k, a in padded.items()
            }
            out = run_library(
                self.package.library, self.target, stacked, self.output_names, stacked=True
            )
            parts.append({k: v.reshape(-1, *v.shape[2:]) for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in parts])[:n] for k in self.output_names}


def _info(vi: onnx.ValueInfoProto) -> InputInfo:
    t = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    return InputInfo(
        vi.name, tuple(dims[1:]), onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
    )


def _sample(info: InputInfo, rng: np.random.Generator, batch: int) -> np.ndarray:
    shape = (batch, *info.sample_shape)
    if np.dtype(info.dtype).kind == "f":
        return rng.standard_normal(shape).astype(info.dtype)
    if np.dtype(info.dtype).kind == "b":
        return np.ones(shape, info.dtype)
    return np.ones(shape, info.dtype)  # ids and masks: 1 is valid for any vocabulary


def _relax_batch(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy whose inputs and outputs have a symbolic batch dim (None if outputs have none)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = copy.graph
    inits = {t.name for t in g.initializer}
    for vi in [*[i for i in g.input if i.name not in inits], *g.output]:
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            return None
        dims[0].Clear()
        dims[0].dim_param = DYNAMIC_BATCH
    del g.value_info[:]
    return copy
