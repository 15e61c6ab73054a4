"""Gather what the HTML report compares: one record per package (a variant of a model).

Sources, per package folder:

* ``manifest.json``: target, pipeline, source sha256, and the optional compression facts
  ``accuracy`` (``{"metric", "float", "final", "drop", "max_drop", "samples", "data"}``, written
  by ``compile --max-drop --data``), ``kept_float`` (node names), ``spared``
  (``[{"layer", "ratio"}]``) and ``sensitivity`` (the ``edgecc sensitivity`` JSON);
* ``report.json``: the per-pass table (nodes, params, MACs, bytes, cosine vs the float
  reference after each pass), sizes and the final graph's agreement with the source model;
* ``bench.json``: the last ``edgecc bench`` of the package (:func:`save_bench`), used only
  while the library's sha256 is the one it measured.

Accuracy given on the command line (``--eval PKG=FILE.json``, the output of
``edgecc eval --json``: ``top1``, ``top5``, ``samples``) wins over the manifest's. Every entry
other packages' commands write is optional and treated as untrusted data: a missing or
malformed entry becomes "not measured" with a note, never a crash; the page escapes all text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgecc.errors import UserInputError
from edgecc.passes.dump import SUMMARY_COLUMNS

logger = logging.getLogger(__name__)

BENCH_FILE = "bench.json"
# Columns of the per-pass table the page shows (report.json rows hold more).
PASS_COLUMNS = tuple(c for c in SUMMARY_COLUMNS if c != "seconds")


def save_bench(package: Any, result: Mapping[str, Any]) -> Path | None:
    """Write ``result`` (:meth:`Package.benchmark`) to ``PKG/bench.json``, atomically.

    The manifest and the library are left alone (the library's sha256 is checked before every
    run); the file records the library's sha256 so that a stale measurement is ignored. A
    folder that cannot be written (read-only copy of a package) logs a warning and returns None.
    """
    data = {"library_sha256": package.manifest["library"]["sha256"], **dict(result)}
    dest = Path(package.path) / BENCH_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{BENCH_FILE}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, dest)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            logger.warning("could not save %s: %s", dest, err.strerror or err)
            return None
        raise
    return dest


def load_bench(package: Any, notes: list[str]) -> dict[str, Any] | None:
    """The package's ``bench.json`` when present, readable and of this library; else None."""
    path = Path(package.path) / BENCH_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        notes.append(f"{path}: unreadable ({err}); latency not used")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path}: not a JSON object; latency not used")
        return None
    if data.get("library_sha256") != package.manifest["library"]["sha256"]:
        notes.append(f"{path}: measured another build of model.so; rerun edgecc bench")
        return None
    return data


def _number(value: Any) -> float | None:
    """A finite float from JSON, else None (bool, text, NaN and missing are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def latency(bench: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The latency facts the page shows, from a :meth:`Package.benchmark` result.

    ``{"kind": "ratio", "ratio", "edgecc_ms", "onnxruntime_ms", "threads"}`` for packages timed
    natively; ``{"kind": "instructions", "instructions_per_inference", "threads"}`` for emulated
    ones (their times say nothing about the board); None when there is neither.
    """
    if not bench:
        return None
    if bench.get("emulated"):
        count = _number(bench.get("instructions_per_inference"))
        if count is None:
            return None
        return {
            "kind": "instructions",
            "instructions_per_inference": count,
            "threads": _int(bench.get("threads")),
        }
    ratio = _number(bench.get("ratio"))
    if ratio is None:
        return None
    edgecc, ort = bench.get("edgecc"), bench.get("onnxruntime")
    return {
        "kind": "ratio",
        "ratio": ratio,
        "edgecc_ms": _number(edgecc.get("median_ms")) if isinstance(edgecc, dict) else None,
        "onnxruntime_ms": _number(ort.get("median_ms")) if isinstance(ort, dict) else None,
        "threads": _int(bench.get("threads")),
    }


