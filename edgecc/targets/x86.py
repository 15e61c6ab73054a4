"""x86-64 CPU targets: AVX2, AVX-512, and ``x86`` = whichever the compiling host supports.

LLVM's generic micro-architecture levels are used (``x86-64-v3`` = AVX2/FMA, ``x86-64-v4`` =
AVX-512) rather than ``native``, so a package built on one machine is reproducible and runs on any
CPU of that level.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgecc.targets.base import Target, register_target

_NEEDS = (
    "x86-64 Linux with glibc, Python 3.11 and the TVM runtime "
    "(pip install apache-tvm==0.27.0.post1)"
)

X86_AVX2 = register_target(
    Target(
        name="x86-avx2",
        description="x86-64 CPU with AVX2 and FMA (Haswell and newer, Zen)",
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"},
        arch="x86_64",
        runtime_needs=_NEEDS + "; a CPU with AVX2",
        aliases=("avx2",),
        vector_bits=256,
        l2_bytes=1024 * 1024,
    )
)

X86_AVX512 = register_target(
    Target(
        name="x86-avx512",
        description="x86-64 CPU with AVX-512 (Skylake-SP, Ice Lake, Zen 4/5)",
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4"},
        arch="x86_64",
        runtime_needs=_NEEDS + "; a CPU with AVX-512 (F, BW, DQ, VL)",
        aliases=("avx512",),
        vector_bits=512,
        l2_bytes=1024 * 1024,
    )
)


X86_AVX512_VNNI = register_target(
    Target(
        name="x86-avx512-vnni",
        description="x86-64 CPU with AVX-512 and AVX512-VNNI (Cascade Lake, Ice Lake, Zen 4/5)",
        tvm_target={
            "kind": "llvm",
            "mtriple": "x86_64-linux-gnu",
            "mcpu": "x86-64-v4",
            "mattr": ["+avx512vnni"],
        },
        arch="x86_64",
        runtime_needs=_NEEDS + "; a CPU with AVX-512 (F, BW, DQ, VL) and AVX512-VNNI",
        aliases=("avx512-vnni", "vnni"),
        vector_bits=512,
        l2_bytes=1024 * 1024,
    )
)

X86_AVX_VNNI = register_target(
    Target(
        name="x86-avx-vnni",
        description="x86-64 CPU with AVX2 and AVX-VNNI (Alder Lake, Zen 5 client)",
        tvm_target={
            "kind": "llvm",
            "mtriple": "x86_64-linux-gnu",
            "mcpu": "x86-64-v3",
            "mattr": ["+avxvnni"],
        },
        arch="x86_64",
        runtime_needs=_NEEDS + "; a CPU with AVX2 and AVX-VNNI",
        aliases=("avx-vnni",),
        vector_bits=256,
        l2_bytes=1024 * 1024,
    )
)


def host_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The compiling host's CPU flags (empty when ``cpuinfo`` is unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def host_has_avx512(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the compiling host's CPU flags include the AVX-512 subsets of x86-64-v4."""
    return {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= host_flags(cpuinfo)


def host_base(cpuinfo: Path = Path("/proc/cpuinfo")) -> Target:
    """The x86 record ``x86`` stands for on this host: AVX-512 + VNNI when the flags have
    ``avx512_vnni``, AVX-512, AVX2 + AVX-VNNI (``avx_vnni``), else AVX2."""
    flags = host_flags(cpuinfo)
    if host_has_avx512(cpuinfo):
        return X86_AVX512_VNNI if "avx512_vnni" in flags else X86_AVX512
    return X86_AVX_VNNI if "avx_vnni" in flags else X86_AVX2


_HOST_BASE = host_base()

register_target(
    Target(
        name="x86",
        description=f"this host's x86-64 CPU (detected: {_HOST_BASE.name})",
        tvm_target=_HOST_BASE.tvm_target,
        arch="x86_64",
        runtime_needs=_HOST_BASE.runtime_needs,
        aliases=("host", "x86_64"),
        vector_bits=_HOST_BASE.vector_bits,
        cores=os.cpu_count() or 1,
        l2_bytes=_HOST_BASE.l2_bytes,
    )
)
