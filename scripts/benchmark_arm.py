"""Executed aarch64 instructions per inference on rpi4 builds: with and without edgecc's schedule
rules, and ONNX Runtime's aarch64 build as the ARM peer, all under the same qemu, in one run.

Instruction counts are a proxy, not a board time: they ignore caches, memory bandwidth, stalls
and the differing costs of instructions. Every count runs under ``qemu-aarch64 -cpu cortex-a72``
(the Raspberry Pi 4's core, so no SVE or dot product) with edgecc's TCG plugin, 1 thread, and is
the mean over ``--runs`` inferences after a first one (edgecc.runtime.instructions).

For each model the torch module is exported to ONNX once, then (when both edgecc builds are the
same bytes, i.e. no rule matched any kernel, the count is taken once and ``identical_libraries``
says so):

``edgecc``        ``edgecc.compile(source, "rpi4")``: default passes, schedule rules on;
``rules off``     the same package graph lowered with ``edgecc.lower.lower(schedules=False)``:
                  the old default build (TVM's serial loop nests);
``onnxruntime``   ONNX Runtime's manylinux aarch64 wheel (default graph optimisations, 1 intra-op
                  thread) on the source ONNX, in the emulator's Python. It crashes on import under
                  qemu-user 7.2 because qemu passes the x86 host's /proc/cpuinfo through, which
                  its CPU probe (pytorch/cpuinfo) cannot parse; ``arm_peer/cpuinfo_shim.c``
                  (LD_PRELOAD) makes it read a Cortex-A72 cpuinfo instead.

Every output is compared (cosine) with ONNX Runtime on the host. The wheel and the shim are
cached in ``${EDGECC_CACHE:-~/.cache/edgecc}/aarch64-ort/`` (first use: pip download).

Usage::

    python scripts/benchmark_arm.py [--models resnet18,mobilenetv2] [--runs 10]
        [--no-peer] [--json [PATH]] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/models.py holds the reference architectures

import edgecc  # noqa: E402
from edgecc.frontend import load_model  # noqa: E402
from edgecc.lower import lower  # noqa: E402
from edgecc.package import sha256_file  # noqa: E402
from edgecc.report.compare import compare_outputs, run_onnx  # noqa: E402
from edgecc.runtime import emulation, prepare_emulator  # noqa: E402
from edgecc.runtime.instructions import (  # noqa: E402
    PROXY_NOTE,
    count_instructions,
    per_inference,
    plugin_options,
    qemu_cpu,
    read_counts,
)
from edgecc.targets import get_target  # noqa: E402
from tests.models import make_model  # noqa: E402

log = logging.getLogger("benchmark_arm")

WORK_DIR = ROOT / "build" / "benchmark-arm"
TARGET = "rpi4"
ALL_MODELS = ("resnet18", "mobilenetv2", "efficientnet_lite0", "resnetish", "mobilenetv2ish")
PEER_DIR = Path(__file__).resolve().parent / "arm_peer"
ORT_WHEELS = ("onnxruntime", "flatbuffers", "packaging")


def cortex_a72_cpuinfo(cpus: int) -> str:
    """/proc/cpuinfo as a Raspberry Pi 4 (Cortex-A72, MIDR 0x410fd083) shows it."""
    block = (
        "processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
        "CPU revision\t: 3\n"
    )
    return "\n".join(block.format(i=i) for i in range(cpus)) + (
        "\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
    )


def ort_peer_files() -> dict[str, Path]:
    """The aarch64 ONNX Runtime site folder, the cpuinfo shim and the fake cpuinfo (cached)."""
    root = emulation.cache_root() / "aarch64-ort"
    site = root / "site"
    if not (site / "onnxruntime").is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".aarch64-ort.", dir=emulation.cache_root()))
        try:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--dest",
                str(staging / "wheels"),
            ]
            for plat in (*emulation.PLATFORMS, "any"):
                cmd += ["--platform", plat]
            log.info("downloading ONNX Runtime's aarch64 wheel")
            subprocess.run(cmd + list(ORT_WHEELS), check=True)
            for wheel in sorted((staging / "wheels").glob("*.whl")):
                with zipfile.ZipFile(wheel) as zf:
                    zf.extractall(staging / "site")
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(site, ignore_errors=True)
            (staging / "site").rename(site)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    shim = root / "cpuinfo_shim.so"
    source = PEER_DIR / "cpuinfo_shim.c"
    if not shim.is_file() or shim.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(
            [
                "aarch64-linux-gnu-gcc",
                "-O2",
                "-shared",
                "-fPIC",
                "-o",
                str(shim),
                str(source),
                "-ldl",
            ],
            check=True,
        )
    cpuinfo = root / "cpuinfo-cortex-a72.txt"
    cpuinfo.write_text(cortex_a72_cpuinfo(os.cpu_count() or 1))
    return {"site": site, "shim": shim, "cpuinfo": cpuinfo}


def count_ort(
    source: Path, feeds: dict[str, np.ndarray], runs: int, work: Path, threads: int = 1
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """ONNX Runtime (aarch64) instructions per inference under the same qemu and plugin."""
    files = ort_peer_files()
    root = prepare_emulator()
    (prefix, env) = emulation.emulated_python(root)
    env["PYTHONPATH"] = f"{files['site']}{os.pathsep}{env['PYTHONPATH']}"
    count_file, inputs, outputs = work / "ort-count.txt", work / "ort-in.npz", work / "ort-out.npz"
    np.savez(inputs, **feeds)
    cpu = qemu_cpu(get_target(TARGET))
    cmd = [
        prefix[0],
        "-cpu",
        cpu,
        *plugin_options(count_file),
        "-E",
        f"LD_PRELOAD={files['shim']}",
        "-E",
        f"EDGECC_FAKE_CPUINFO={files['cpuinfo']}",
        *prefix[1:],
        str(PEER_DIR / "ort_runner.py"),
        str(source),
        str(inputs),
        str(outputs),
        str(runs),
        str(threads),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise RuntimeError(f"ONNX Runtime under qemu failed: {tail}")
    total, marks = read_counts(count_file)
    with np.load(outputs) as data:
        arrays = [data[f"out{i}"] for i in range(len(data.files))]
    version = next(
        p.name.removesuffix(".dist-info").split("-")[1]
        for p in files["site"].glob("onnxruntime-*.dist-info")
    )
    return (
        {
            "instructions_per_inference": per_inference(marks, runs)[0],
            "runs": runs,
            "threads": threads,
            "process_instructions": total,
            "qemu_cpu": cpu,
            "onnxruntime": version,
        },
        arrays,
    )


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Counts for one model: edgecc (rules on), rules off, and the ARM peer."""
    work = WORK_DIR / name
    work.mkdir(parents=True, exist_ok=True)
    module = make_model(name)
    inputs = module.example_inputs()
    loaded = load_model(module, example_inputs=inputs)
    source = work / "source.onnx"
    onnx.save(loaded.model, str(source))
    feeds = {spec.name: t.numpy() for spec, t in zip(loaded.inputs, inputs, strict=True)}
    expected = list(run_onnx(loaded.model, feeds).values())
    target = get_target(TARGET)
    pkg = edgecc.compile(source, TARGET, out=work / "rpi4")
    graph = onnx.load(str(pkg.path / "model.onnx"))
    shapes = {i["name"]: tuple(i["shape"]) for i in pkg.manifest["inputs"]}
    dtypes = {i["name"]: i["dtype"] for i in pkg.manifest["inputs"]}
    off = lower(graph, target, shapes, dtypes, work / "rules-off.so", schedules=False)
    row: dict[str, Any] = {
        "model": name,
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
        "passes": pkg.manifest["pipeline"],
        "scheduled_kernels": pkg.manifest["library"].get("schedules", {}).get("counts", {}),
        "counts": {},
        "cosine_vs_host_ort": {},
    }
    # Without any rule that matches (e.g. before the rules land) both builds are the same bytes:
    # count once and say so.
    row["identical_libraries"] = sha256_file(pkg.library) == sha256_file(off.path)
    libraries = {"rules off": off.path}
    if not row["identical_libraries"]:
        libraries["edgecc"] = pkg.library
    for engine, library in libraries.items():
        log.info("%s: counting %s", name, engine)
        outputs: list[np.ndarray] = []
        row["counts"][engine] = count_instructions(
            library, target, feeds, runs=args.runs, collect=outputs
        )
        row["cosine_vs_host_ort"][engine] = _cosine(outputs, expected)
    if row["identical_libraries"]:
        row["counts"]["edgecc"] = row["counts"]["rules off"]
        row["cosine_vs_host_ort"]["edgecc"] = row["cosine_vs_host_ort"]["rules off"]
    if args.peer:
        log.info("%s: counting onnxruntime (aarch64)", name)
        try:
            counts, outputs = count_ort(source, feeds, args.runs, work)
            row["counts"]["onnxruntime"] = counts
            row["cosine_vs_host_ort"]["onnxruntime"] = _cosine(outputs, expected)
        except (RuntimeError, subprocess.CalledProcessError) as err:
            log.error("%s: ARM peer failed: %s", name, err)
            row["peer_error"] = str(err)
    per = {k: v["instructions_per_inference"] for k, v in row["counts"].items()}
    row["edgecc_vs_rules_off"] = per["edgecc"] / per["rules off"]
    if "onnxruntime" in per:
        row["edgecc_vs_onnxruntime"] = per["edgecc"] / per["onnxruntime"]
        row["rules_off_vs_onnxruntime"] = per["rules off"] / per["onnxruntime"]
    return row


