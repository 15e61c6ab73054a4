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


def _x86(
    name: str,
    description: str,
    mcpu: str,
    needs: str,
    aliases: tuple[str, ...],
    vector_bits: int,
    mattr: tuple[str, ...] = (),
) -> Target:
    """Register one x86-64 Linux record: an LLVM micro-architecture level plus extra features."""
    tvm_target: dict = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}
    if mattr:
        tvm_target["mattr"] = list(mattr)
    return register_target(
        Target(
            name=name,
            description=description,
            tvm_target=tvm_target,
            arch="x86_64",
            runtime_needs=f"{_NEEDS}; a CPU with {needs}",
            aliases=aliases,
            vector_bits=vector_bits,
            l2_bytes=1024 * 1024,
        )
    )


# Each record: name, description, LLVM level, what the CPU needs, aliases, vector bits, features.
X86_AVX2 = _x86(
    "x86-avx2",
    "x86-64 CPU with AVX2 and FMA (Haswell and newer, Zen)",
    "x86-64-v3",
    "AVX2",
    ("avx2",),
    256,
)
X86_AVX512 = _x86(
    "x86-avx512",
    "x86-64 CPU with AVX-512 (Skylake-SP, Ice Lake, Zen 4/5)",
    "x86-64-v4",
    "AVX-512 (F, BW, DQ, VL)",
    ("avx512",),
    512,
)
X86_AVX512_VNNI = _x86(
    "x86-avx512-vnni",
    "x86-64 CPU with AVX-512 and AVX512-VNNI (Cascade Lake, Ice Lake, Zen 4/5)",
    "x86-64-v4",
    "AVX-512 (F, BW, DQ, VL) and AVX512-VNNI",
    ("avx512-vnni", "vnni"),
    512,
    ("+avx512vnni",),
)
X86_AVX_VNNI = _x86(
    "x86-avx-vnni",
    "x86-64 CPU with AVX2 and AVX-VNNI (Alder Lake, Zen 5 client)",
    "x86-64-v3",
    "AVX2 and AVX-VNNI",
    ("avx-vnni",),
    256,
    ("+avxvnni",),
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
