"""The package: a folder holding the compiled library and what is needed to trust and run it.

Layout::

    model.so        the shared library (x86-64 or aarch64 ELF; CUDA device code inside for GPUs)
    model.onnx      the graph after edgecc's passes, i.e. what was lowered (for inspection)
    reference.npz   probe inputs (``input:<name>``), the float reference of the source model
                    (``reference:<name>``) and ONNX Runtime's output of model.onnx
                    (``expected:<name>``) on those inputs
    manifest.json   versions, target, inputs/outputs, passes, hashes (deterministic)
    report.json     per-pass table, sizes, compile time (varies run to run)

Packages are written atomically: everything goes to a hidden staging folder beside the output,
which is renamed into place only when complete; on failure or Ctrl-C the staging folder is
removed, and an earlier package at the output path is left untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgecc.errors import UserInputError

LIBRARY = "model.so"
ONNX_MODEL = "model.onnx"
REFERENCE = "reference.npz"
MANIFEST = "manifest.json"
REPORT = "report.json"

# run --check: the compiled library against ONNX Runtime on the same (transformed) graph.
CHECK_MAX_REL_DIFF = 1e-3
CHECK_MIN_COSINE = 0.9999


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON (stable bytes for the same data)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (Path, set, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _check_output_path(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (out / MANIFEST).is_file()):
        raise UserInputError(
            f"output path {out} exists and is not an edgecc package; remove it or choose another"
        )


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``out``, on any failure it disappears.

    Parent folders created for the output are removed again if the build fails.
    """
    out = Path(out).absolute()
    _check_output_path(out)
    created: list[Path] = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    except OSError as err:
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise UserInputError(f"cannot write to {out}: {err.strerror or err}") from err
    try:
        yield staging
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "pkg")
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for p in created:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def save_reference(
    path: Path,
    probe: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
) -> None:
    """Store probe inputs, the source model's reference and the graph's expected outputs."""
    arrays = {f"input:{k}": v for k, v in probe.items()}
    arrays |= {f"reference:{k}": v for k, v in reference.items()}
    arrays |= {f"expected:{k}": v for k, v in expected.items()}
    np.savez(path, **arrays)


