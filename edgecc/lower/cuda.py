"""CUDA device code for Jetson targets: PTX from nvcc at compile time, without a GPU.

How TVM 0.27 builds CUDA (read from its source, ``src/target/cuda``): the codegen emits CUDA C
and hands it to the runtime's module factory ``ffi.Module.create.cuda``. That factory exists only
when TVM's CUDA runtime loaded, i.e. on a machine with a CUDA driver; it then compiles the source
through the Python callback ``tvm_callback_cuda_compile`` (NVRTC by default). On a machine with
no driver, like the build machines here, TVM keeps the CUDA *source* in a placeholder module
(``fmt="cuda"``) and whoever loads the exported library must compile it: TVM's Python,
``tvm_callback_cuda_compile`` and NVRTC or nvcc on the board.

So that the board needs only its CUDA driver, edgecc compiles the kernels to PTX here:

* the library's import blob (what ``export_library`` links in as ``__tvm_ffi__library_bin``) is
  taken from TVM (``runtime.ModulePackImportsToTensor``), parsed, and every CUDA module still in
  ``fmt="cuda"`` gets its source replaced by nvcc's PTX for the target arch (``fmt="ptx"``, the
  format ``cuModuleLoadData`` JIT-compiles on the device); the blob is re-serialised and linked
  with an ``.incbin`` assembly file through ``export_library``'s ``fpack_imports`` hook. The
  parser checks itself: re-serialising an unpatched blob must give the same bytes, else
  :class:`BlobFormatError`;
* on a machine that does have a driver, ``tvm_callback_cuda_compile`` is overridden during the
  build to return the same nvcc PTX, so the module is already ``fmt="ptx"`` and nothing is patched.

PTX from nvcc carries a PTX ISA version (``.version``); a driver JIT-compiles PTX only up to the
ISA of its own CUDA release, so the board's driver must be at least as new as the nvcc used here
(the notes say which).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgecc.errors import ToolchainError

log = logging.getLogger(__name__)

BLOB_SYMBOL = "__tvm_ffi__library_bin"


class BlobFormatError(RuntimeError):
    """TVM's import blob is not in the layout this module was written against."""


@dataclass(frozen=True)
class Nvcc:
    """An nvcc found on PATH: its path, CUDA release and the GPU architectures it can build."""

    path: str
    release: str
    archs: frozenset[str]


def find_nvcc() -> Nvcc | None:
    """The nvcc on PATH (the one TVM's ``compile_cuda`` runs), or None."""
    path = shutil.which("nvcc")
    if not path:
        return None
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, check=True
        ).stdout
        archs = subprocess.run(
            [path, "--list-gpu-arch"], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError) as err:
        raise ToolchainError(f"{path} does not run: {err}") from err
    match = re.search(r"release (\d+\.\d+)", version)
    return Nvcc(
        path,
        match.group(1) if match else "?",
        frozenset(a.replace("compute_", "sm_") for a in archs),
    )


def check_arch(nvcc: Nvcc, arch: str, target_name: str) -> None:
    """Raise a toolchain error when ``nvcc`` cannot generate code for ``arch``."""
    if arch in nvcc.archs:
        return
    oldest = min(nvcc.archs, key=lambda a: int(re.sub(r"\D", "", a) or 0), default="?")
    raise ToolchainError(
        f"CUDA {nvcc.release}'s nvcc cannot build {arch} ({target_name}): this CUDA release "
        f"supports {oldest} and newer; put the nvcc of a CUDA release that supports {arch} and "
        "that the board's driver accepts (e.g. CUDA 11.4 of JetPack 5) first on PATH"
    )


def ptx_isa(ptx: bytes) -> str | None:
    """The PTX ISA version (``.version 9.0``) of a PTX text."""
    match = re.search(rb"^\s*\.version\s+(\d+\.\d+)", ptx, re.MULTILINE)
    return match.group(1).decode() if match else None


def compile_ptx(source: str, arch: str) -> bytes:
    """CUDA C from TVM's codegen -> PTX for ``arch`` with TVM's own nvcc flags.

    Runs inside the CUDA target's scope (TVM reads the compute version from the current target).
    """
    from tvm.support import nvcc

    try:
        return bytes(nvcc.compile_cuda(source, target_format="ptx", arch=arch, compiler="nvcc"))
    except RuntimeError as err:
        last = str(err).strip().splitlines()[-1:] or ["?"]
        raise ToolchainError(
            f"nvcc failed to compile the CUDA kernels for {arch}: {last[0]}"
        ) from err


@contextlib.contextmanager
def nvcc_callback(arch: str) -> Iterator[None]:
    """Make ``tvm_callback_cuda_compile`` return nvcc PTX for ``arch`` (restored afterwards).

    Only consulted when TVM's CUDA runtime is loaded (a machine with a driver); see the module
    docstring.
    """
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, lambda code: compile_ptx(code, arch), override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)
        else:
            tvm_ffi.remove_global_func(name)


