"""The target record: everything edgecc needs to know about a device, as data.

A target is a frozen :class:`Target`; families live one per file (``x86.py``, ``arm.py``,
``jetson.py``) and register their records with :func:`register_target`. Users add their own the
same way (or from a JSON file, see :func:`target_from_dict`) without touching any if-chain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgecc.errors import UserInputError


@dataclass(frozen=True)
class Target:
    """A compilation target.

    Attributes:
        name: canonical name (``rpi4``).
        description: one line for ``edgecc targets``.
        tvm_target: the TVM target as a dict (``{"kind": "llvm", "mtriple": ...}``) or a TVM tag
            name; the host, if any, goes in ``tvm_host``.
        tvm_host: the host target for device targets (CUDA), else None.
        arch: the CPU architecture of the device (``x86_64`` or ``aarch64``).
        device: the TVM device kind the package runs on (``cpu`` or ``cuda``).
        cross_compiler: the C compiler that links the shared library (None: the host's ``gcc``).
        cuda_arch: the CUDA architecture (``sm_87``) for GPU targets.
        runtime_needs: what the device must have to load the package.
        precisions: precisions the target can run (``fp32``, ``int8``...).
        int8_execution: how int8 (QDQ) graphs execute on this target (a package's manifest
            says it per layer).
        default_passes: the pipeline text used when the user gives no ``--passes`` (the
            cleanup passes of :data:`edgecc.api.CLEANUP_PASSES` run before it either way).
        aliases: other names accepted on the command line.
        vector_bits: width of the CPU's SIMD registers the schedules use (AVX2 256, AVX-512 512,
            NEON 128); 0 for targets whose kernels do not run on the CPU.
        cores: CPU cores of the device (parallel loops are split for at least this many
            threads; the runtime default thread count).
        l1d_bytes: L1 data cache per core (schedules block their working set to it).
        l2_bytes: L2 cache per core (or per cluster share), for the outer cache blocking.
    """

    name: str
    description: str
    tvm_target: dict[str, Any] | str
    arch: str
    device: str = "cpu"
    tvm_host: dict[str, Any] | str | None = None
    cross_compiler: str | None = None
    cuda_arch: str | None = None
    runtime_needs: str = ""
    precisions: tuple[str, ...] = ("fp32", "int8")
    int8_execution: str = (
        "QDQ Conv/ConvTranspose/Gemm/MatMul run as integer kernels (int8/uint8 operands, int32 "
        "accumulation, requantize fused); weights are stored as int8 in the library"
    )
    default_passes: str = "fold-bn,shape-inference"
    aliases: tuple[str, ...] = field(default=())
    vector_bits: int = 0
    cores: int = 4
    l1d_bytes: int = 32 * 1024
    l2_bytes: int = 512 * 1024

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (for manifests and ``edgecc targets --json``)."""
        return asdict(self)


_TARGETS: dict[str, Target] = {}
_ALIASES: dict[str, str] = {}


def register_target(target: Target) -> Target:
    """Add ``target`` to the registry under its name and aliases."""
    for key in (target.name, *target.aliases):
        if key in _ALIASES and _ALIASES[key] != target.name:
            raise ValueError(f"target name {key!r} already taken by {_ALIASES[key]!r}")
        _ALIASES[key] = target.name
    _TARGETS[target.name] = target
    return target


def target_from_dict(data: dict[str, Any]) -> Target:
    """Build a target from a JSON-like dict (lists become tuples)."""
    fixed = {k: tuple(v) if k in ("aliases", "precisions") else v for k, v in data.items()}
    return Target(**fixed)


def all_targets() -> list[Target]:
    """Every registered target, in registration order."""
    _load_builtin()
    return list(_TARGETS.values())


def get_target(name: str) -> Target:
    """The target called ``name`` (or an alias); a user error listing valid names otherwise."""
    _load_builtin()
    if name not in _ALIASES:
        names = ", ".join(t.name for t in _TARGETS.values())
        raise UserInputError(f"unknown target {name!r}; valid targets: {names}")
    return _TARGETS[_ALIASES[name]]


def _load_builtin() -> None:
    import edgecc.targets.x86  # noqa: F401, I001  (registration order = listing order)
    import edgecc.targets.arm  # noqa: F401
    import edgecc.targets.jetson  # noqa: F401
