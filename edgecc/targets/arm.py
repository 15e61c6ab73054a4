"""64-bit ARM CPU targets, cross-compiled with ``aarch64-linux-gnu-gcc``."""

from __future__ import annotations

from edgecc.targets.base import Target, register_target

_NEEDS = (
    "aarch64 Linux with glibc >= 2.28, Python 3.11 and the TVM runtime "
    "(pip install apache-tvm==0.27.0.post1 on the device)"
)

register_target(
    Target(
        name="rpi4",
        description="Raspberry Pi 4 Model B: Cortex-A72, aarch64, NEON",
        tvm_target={
            "kind": "llvm",
            "mtriple": "aarch64-linux-gnu",
            "mcpu": "cortex-a72",
            "mattr": ["+neon"],
            "num-cores": 4,
        },
        arch="aarch64",
        cross_compiler="aarch64-linux-gnu-gcc",
        runtime_needs=_NEEDS + "; 64-bit Raspberry Pi OS",
        aliases=("raspberry-pi-4", "rpi4b"),
        vector_bits=128,
        cores=4,
        l1d_bytes=32 * 1024,
        l2_bytes=256 * 1024,  # 1 MiB shared by 4 cores
    )
)

register_target(
    Target(
        name="arm64",
        description="generic aarch64 CPU (ARMv8-A with NEON)",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
        arch="aarch64",
        cross_compiler="aarch64-linux-gnu-gcc",
        runtime_needs=_NEEDS,
        aliases=("aarch64",),
        vector_bits=128,
    )
)

register_target(
    Target(
        name="rpi5",
        description="Raspberry Pi 5: Cortex-A76, ARMv8.2-A with NEON and dot product (sdot)",
        tvm_target={
            "kind": "llvm",
            "mtriple": "aarch64-linux-gnu",
            "mcpu": "cortex-a76",
            "mattr": ["+neon", "+dotprod"],
            "num-cores": 4,
        },
        arch="aarch64",
        cross_compiler="aarch64-linux-gnu-gcc",
        runtime_needs=_NEEDS + "; 64-bit Raspberry Pi OS",
        aliases=("raspberry-pi-5", "rpi5b"),
        vector_bits=128,
        cores=4,
        l1d_bytes=64 * 1024,
        l2_bytes=512 * 1024,
    )
)

register_target(
    Target(
        name="arm64-v8.2",
        description="generic ARMv8.2-A aarch64 CPU with NEON and dot product (sdot)",
        tvm_target={
            "kind": "llvm",
            "mtriple": "aarch64-linux-gnu",
            "mattr": ["+v8.2a", "+neon", "+dotprod"],
        },
        arch="aarch64",
        cross_compiler="aarch64-linux-gnu-gcc",
        runtime_needs=_NEEDS + "; a CPU with the ARMv8.2 dot-product extension",
        aliases=("aarch64-dotprod",),
        vector_bits=128,
    )
)