@dataclass
class PtxPacker:
    """An ``fpack_imports`` hook for ``Module.export_library`` that links CUDA modules as PTX.

    Attributes:
        compile: CUDA source -> PTX bytes.
        patched: how many CUDA modules were converted from source to PTX.
        formats: the final format of every CUDA module in the library.
        ptx_isa: PTX ISA versions found in the library.
    """

    compile: Callable[[str], bytes]
    patched: int = 0
    formats: list[str] = field(default_factory=list)
    ptx_isa: set[str] = field(default_factory=set)

    def __call__(self, mod, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        """Write the (patched) import blob and an assembly file that embeds it; return its path."""
        from tvm.runtime import _ffi_api

        if is_system_lib or symbol_prefix:
            raise BlobFormatError("system-lib packing is not supported for CUDA targets")
        blob = _ffi_api.ModulePackImportsToTensor(mod).numpy().tobytes()
        parsed = ImportBlob.parse(blob)
        for i, (kind, payload) in enumerate(parsed.modules):
            if kind == b"cuda":
                parsed.modules[i] = (kind, self._to_ptx(payload))
        work = Path(workspace_dir)
        data = work / "devc.bin"
        data.write_bytes(parsed.serialize())
        asm = work / "devc.s"
        asm.write_text(_incbin_asm(BLOB_SYMBOL, data))
        return str(asm)

    def _to_ptx(self, payload: bytes) -> bytes:
        fmt, fmap, code = split_cuda_payload(payload)
        if fmt == b"cuda":
            if b"__global__" not in code:
                raise BlobFormatError("CUDA module in source format holds no kernels")
            code = self.compile(code.decode())
            fmt = b"ptx"
            self.patched += 1
        self.formats.append(fmt.decode())
        if fmt == b"ptx" and (isa := ptx_isa(code)):
            self.ptx_isa.add(isa)
        return _bytes(fmt) + fmap + _bytes(code)


@dataclass
class ImportBlob:
    """TVM-FFI's packed import tree: ``u64 size | row_ptr | child_indices | (kind, payload)*``.

    Vectors are ``u64 n`` then ``n`` u64 values; kinds and payloads are ``u64 n`` then ``n``
    bytes; the kind ``_lib`` (the host library itself) has no payload.
    """

    row_ptr: list[int]
    children: list[int]
    modules: list[tuple[bytes, bytes | None]]

    @classmethod
    def parse(cls, blob: bytes) -> ImportBlob:
        reader = _Reader(blob)
        if reader.u64() != len(blob) - 8:
            raise BlobFormatError("import blob size header does not match its length")
        row_ptr, children = reader.vector(), reader.vector()
        modules: list[tuple[bytes, bytes | None]] = []
        while not reader.done():
            kind = reader.bytes()
            modules.append((kind, None if kind == b"_lib" else reader.bytes()))
        parsed = cls(row_ptr, children, modules)
        if parsed.serialize() != blob:
            raise BlobFormatError("import blob does not round-trip; TVM changed its format")
        return parsed

    def serialize(self) -> bytes:
        body = (
            _vector(self.row_ptr)
            + _vector(self.children)
            + b"".join(
                _bytes(kind) + (b"" if payload is None else _bytes(payload))
                for kind, payload in self.modules
            )
        )
        return struct.pack("<Q", len(body)) + body


def split_cuda_payload(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """A CUDA module's bytes ``fmt | fmap | code`` -> the three parts (fmap kept opaque).

    ``code`` is the last length-prefixed field; it is found by trying each 8-byte length prefix
    that would end exactly at the payload's end, starting from the earliest (the longest code).
    """
    reader = _Reader(payload)
    fmt = reader.bytes()
    start = reader.pos
    for pos in range(start, len(payload) - 7):
        (size,) = struct.unpack_from("<Q", payload, pos)
        if pos + 8 + size == len(payload):
            return fmt, payload[start:pos], payload[pos + 8 :]
    raise BlobFormatError("CUDA module payload has no trailing code field")


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def done(self) -> bool:
        return self.pos >= len(self.data)

    def u64(self) -> int:
        if self.pos + 8 > len(self.data):
            raise BlobFormatError("import blob truncated")
        (value,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def vector(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]

    def bytes(self) -> bytes:
        size = self.u64()
        if self.pos + size > len(self.data):
            raise BlobFormatError("import blob truncated")
        self.pos += size
        return self.data[self.pos - size : self.pos]


def _bytes(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _vector(values: list[int]) -> bytes:
    return struct.pack(f"<Q{len(values)}Q", len(values), *values)


def _incbin_asm(symbol: str, data: Path) -> str:
    """GNU assembler source defining ``symbol`` as the bytes of ``data`` (x86-64 and aarch64)."""
    size = data.stat().st_size
    # .file names the STT_FILE symbol; without it the assembler records gcc's random temp name.
    return (
        '\t.file "devc.s"\n'
        f'\t.section .rodata.{symbol},"a"\n'
        f"\t.globl {symbol}\n"
        f"\t.type {symbol}, %object\n"
        f"\t.balign 16\n"
        f"{symbol}:\n"
        f'\t.incbin "{data}"\n'
        f"\t.size {symbol}, {size}\n"
        '\t.section .note.GNU-stack,"",%progbits\n'
    )