def _cosine(outputs: list[np.ndarray], expected: list[np.ndarray]) -> float:
    names = [str(i) for i in range(len(expected))]
    got = dict(zip(names, outputs, strict=True))
    return compare_outputs(got, dict(zip(names, expected, strict=True)))["cosine"]


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    qemu = subprocess.run(["qemu-aarch64", "--version"], capture_output=True, text=True)
    return {
        "host_cpu": cpu,
        "emulated_cpu": qemu_cpu(get_target(TARGET)),
        "qemu": qemu.stdout.splitlines()[0] if qemu.stdout else "?",
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.3f} G"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | input | edgecc (rules on) | rules off | ONNX Runtime aarch64 "
        "| on / off | on / ORT | off / ORT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = {k: v["instructions_per_inference"] for k, v in r["counts"].items()}
        shape = ", ".join("x".join(map(str, s)) for s in r["inputs"].values())
        ratios = [
            r.get("edgecc_vs_rules_off"),
            r.get("edgecc_vs_onnxruntime"),
            r.get("rules_off_vs_onnxruntime"),
        ]
        lines.append(
            f"| {r['model']} | {shape} | {_g(c.get('edgecc'))} | "
            f"{_g(c.get('rules off'))} | {_g(c.get('onnxruntime'))} | "
            + " | ".join("-" if x is None else f"{x:.2f}" for x in ratios)
            + " |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        default="resnet18,mobilenetv2",
        help=f"comma-separated, from {', '.join(ALL_MODELS)}",
    )
    p.add_argument("--runs", type=int, default=10, help="inferences counted after a first one")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip ONNX Runtime")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the JSON result to PATH (stdout without PATH)",
    )
    p.add_argument("--markdown", type=Path, help="write the table and the command here")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(ALL_MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {', '.join(ALL_MODELS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("edgecc", "tvm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    command = "python scripts/benchmark_arm.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    result = {
        "command": command.strip(),
        "machine": machine(),
        "note": PROXY_NOTE,
        "settings": {"runs": args.runs, "threads": 1, "target": TARGET},
        "rows": rows,
        "errors": errors,
    }
    for name in args.models.split(","):
        try:
            rows.append(bench_model(name, args))
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 (one failing model must not lose the others)
            log.exception("%s failed", name)
            errors[name] = f"{type(err).__name__}: {err}"
        if args.json and args.json != "-":  # keep what is measured so far
            Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = (
        f"host CPU: {result['machine']['host_cpu']}; emulated: "
        f"{result['machine']['emulated_cpu']} ({result['machine']['qemu']}); 1 thread; "
        f"instructions per inference, mean of {args.runs} after a first\n"
        f"{table(rows)}\n{PROXY_NOTE}"
    )
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"```\n{result['command']}\n```\n\n{text}\n")
    if args.json == "-":
        print(json.dumps(result, indent=2, default=str))
    else:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(text)
        for name, error in errors.items():
            print(f"{name} failed: {error}")


if __name__ == "__main__":
    main()
