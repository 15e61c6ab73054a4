"""NVIDIA Jetson targets: CUDA device code plus an aarch64 host library.

Device code is compiled with ``nvcc`` to PTX for the board's architecture when nvcc is present
(it is JIT-compiled by the board's driver); otherwise the package records that it carries CUDA
source only. JetPack 6 boards have CUDA 12: PTX produced by a newer nvcc needs a driver that
accepts its PTX ISA version (see the README).
"""

from __future__ import annotations

from edgecc.targets.base import Target, register_target

_HOST = {
    "kind": "llvm",
    "mtriple": "aarch64-linux-gnu",
    "mcpu": "cortex-a78",
    "mattr": ["+neon", "+dotprod"],  # Cortex-A78AE (Orin) and Carmel (Xavier): ARMv8.2+
}


def _jetson(
    name: str,
    description: str,
    arch: str,
    host_cpu: str,
    aliases: tuple[str, ...],
    max_threads: int = 1024,
    shared_mem: int = 49152,
) -> Target:
    return register_target(
        Target(
            name=name,
            description=description,
            tvm_target={
                "kind": "cuda",
                "arch": arch,
                "max_threads_per_block": max_threads,
                "max_shared_memory_per_block": shared_mem,
                "thread_warp_size": 32,
            },
            tvm_host={**_HOST, "mcpu": host_cpu},
            arch="aarch64",
            device="cuda",
            cross_compiler="aarch64-linux-gnu-gcc",
            cuda_arch=arch,
            runtime_needs=(
                "JetPack (L4T, aarch64) with a CUDA driver that accepts the package's PTX, "
                "Python 3.11 and a CUDA-enabled TVM runtime built on the board"
            ),
            precisions=("fp32", "int8"),
            int8_execution=(
                "QDQ lowered by TVM Relax to float arithmetic around float kernels (the integer "
                "lowering runs on CPU targets only); weights are stored as float32"
            ),
            aliases=aliases,
        )
    )


_jetson(
    "jetson-orin",
    "NVIDIA Jetson AGX Orin: Ampere GPU sm_87, Cortex-A78AE host",
    "sm_87",
    "cortex-a78",
    ("orin", "jetson-agx-orin"),
)
_jetson(
    "jetson-orin-nano",
    "NVIDIA Jetson Orin Nano: Ampere GPU sm_87, Cortex-A78AE host",
    "sm_87",
    "cortex-a78",
    ("orin-nano",),
)
_jetson(
    "jetson-xavier",
    "NVIDIA Jetson AGX Xavier: Volta GPU sm_72, Carmel (ARMv8.2) host",
    "sm_72",
    "carmel",
    ("xavier", "jetson-agx-xavier"),
)