def accuracy_from_manifest(entry: Any) -> dict[str, Any] | None:
    """The manifest's ``accuracy`` entry, normalised; None when absent or without ``final``."""
    if not isinstance(entry, dict) or _number(entry.get("final")) is None:
        return None
    out: dict[str, Any] = {
        "metric": _text(entry.get("metric")) or "accuracy",
        "final": _number(entry.get("final")),
        "float": _number(entry.get("float")),
        "drop": _number(entry.get("drop")),
        "max_drop": _number(entry.get("max_drop")),
        "samples": _int(entry.get("samples")),
        "data": _text(entry.get("data")),
    }
    if out["drop"] is None and out["float"] is not None:
        out["drop"] = out["float"] - out["final"]
    return out


def accuracy_from_eval(data: Any, where: str) -> dict[str, Any]:
    """Accuracy from ``edgecc eval --json`` output (``top1``, optional ``top5``, ``samples``).

    Without labels, eval reports agreement with the float model: ``cosine`` (or
    ``agreement``) is taken then.

    Raises:
        UserInputError: ``data`` holds none of these metrics.
    """
    if not isinstance(data, dict):
        raise UserInputError(f"{where}: not a JSON object of edgecc eval --json")
    for metric in ("top1", "cosine", "agreement"):
        value = _number(data.get(metric))
        if value is not None:
            return {
                "metric": metric,
                "final": value,
                "float": None,
                "drop": None,
                "max_drop": None,
                "samples": _int(data.get("samples")),
                "data": _text(data.get("data")),
                "top5": _number(data.get("top5")),
            }
    raise UserInputError(f"{where}: no top1, cosine or agreement number (edgecc eval --json)")


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file given on the command line; one user error line when missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise UserInputError(f"{what} {path} does not exist") from err
    except (OSError, ValueError) as err:
        raise UserInputError(f"{what} {path}: cannot read JSON ({err})") from err


def sensitivity(data: Any, where: str) -> dict[str, Any]:
    """Validate and normalise an ``edgecc sensitivity`` JSON (layers sorted by drop, largest
    first).

    Raises:
        UserInputError: not an object with a ``layers`` list of ``{"layer", "drop"}``.
    """
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not all(
        isinstance(x, dict) and "layer" in x and _number(x.get("drop")) is not None for x in layers
    ):
        raise UserInputError(
            f"{where}: not a sensitivity result (needs 'layers': [{{'layer', 'drop'}}...])"
        )
    rows = [
        {
            "layer": str(x["layer"]),
            "op": _text(x.get("op")),
            "metric": _number(x.get("metric")),
            "drop": _number(x["drop"]),
            "params": _int(x.get("params")),
        }
        for x in layers
    ]
    rows.sort(key=lambda r: -r["drop"])
    return {
        "model": _text(data.get("model")),
        "pass": _text(data.get("pass")),
        "metric": _text(data.get("metric")),
        "baseline": _number(data.get("baseline")),
        "layers": rows,
        "source": where,
    }


def _kept_float(manifest: Mapping[str, Any]) -> tuple[list[str] | None, list[dict[str, Any]]]:
    kept = manifest.get("kept_float")
    kept_list = [str(n) for n in kept] if isinstance(kept, list) else None
    spared = manifest.get("spared")
    spared_list = [
        {"layer": str(s.get("layer")), "ratio": _number(s.get("ratio"))}
        for s in (spared if isinstance(spared, list) else [])
        if isinstance(s, dict)
    ]
    return kept_list, spared_list