class Package:
    """A compiled package on disk (see the module docstring for its files)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise UserInputError(f"{self.path} is not an edgecc package (no {MANIFEST})")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest.read_text())
            report = self.path / REPORT
            self.report: dict[str, Any] = json.loads(report.read_text()) if report.is_file() else {}
        except json.JSONDecodeError as err:
            raise UserInputError(f"{manifest}: corrupt manifest ({err})") from err

    @property
    def library(self) -> Path:
        return self.path / self.manifest["library"]["file"]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.manifest["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    def target(self) -> Any:
        """The target record the package was compiled for."""
        from edgecc.targets import target_from_dict

        return target_from_dict(self.manifest["target"])

    def _reference(self, kind: str) -> dict[str, np.ndarray]:
        with np.load(self.path / REFERENCE) as data:
            prefix = f"{kind}:"
            return {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}

    def probe_inputs(self) -> dict[str, np.ndarray]:
        """The seeded inputs the reference was recorded on."""
        return self._reference("input")

    def reference_outputs(self) -> dict[str, np.ndarray]:
        """The source model's float outputs on the probe inputs."""
        return self._reference("reference")

    def expected_outputs(
        self, inputs: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """ONNX Runtime's outputs of the package's graph: recorded for the probe, else computed."""
        if inputs is None or _same_inputs(inputs, self.probe_inputs()):
            return self._reference("expected")
        import onnx

        from edgecc.report.compare import run_onnx

        return run_onnx(onnx.load(str(self.path / ONNX_MODEL)), inputs)

    def prepare_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names, shapes and dtypes of ``inputs`` against the manifest; order them."""
        inputs = name_single(inputs, self.input_names)
        out = {}
        for spec in self.manifest["inputs"]:
            name = spec["name"]
            if name not in inputs:
                raise UserInputError(
                    f"missing input {name!r}; the package takes {self.input_names}"
                )
            arr = np.asarray(inputs[name])
            if list(arr.shape) != list(spec["shape"]):
                raise UserInputError(
                    f"input {name!r} has shape {list(arr.shape)}, the package takes {spec['shape']}"
                )
            if arr.dtype != np.dtype(spec["dtype"]):
                if arr.dtype.kind != np.dtype(spec["dtype"]).kind:
                    raise UserInputError(
                        f"input {name!r} has dtype {arr.dtype}, the package takes {spec['dtype']}"
                    )
                arr = arr.astype(spec["dtype"])
            out[name] = arr
        extra = set(inputs) - set(out)
        if extra:
            raise UserInputError(
                f"unknown inputs {sorted(extra)}; the package takes {self.input_names}"
            )
        return out

    def run(
        self,
        inputs: Mapping[str, np.ndarray] | None = None,
        progress: Any = None,
        threads: int | None = None,
        facts: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the library on ``inputs`` (default: the probe inputs); returns outputs by name.

        x86 packages run natively; aarch64 CPU packages run under qemu-user emulation.
        ``threads``: TVM runtime threads (default: the target's ``cores``); ``facts``, when
        given, receives what the runner used (``threads``).
        """
        from edgecc.runtime import run_library

        feeds = self.prepare_inputs(self.probe_inputs() if inputs is None else inputs)
        target = self.target()
        return run_library(
            self.library,
            target,
            feeds,
            self.output_names,
            progress=progress,
            threads=threads or target.cores,
            facts=facts,
        )

    def benchmark(
        self, repeat: int = 50, warmup: int = 5, threads: int | None = None
    ) -> dict[str, Any]:
        """Time the library and ONNX Runtime (default optimisations) on ``model.onnx`` in the
        same run, on the probe input; the result's ``ratio`` is edgecc's median over ORT's.

        ``threads`` (both engines) defaults to the target's ``cores``. Emulated packages
        (aarch64 on this x86 host) are not timed: the result holds the executed instructions
        per inference instead (:func:`edgecc.runtime.instructions.count_instructions`: the mean
        of 10 inferences after a first, counted as two windows of 5 whose spread shows the
        count's stability; 1 thread unless ``threads`` is given), ``emulated: true`` and no
        ratio.
        """
        import onnx

        from edgecc.report.compare import time_onnx
        from edgecc.runtime import is_emulated
        from edgecc.runtime.bench import benchmark_library

        feeds = self.probe_inputs()
        if is_emulated(self.target()):
            from edgecc.runtime.instructions import count_instructions

            counts = count_instructions(
                self.library, self.target(), feeds, runs=5, windows=2, threads=threads or 1
            )
            return {
                "edgecc": counts,
                "emulated": True,
                "threads": counts["threads"],
                "instructions_per_inference": counts["instructions_per_inference"],
                "note": counts["note"],
            }
        threads = threads or self.target().cores
        tvm = benchmark_library(self.library, self.target(), feeds, repeat, warmup, threads)
        ort = time_onnx(onnx.load(str(self.path / ONNX_MODEL)), feeds, repeat, warmup, threads)
        return {
            "edgecc": tvm,
            "onnxruntime": ort,
            "threads": threads,
            "ratio": tvm["median_ms"] / ort["median_ms"],
        }

    def check(
        self, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, Any]:
        """Compare ``outputs`` with ONNX Runtime on the package graph (and the float reference).

        ``passed`` is true when within ``CHECK_MAX_REL_DIFF`` and ``CHECK_MIN_COSINE`` of ONNX
        Runtime running ``model.onnx`` on the same inputs. On the probe inputs the figures against
        the source model's float reference are added (lossy passes make those differ by design).
        """
        from edgecc.report.compare import compare_outputs

        result: dict[str, Any] = {
            "vs_expected": compare_outputs(outputs, self.expected_outputs(inputs))
        }
        if inputs is None or _same_inputs(inputs, self.probe_inputs()):
            result["vs_reference"] = compare_outputs(outputs, self.reference_outputs())
        exp = result["vs_expected"]
        result["tolerance"] = {"max_rel_diff": CHECK_MAX_REL_DIFF, "cosine": CHECK_MIN_COSINE}
        result["passed"] = (
            exp["max_rel_diff"] <= CHECK_MAX_REL_DIFF and exp["cosine"] >= CHECK_MIN_COSINE
        )
        return result


SINGLE = ""  # the key of an unnamed array (a .npy file): it feeds a model's only input


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Arrays from ``x.npy`` (keyed :data:`SINGLE`) or ``inputs.npz`` (keyed by name)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"input file {path} does not exist")
    try:
        if path.suffix == ".npy":
            return {SINGLE: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as err:
        raise UserInputError(f"cannot read {path}: {err}") from err


def name_single(arrays: Mapping[str, np.ndarray], names: list[str]) -> Mapping[str, np.ndarray]:
    """Give an unnamed array (from a .npy file) the name of the model's only input."""
    if SINGLE not in arrays:
        return arrays
    if len(names) != 1 or len(arrays) != 1:
        raise UserInputError(
            f"the model takes {len(names)} inputs {names}: pass a .npz with those names"
        )
    return {names[0]: arrays[SINGLE]}


def _same_inputs(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), b[k]) for k in a)


def load(path: str | Path) -> Package:
    """Open a compiled package folder."""
    return Package(path)
