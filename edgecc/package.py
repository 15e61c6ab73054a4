"""The package: a folder holding the compiled library and what is needed to trust and run it.

Layout::

    model.so        the shared library (x86-64 or aarch64 ELF; CUDA device code inside for GPUs)
    model.onnx      the graph after edgecc's passes, i.e. what was lowered (for inspection)
    reference.npz   probe inputs (``input:<name>``), the float reference of the source model
                    (``reference:<name>``) and ONNX Runtime's output of model.onnx
                    (``expected:<name>``) on those inputs
    manifest.json   versions, target, inputs/outputs, passes, hashes (deterministic)
    report.json     per-pass table, sizes, compile time (varies run to run)
    run.py          the standalone runner (numpy + TVM runtime only) to run and check it on a board

A package is validated when opened (:class:`Package`): a manifest that is not a JSON object or
lacks its entries, or a missing library, ``model.onnx`` or ``reference.npz``, is one user error
line (exit 2); before running, the library's sha256 must match the manifest's (exit 2 too).

Packages are written atomically: everything goes to a hidden staging folder beside the output,
which is renamed into place only when complete; on failure or Ctrl-C the staging folder is
removed, and an earlier package at the output path is left untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgecc import interrupt
from edgecc.errors import UserInputError

LIBRARY = "model.so"
ONNX_MODEL = "model.onnx"
REFERENCE = "reference.npz"
MANIFEST = "manifest.json"
REPORT = "report.json"

RUNNER_SCRIPT = "run.py"  # the standalone runner (edgecc/runtime/_runner.py), for the board

# What a manifest must hold to be run or inspected (key -> JSON type).
REQUIRED_MANIFEST = {"library": dict, "inputs": list, "outputs": list, "target": dict}
IO_KEYS = {"name", "shape", "dtype"}
# Below this cosine against the source model's float reference, compile and run --check warn.
WARN_COSINE = 0.99


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


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A package's JSON file as a dict; one clear user error when missing or damaged."""
    if not path.is_file():
        raise UserInputError(f"{path.parent} is not an edgecc package (no {path.name})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserInputError(f"{path}: corrupt {what} ({err})") from err
    if not isinstance(data, dict):
        raise UserInputError(
            f"{path}: damaged {what}: a JSON {type(data).__name__}, not an object; rebuild it"
        )
    return data


def write_runner(folder: Path) -> Path:
    """Copy the standalone runner into a package folder as ``run.py``."""
    from edgecc.runtime import RUNNER

    dest = folder / RUNNER_SCRIPT
    shutil.copyfile(RUNNER, dest)
    return dest


def _check_output_path(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (out / MANIFEST).is_file()):
        raise UserInputError(
            f"output path {out} exists and is not an edgecc package; remove it or choose another"
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stale_pattern(name: str) -> str:
    return rf"\.{re.escape(name)}\.(staging|old)-(?P<pid>\d+)-.+"


def _remove_stale(out: Path) -> None:
    """Remove the staging folders of killed compiles to ``out``; a package a kill left in an
    ``.old-`` folder (killed between the two renames) goes back to ``out`` if that is empty."""
    pattern = re.compile(_stale_pattern(out.name))
    for old in out.parent.glob(f".{out.name}.old-*"):
        m = pattern.fullmatch(old.name)
        if m and not interrupt.alive(int(m.group("pid"))) and not out.exists():
            with contextlib.suppress(OSError):
                os.replace(old / "pkg", out)
    interrupt.remove_stale(out.parent, _stale_pattern(out.name))


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``out``, on any failure it disappears.

    Parent folders created for the output are removed again if the build fails. The staging
    folder is named ``.OUT.staging-PID-*``: those of dead processes (killed compiles) are
    removed first. The package folder gets the mode the umask gives a new folder. A signal
    recorded by :mod:`edgecc.interrupt` aborts before the rename, never after it.
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
        _remove_stale(out)
        staging = Path(
            tempfile.mkdtemp(prefix=interrupt.pid_prefix(f".{out.name}.staging-"), dir=out.parent)
        )
        staging.chmod(0o777 & ~_umask())
    except OSError as err:
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise UserInputError(f"cannot write to {out}: {err.strerror or err}") from err
    try:
        with interrupt.cleanup_on_abort(staging):
            yield staging
            with interrupt.commit():
                _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for p in created:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _publish(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``, replacing an earlier package (restored if that fails)."""
    try:
        if not out.exists():
            os.replace(staging, out)
            return
        old = Path(
            tempfile.mkdtemp(prefix=interrupt.pid_prefix(f".{out.name}.old-"), dir=out.parent)
        )
        try:
            os.replace(out, old / "pkg")
            try:
                os.replace(staging, out)
            except OSError:
                os.replace(old / "pkg", out)
                raise
        finally:
            if out.exists():  # the new package, or the old one restored
                shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise UserInputError(f"cannot write to {out}: {err.strerror or err}") from err


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
        self.manifest: dict[str, Any] = _read_json(self.path / MANIFEST, "manifest")
        report = self.path / REPORT
        self.report: dict[str, Any] = _read_json(report, "report") if report.is_file() else {}
        self._validate()

    def _validate(self) -> None:
        """One clear line (exit 2) for every kind of damage a package can have on disk."""
        m, where = self.manifest, self.path / MANIFEST
        for key, kind in REQUIRED_MANIFEST.items():
            if not isinstance(m.get(key), kind):
                raise UserInputError(
                    f"{where}: damaged manifest: {key!r} is missing or not a JSON "
                    f"{'object' if kind is dict else 'list'}; rebuild the package"
                )
        for key, items in (("inputs", m["inputs"]), ("outputs", m["outputs"])):
            if not items or not all(isinstance(i, dict) and i.keys() >= IO_KEYS for i in items):
                raise UserInputError(
                    f"{where}: damaged manifest: {key!r} must list name, shape and dtype"
                )
        if not isinstance(m["library"].get("file"), str) or "sha256" not in m["library"]:
            raise UserInputError(f"{where}: damaged manifest: 'library' lacks 'file' or 'sha256'")
        for name in (m["library"]["file"], ONNX_MODEL, REFERENCE):
            if not (self.path / name).is_file():
                raise UserInputError(
                    f"package {self.path} is damaged: {name} is missing; rebuild or recopy it"
                )

    def uses_int8(self) -> bool:
        """True when ``model.onnx`` holds QuantizeLinear/DequantizeLinear nodes (int8 applies)."""
        import onnx

        from edgecc.report.compare import uses_int8

        try:
            model = onnx.load(str(self.path / ONNX_MODEL), load_external_data=False)
        except Exception as err:  # onnx raises DecodeError and others for a damaged file
            raise UserInputError(
                f"package {self.path} is damaged: cannot read {ONNX_MODEL}"
            ) from err
        return uses_int8(model)

    def verify_library(self) -> None:
        """Raise a user error (exit 2) unless the library's sha256 is the manifest's."""
        want, got = self.manifest["library"]["sha256"], sha256_file(self.library)
        if want != got:
            raise UserInputError(
                f"{self.library}: sha256 {got[:12]}... does not match the manifest's "
                f"{str(want)[:12]}...: the library was modified or replaced; rebuild or recopy "
                "the package"
            )

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

        try:
            return target_from_dict(self.manifest["target"])
        except (KeyError, TypeError, ValueError) as err:
            raise UserInputError(
                f"{self.path / MANIFEST}: damaged manifest: bad target entry ({err})"
            ) from err

    def _reference(self, kind: str) -> dict[str, np.ndarray]:
        path = self.path / REFERENCE
        try:
            with np.load(path, allow_pickle=False) as data:
                prefix = f"{kind}:"
                found = {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise UserInputError(
                f"package {self.path} is damaged: cannot read {path}: {err}"
            ) from err
        if not found:
            raise UserInputError(f"package {self.path} is damaged: {path} holds no {kind} arrays")
        return found

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

        self.verify_library()
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

        self.verify_library()
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
            "ratio": None if tvm.get("emulated") else tvm["median_ms"] / ort["median_ms"],
        }

    def check(
        self,
        outputs: Mapping[str, np.ndarray],
        inputs: Mapping[str, np.ndarray] | None = None,
        min_cosine: float | None = None,
    ) -> dict[str, Any]:
        """Compare ``outputs`` with ONNX Runtime on the package graph and the float reference.

        ``passed`` is true when every output is within the manifest's check rule (fp32: max
        rel diff 1e-3 and cosine 0.9999; quantized: a few quantization steps and cosine 0.999;
        see :func:`edgecc.report.compare.check_rule`) of ONNX Runtime running ``model.onnx`` on
        the same inputs, no output is NaN/Inf where that one is not, and (with ``min_cosine``)
        the cosine against the source model's float reference is at least ``min_cosine``.
        That agreement (``vs_reference``) is measured on these outputs when ``inputs`` are the
        probe inputs, else it is the one recorded at compile time on the probe
        (``reference_source`` says which).
        """
        from edgecc.runtime._runner import check

        probe = inputs is None or _same_inputs(inputs, self.probe_inputs())
        rule = self.manifest.get("check")
        result = check(
            outputs,
            self.expected_outputs(inputs),
            rule if isinstance(rule, dict) else None,
            self.reference_outputs() if probe else None,
        )
        if probe:
            result["reference_source"] = "these outputs on the probe input"
        elif isinstance(self.report.get("graph_vs_reference"), dict):
            result["vs_reference"] = self.report["graph_vs_reference"]
            result["reference_source"] = "recorded at compile time (package graph, probe input)"
        result["min_cosine"] = min_cosine
        if min_cosine is not None:
            cos = result.get("vs_reference", {}).get("cosine")
            if cos is None:
                raise UserInputError(
                    "min_cosine needs the source model's reference: check on the probe input"
                )
            if not cos >= min_cosine:
                result["failures"].append(
                    f"cosine {cos:.6f} against the source model's float reference < {min_cosine}"
                )
        result["passed"] = not result["failures"]
        result["tolerance"] = result["rule"]
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
