"""An aarch64 Python 3.11 with the TVM runtime, run under ``qemu-aarch64`` (user-mode emulation).

Prepared once and cached outside the repository, in
``${EDGECC_CACHE:-~/.cache/edgecc}/aarch64-py311/``:

``sysroot/``
    Debian bookworm arm64 packages (Python 3.11 and the C libraries it loads), unpacked with
    ``dpkg -x`` and never installed: ``apt-get`` runs with ``APT::Architecture=arm64`` and all of
    its state (package lists, caches) in a scratch folder, so the host's apt state is untouched.
``site/``
    aarch64 manylinux wheels of the TVM runtime and its Python dependencies, unzipped.
``edgecc-emulator.json``
    what was installed; its presence marks a complete cache.

Beside it, ``qemu-insn-plugin-<hash>.so``: edgecc's TCG plugin that counts executed guest
instructions (``qemu_insn_plugin.c``, package data), compiled on first use with the host's C
compiler (:func:`insn_plugin`; ``scripts/setup.sh`` builds it ahead); the hash of the source in
its name makes an edited source rebuild.

The cache is built in a scratch folder beside it and renamed into place at the end, so an
interrupted prepare never leaves a half cache; a file lock serialises concurrent prepares.
Emulated run times say nothing about the board's speed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from edgecc.errors import EdgeccError, ToolchainError

log = logging.getLogger(__name__)

Progress = Callable[[str], None] | None

CACHE_NAME = "aarch64-py311"
MARKER = "edgecc-emulator.json"
PYTHON = "usr/bin/python3.11"

DEBS = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libexpat1",
    "zlib1g",
    "libffi8",
    "libssl3",
    "libstdc++6",
    "libgcc-s1",
    "libbz2-1.0",
    "liblzma5",
    "libsqlite3-0",
    "libncursesw6",
    "libtinfo6",
    "libreadline8",
    "libuuid1",
    "libcrypt1",
    "libdb5.3",
)
# The runtime must match the compiler that built the library (same TVM and tvm-ffi releases).
WHEELS = (
    "apache-tvm==0.27.0.post1",
    "apache-tvm-ffi==0.1.14.post1",
    "numpy",
    "ml_dtypes",
    "typing_extensions",
)
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")


def cache_root() -> Path:
    """``$EDGECC_CACHE`` or ``~/.cache/edgecc``."""
    return Path(os.environ.get("EDGECC_CACHE") or Path.home() / ".cache" / "edgecc")


def emulator_dir() -> Path:
    """Where the prepared aarch64 Python lives (it may not exist yet)."""
    return cache_root() / CACHE_NAME


def is_prepared(root: Path | None = None) -> bool:
    """True when ``root`` (default :func:`emulator_dir`) holds a complete prepared cache."""
    root = root or emulator_dir()
    return (root / MARKER).is_file() and (root / "sysroot" / PYTHON).is_file()


def qemu_binary() -> str:
    """Path of ``qemu-aarch64``; a toolchain error naming the Debian package when missing."""
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if not qemu:
        raise ToolchainError(
            "qemu-aarch64 not found: install the Debian package qemu-user "
            "(apt-get install qemu-user) to run aarch64 packages on this machine"
        )
    return qemu


def prepare_emulator(progress: Progress = None) -> Path:
    """Build the cached aarch64 Python + TVM runtime if needed; return its folder.

    Idempotent and safe to call concurrently (a file lock serialises builders; the second caller
    finds the finished cache). Needs ``apt-get``, ``dpkg`` and pip with access to Debian's and
    PyPI's package registries the first time; about 400 MB on disk.

    Args:
        progress: called with one line per step (also logged).

    Returns:
        The cache folder, holding ``sysroot/`` and ``site/``.

    Raises:
        ToolchainError: qemu-aarch64, apt-get or dpkg is missing, or a download fails.
    """
    root = emulator_dir()
    if is_prepared(root):
        return root
    qemu_binary()
    for tool in ("apt-get", "dpkg"):
        if not shutil.which(tool):
            raise ToolchainError(
                f"{tool} not found: preparing the aarch64 emulator needs a Debian-based host"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{CACHE_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_prepared(root):  # another process finished it while we waited
            return root
        _build(root, progress)
    return root


def _say(progress: Progress, line: str) -> None:
    log.info(line)
    if progress:
        progress(line)


def _build(root: Path, progress: Progress) -> None:
    start = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.", dir=root.parent))
    try:
        _say(progress, f"preparing aarch64 emulator in {root} (first use only, ~400 MB)")
        _fetch_sysroot(staging, progress)
        _fetch_site(staging, progress)
        wheels = sorted(p.name for p in (staging / "wheels").iterdir())
        info = {
            "debs": list(DEBS),
            "wheels": wheels,
            "python": PYTHON,
            "seconds": round(time.monotonic() - start, 1),
        }
        shutil.rmtree(staging / "wheels")
        shutil.rmtree(staging / "debs")
        (staging / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if root.exists():  # a stale, incomplete cache from an older layout
            shutil.rmtree(root)
        staging.rename(root)
        _say(progress, f"aarch64 emulator ready in {time.monotonic() - start:.0f} s")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(cmd: list[str], cwd: Path | None = None, what: str = "the aarch64 emulator") -> None:
    """Run a preparation command; a toolchain error with its last output line on failure."""
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
        raise ToolchainError(f"preparing {what}: {Path(cmd[0]).name} failed: {lines[-1]}")


def _fetch_sysroot(staging: Path, progress: Progress) -> None:
    apt_state = staging / "apt"
    (apt_state / "lists" / "partial").mkdir(parents=True)
    (apt_state / "cache" / "archives" / "partial").mkdir(parents=True)
    opts = [
        "-oAPT::Architecture=arm64",
        "-oAPT::Architectures=arm64",
        f"-oDir::State::Lists={apt_state / 'lists'}",
        f"-oDir::Cache={apt_state / 'cache'}",
        "-q",
    ]
    _say(progress, "emulator: apt-get update (arm64 package lists)")
    _run(["apt-get", *opts, "update"])
    debs = staging / "debs"
    debs.mkdir()
    _say(progress, f"emulator: downloading {len(DEBS)} arm64 .debs (Python 3.11 and libraries)")
    _run(["apt-get", *opts, "download", *DEBS], cwd=debs)
    sysroot = staging / "sysroot"
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(sysroot)])
    shutil.rmtree(apt_state)
    if not (sysroot / PYTHON).is_file():
        raise ToolchainError(f"preparing the aarch64 emulator: {PYTHON} missing after unpacking")


def _fetch_site(staging: Path, progress: Progress) -> None:
    wheels = staging / "wheels"
    _say(progress, "emulator: downloading aarch64 wheels (" + ", ".join(WHEELS) + ")")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--dest",
        str(wheels),
    ]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    _run(cmd + list(WHEELS))
    site = staging / "site"
    _say(progress, "emulator: unpacking wheels")
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)


PLUGIN_SOURCE = Path(__file__).with_name("qemu_insn_plugin.c")


def insn_plugin(progress: Progress = None) -> Path:
    """The instruction-counting qemu plugin, compiled once (per source version) into the cache.

    Returns:
        The plugin's path (load it with ``qemu-aarch64 -plugin PATH,out=FILE``).

    Raises:
        ToolchainError: no host C compiler, or the compile failed.
    """
    digest = hashlib.sha256(PLUGIN_SOURCE.read_bytes()).hexdigest()[:12]
    plugin = cache_root() / f"qemu-insn-plugin-{digest}.so"
    if plugin.is_file():
        return plugin
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc or not shutil.which(cc):
        raise ToolchainError(
            "no host C compiler (gcc) to build the qemu instruction-counting plugin: "
            "install the Debian package gcc"
        )
    plugin.parent.mkdir(parents=True, exist_ok=True)
    staged = plugin.with_name(f".{plugin.name}.{os.getpid()}")
    _say(progress, f"building the qemu instruction-counting plugin {plugin.name}")
    flags = ["-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall"]
    try:
        _run([cc, *flags, "-o", str(staged), str(PLUGIN_SOURCE)], what="the qemu plugin")
        os.replace(staged, plugin)
    finally:
        staged.unlink(missing_ok=True)
    return plugin


def emulated_python(root: Path) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment that run the cached aarch64 Python under qemu.

    Args:
        root: a prepared cache folder (see :func:`prepare_emulator`).

    Returns:
        ``(argv prefix, environment)``: append the script and its arguments to the prefix.
    """
    if not is_prepared(root):
        raise EdgeccError(f"aarch64 emulator cache {root} is incomplete; call prepare_emulator()")
    sysroot = root / "sysroot"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QEMU_"))}
    env.update(
        {"PYTHONPATH": str(root / "site"), "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    )
    return [qemu_binary(), "-L", str(sysroot), str(sysroot / PYTHON)], env


if __name__ == "__main__":  # ``python -m edgecc.runtime.emulation``: warm the cache (setup, CI)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("aarch64 emulator: %s", prepare_emulator())
    log.info("qemu instruction-counting plugin: %s", insn_plugin())