def _passes(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = report.get("passes")
    if not isinstance(rows, list):
        return []
    return [{c: r.get(c) for c in PASS_COLUMNS} for r in rows if isinstance(r, dict)]


def _sizes(package: Any) -> dict[str, Any]:
    rep = package.report
    sizes = rep.get("sizes") if isinstance(rep.get("sizes"), dict) else {}
    stats = rep.get("stats") if isinstance(rep.get("stats"), dict) else {}
    final = stats.get("final") if isinstance(stats.get("final"), dict) else {}
    source = stats.get("input") if isinstance(stats.get("input"), dict) else {}
    return {
        "library_bytes": package.library.stat().st_size,  # the file as it is now
        "onnx_bytes": (package.path / "model.onnx").stat().st_size,
        "source_onnx_bytes": _int(sizes.get("source_onnx_bytes")),
        "params": _int(final.get("params")),
        "source_params": _int(source.get("params")),
        "macs": _int(final.get("macs")),
        "source_macs": _int(source.get("macs")),
    }


def variant(
    package: Any,
    accuracy: dict[str, Any] | None,
    accuracy_source: str | None,
    bench: Mapping[str, Any] | None,
    notes: list[str],
) -> dict[str, Any]:
    """One package's record for the page (see the module docstring for the sources)."""
    m, rep = package.manifest, package.report
    name = package.path.name
    if accuracy is None:
        accuracy = accuracy_from_manifest(m.get("accuracy"))
        accuracy_source = "manifest" if accuracy else None
        if m.get("accuracy") is not None and accuracy is None:
            notes.append(f"{name}: the manifest's accuracy entry has no final number; ignored")
    sens = None
    if m.get("sensitivity") is not None:
        try:
            sens = sensitivity(m["sensitivity"], f"{name} manifest")
        except UserInputError as err:
            notes.append(str(err) + "; ignored")
    kept, spared = _kept_float(m)
    agreement = rep.get("graph_vs_reference")
    source = m.get("source") if isinstance(m.get("source"), dict) else {}
    return {
        "name": name,
        "path": str(package.path),
        "target": _text(m["target"].get("name")) or "?",
        "pipeline": _text(m.get("pipeline")) or "",
        "source_sha256": _text(source.get("sha256")),
        "sizes": _sizes(package),
        "cosine": _number(agreement.get("cosine")) if isinstance(agreement, dict) else None,
        "accuracy": accuracy,
        "accuracy_source": accuracy_source,
        "latency": latency(bench),
        "passes": _passes(rep),
        "kept_float": kept,
        "spared": spared,
        "sensitivity": sens,
    }


def _eval_map(
    packages: Sequence[Path], evals: Mapping[str, str | Path] | Sequence[str] | None
) -> dict[int, Path]:
    """``PKG=FILE`` texts (or a mapping) -> package index -> eval JSON path.

    ``PKG`` is a package path as given or its folder name; a bare ``FILE`` is allowed with a
    single package.
    """
    if not evals:
        return {}
    if isinstance(evals, Mapping):
        items = [(str(k), Path(v)) for k, v in evals.items()]
    else:
        items = []
        for text in evals:
            key, sep, file = str(text).rpartition("=")
            if not sep:
                if len(packages) != 1:
                    raise UserInputError(
                        f"--eval {text}: with several packages write PKG=FILE.json"
                    )
                key, file = str(packages[0]), text
            items.append((key, Path(file)))
    out: dict[int, Path] = {}
    for key, file in items:
        found = [
            i
            for i, p in enumerate(packages)
            if key in (str(p), p.name) or Path(key).absolute() == p.absolute()
        ]
        if len(found) != 1:
            raise UserInputError(
                f"--eval {key}={file}: {key!r} names "
                + ("none" if not found else "several")
                + f" of the packages {[p.name for p in packages]}"
            )
        out[found[0]] = file
    return out


Evaluate = Callable[..., Mapping[str, Any]]


def _evaluator() -> Evaluate:
    """:func:`edgecc.evaluation.core.evaluate` (what ``edgecc eval`` runs)."""
    from edgecc.evaluation.core import evaluate

    return evaluate


def collect(
    packages: Sequence[str | Path],
    *,
    evals: Mapping[str, str | Path] | Sequence[str] | None = None,
    sensitivity_files: Sequence[str | Path] = (),
    bench: bool = False,
    data: str | Path | None = None,
    title: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The report's data: ``title``, ``variants`` (one per package), ``sensitivity`` (every
    distinct result, from the files and the manifests) and ``notes``.

    Args:
        packages: package folders, in the order the page shows them.
        evals: accuracy per package: ``PKG=FILE.json`` texts or ``{PKG: FILE}``.
        sensitivity_files: ``edgecc sensitivity --json`` outputs.
        bench: time the packages without a usable ``bench.json`` (x86 ones; the result is saved
            as their ``bench.json``).
        data: evaluate every package without other accuracy on this data set (needs
            ``edgecc.evaluate``).
        title: the page's title [default: from the package names].
        progress: called with one-line progress messages.

    Raises:
        UserInputError: no package, a damaged package, an unreadable ``--eval`` or
            ``--sensitivity`` file.
    """
    from edgecc.package import Package
    from edgecc.runtime import is_emulated

    say = progress or (lambda msg: logger.info("%s", msg))
    if not packages:
        raise UserInputError("report needs at least one package")
    paths = [Path(p) for p in packages]
    pkgs = [Package(p) for p in paths]
    eval_files = _eval_map(paths, evals)
    evaluate = _evaluator() if data is not None else None
    notes: list[str] = []
    sens_list = [
        sensitivity(read_json_file(Path(f), "--sensitivity"), str(f)) for f in sensitivity_files
    ]
    variants = []
    for i, pkg in enumerate(pkgs):
        acc, acc_source = None, None
        if i in eval_files:
            acc = accuracy_from_eval(read_json_file(eval_files[i], "--eval"), str(eval_files[i]))
            acc_source = str(eval_files[i])
        elif evaluate is not None and pkg.manifest.get("accuracy") is None:
            say(f"evaluating {pkg.path.name} on {data}")
            acc = accuracy_from_eval(dict(evaluate(pkg.path, data=data)), f"eval of {pkg.path}")
            acc_source = f"edgecc eval --data {data}"
        result = load_bench(pkg, notes)
        if result is None and bench:
            if is_emulated(pkg.target()) or pkg.target().device == "cuda":
                notes.append(
                    f"{pkg.path.name}: --bench times x86 packages only; "
                    f"run edgecc bench {pkg.path} (instruction counts under emulation)"
                )
            else:
                say(f"timing {pkg.path.name} against ONNX Runtime")
                result = pkg.benchmark()
                save_bench(pkg, result)
        variants.append(variant(pkg, acc, acc_source, result, notes))
    names = [v["name"] for v in variants]
    for v in variants:  # two folders of the same name (a/pkg, b/pkg): name them by their parent
        if names.count(v["name"]) > 1:
            v["name"] = f"{Path(v['path']).parent.name}/{v['name']}"
    for v in variants:
        if v["sensitivity"] is not None and not any(
            s["layers"] == v["sensitivity"]["layers"] for s in sens_list
        ):
            sens_list.append(v["sensitivity"])
    sources = {v["source_sha256"] for v in variants if v["source_sha256"]}
    if len(sources) > 1:
        notes.append(
            f"the packages come from {len(sources)} different source models (source sha256)"
        )
    return {
        "title": title or f"edgecc report: {', '.join(v['name'] for v in variants)}",
        "variants": variants,
        "sensitivity": sens_list,
        "notes": notes,
    }


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place.

    Parent folders are created; on any failure the temporary file is removed and an earlier
    file at ``path`` is left as it was.

    Raises:
        UserInputError: ``path`` cannot be written.
    """
    from edgecc import interrupt

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=interrupt.pid_prefix(f".{path.name}."), dir=path.parent)
    except OSError as err:
        raise UserInputError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        with interrupt.commit():
            os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise UserInputError(f"cannot write {path}: {err.strerror or err}") from err
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
