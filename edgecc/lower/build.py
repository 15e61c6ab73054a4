"""ONNX -> TVM Relax -> target pipeline -> VM executable -> shared library for the device.

Relax pipeline per target kind (measured on this machine, TVM 0.27, no tuning):

* CPU (``llvm``): ``DecomposeOpsForInference`` + TVM's CPU default pipeline
  (``relax.backend.cpu_generic``: legalize, fold constants, fuse). ``tvm.compile``'s own default
  for CPU skips constant folding and fusion; fusing halved the run time of a 3-layer MLP (9.6 ->
  4.8 ms) and changed nothing on a small ResNet, whose time is in unscheduled convolutions. The
  dlight CPU rules (``dl.cpu.GEMV``, ``dl.cpu.Reduction``) made both slower (MLP 7.1 ms, ResNet
  1.6x), so they are not applied. Outputs were identical in all variants. Fast CPU code needs
  MetaSchedule tuning on top (here only with ``tuning=``: :mod:`edgecc.lower.tune`).
* CUDA: TVM's CUDA default pipeline, which applies the dlight GPU rules (``Matmul``, ``GEMV``,
  ``Reduction``, ``GeneralReduction``, ``Fallback``); without thread bindings TIR would not
  build for a GPU at all. Device code: see :mod:`edgecc.lower.cuda`.

Reproducibility: the same model, shapes and target give a byte-identical library (tests check
the sha256). Nothing host-specific is embedded: the link runs with a scratch folder whose name
appears in no output (no debug info is generated, and ``.incbin`` paths are not recorded).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from edgecc import interrupt
from edgecc.errors import ToolchainError
from edgecc.lower import cuda, int8_dynamic, schedules
from edgecc.lower.coverage import OperatorConversionError, canonicalize, check_coverage
from edgecc.lower.int8 import Int8Log, integer_lowering_passes
from edgecc.lower.int8.layers import assign_kernels, record_kernels_pass
from edgecc.lower.int8.pad_channels import pad_channels_pass
from edgecc.lower.int8.shift import shift_pass
from edgecc.lower.schedules import CpuParams, ScheduleCoverage, schedules_enabled
from edgecc.targets import Target

log = logging.getLogger(__name__)

Progress = Callable[[str], None] | None


@dataclass
class LoweredLibrary:
    """A compiled, exported library and how it was made.

    Attributes:
        path: the shared library (``out_path`` of :func:`lower`).
        cuda_code: ``"ptx"`` when nvcc compiled the device code for the target's arch,
            ``"source"`` when the library carries CUDA source the board must compile, None on CPU.
        notes: human-readable facts the user should know (what the board needs, limits).
        compile_seconds: wall time of :func:`lower`.
        tvm_version: the TVM that compiled it (the device needs the same runtime release).
        details: JSON-serialisable build facts: TVM target, compiler, pipeline, nvcc...
    """

    path: Path
    cuda_code: str | None
    notes: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0
    tvm_version: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def lower(
    model: onnx.ModelProto,
    target: Target,
    input_shapes: dict[str, tuple[int, ...]],
    input_dtypes: dict[str, str],
    out_path: Path,
    progress: Progress = None,
    schedules: bool | None = None,
    tuning: Any = None,
) -> LoweredLibrary:
    """Compile ``model`` for ``target`` into a shared library at ``out_path``.

    Toolchains are checked first and operator coverage second, so a missing compiler or an
    unsupported op fails in seconds. The library is written to a temporary name beside
    ``out_path`` and renamed, so a failed build never leaves a partial file.

    Args:
        model: the ONNX model (after edgecc's passes); not modified.
        target: where the library will run.
        input_shapes: static shape of every graph input.
        input_dtypes: dtype name (``float32``...) of every graph input.
        out_path: the ``.so`` to write.
        progress: called with one line per step.
        schedules: apply edgecc's CPU schedule rules (:mod:`edgecc.lower.schedules`); False
            gives the old default build (TVM's serial loop nests), for comparisons. None: on,
            unless the environment variable ``EDGECC_SCHEDULES`` is ``off``.
        tuning: a :class:`edgecc.lower.tune.Tuning`: tune and/or apply MetaSchedule records to
            the kernels before the rules (CPU, rules on).

    Returns:
        The library and its build facts.

    Raises:
        ToolchainError: the cross compiler (or nvcc for the target's arch) is missing.
        UnsupportedOperatorError: TVM cannot import an operator of the model.
    """
    start = time.monotonic()
    say = _sayer(progress)
    linker = _linker(target)
    nvcc = _nvcc_for(target)
    if tuning is not None:
        from edgecc.lower.tune import check_tunable

        check_tunable(target, tuning)
        if not schedules_enabled(schedules):
            raise ValueError("tuning records need the schedule rules (schedules on)")
    mod = import_relax(model, input_shapes, input_dtypes, say)

    import tvm

    tvm_target = tvm_target_of(target)
    coverage = ScheduleCoverage()
    int8_log = Int8Log()
    int8_kernel_calls: list = []
    dynamic = int8_dynamic.DynamicInt8Report.of(model)
    say(f"running the {tvm_target.kind.name} Relax pipeline")
    from edgecc.rpc import runner_errors

    # a board farm that stopped the tuning: its one-line RPCError, not TVM's RuntimeError of it
    with tvm_target, runner_errors(getattr(tuning, "runner", None)):
        mod = _pipeline(
            tvm_target,
            target,
            coverage,
            schedules_enabled(schedules),
            int8_log,
            int8_kernel_calls,
            tuning,
            say,
            dynamic,
        )(mod)
    say("building TIR kernels with LLVM" + (" and CUDA codegen" if target.device == "cuda" else ""))
    with tvm_target, _device_compiler(target, nvcc):
        executable = tvm.compile(mod, target=tvm_target, relax_pipeline=None)

    details: dict[str, Any] = {
        "tvm_target": str(tvm_target),
        "relax_pipeline": _pipeline_name(tvm_target),
        "compiler": linker,
    }
    if target.device == "cpu":
        details["schedules"] = coverage.summary()
        details["schedule_rules"] = "on" if schedules_enabled(schedules) else "off"
        details["int8_ops"] = [asdict(d) for d in int8_log.decisions]
        assign_kernels(details["int8_ops"], int8_kernel_calls)
        if dynamic.rewritten or dynamic.declined:
            details["int8_dynamic"] = dynamic.summary(coverage.kernels)
    notes: list[str] = []
    if tuning is not None:
        from edgecc.lower.tune import reproducibility_note

        details["tuning"] = tuning.facts
        notes.append(reproducibility_note(tuning))
    packer = cuda.PtxPacker(lambda src: _compile_ptx(src, target, tvm_target)) if nvcc else None
    say(
        f"linking {out_path.name} with {Path(linker).name}"
        + (f" (CUDA kernels -> {target.cuda_arch} PTX with nvcc {nvcc.release})" if nvcc else "")
    )
    _export(executable, out_path, linker, packer)

    cuda_code = None
    if target.device == "cuda":
        cuda_code = _cuda_facts(target, nvcc, packer, details, notes)
    seconds = time.monotonic() - start
    log.info("lowered for %s in %.1f s -> %s", target.name, seconds, out_path)
    return LoweredLibrary(
        path=out_path,
        cuda_code=cuda_code,
        notes=notes,
        compile_seconds=seconds,
        tvm_version=tvm.__version__,
        details=details,
    )


def tvm_target_of(target: Target):
    """The ``tvm.target.Target`` of an edgecc target (with its host for device targets)."""
    import tvm

    if target.tvm_host is not None:
        return tvm.target.Target(target.tvm_target, host=target.tvm_host)
    return tvm.target.Target(target.tvm_target)


def _sayer(progress: Progress) -> Callable[[str], None]:
    def say(line: str) -> None:
        if progress:  # the caller shows it; logging it too printed it twice under -v
            progress(line)
        else:
            log.info(line)

    return say


def check_toolchain(target: Target) -> None:
    """Fail fast, before any export or pass, when the target's compilers are missing or unfit.

    Raises:
        ToolchainError: no cross compiler / host cc, or nvcc cannot build the target's arch.
    """
    _linker(target)
    _nvcc_for(target)


def _linker(target: Target) -> str:
    """The C compiler that links the library: the target's cross compiler or the host's cc."""
    if target.cross_compiler:
        found = shutil.which(target.cross_compiler)
        if not found:
            package = (
                "gcc-aarch64-linux-gnu" if target.cross_compiler.startswith("aarch64") else None
            )
            hint = f": install the Debian package {package}" if package else ""
            raise ToolchainError(
                f"cross compiler {target.cross_compiler} for {target.name} not found on PATH{hint}"
            )
        return found
    from tvm.support import cc

    host_cc = cc.get_cc() or "gcc"
    found = shutil.which(host_cc)
    if not found:
        raise ToolchainError(f"C compiler {host_cc} not found on PATH: install gcc (or set CXX)")
    return found


def _nvcc_for(target: Target) -> cuda.Nvcc | None:
    """nvcc when it can build the target's arch, None when absent (CUDA source is embedded)."""
    if target.device != "cuda":
        return None
    nvcc = cuda.find_nvcc()
    if nvcc is None:
        log.warning(
            "nvcc not found: %s will carry CUDA source for the board to compile", target.name
        )
        return None
    cuda.check_arch(nvcc, target.cuda_arch or "", target.name)
    return nvcc


def import_relax(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]],
    input_dtypes: dict[str, str],
    say: Callable[[str], None],
) -> Any:
    """Check operator coverage, then import ``model`` into a Relax IRModule (shared by
    :func:`lower` and :func:`edgecc.lower.tune.lower_tuned`)."""
    check_coverage(model)
    say(f"importing ONNX into TVM Relax ({len(model.graph.node)} nodes)")
    return _import_onnx(canonicalize(model), input_shapes, input_dtypes)


def _import_onnx(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]
):
    """``from_onnx`` with the importer's prints captured and its failures made readable."""
    from tvm.relax.frontend import onnx as relax_onnx

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return relax_onnx.from_onnx(
                model,
                shape_dict={k: list(v) for k, v in shapes.items()},
                dtype_dict=dict(dtypes),
                keep_params_in_input=False,
            )
    except Exception as err:
        op_type = _failed_op(printed.getvalue())
        if op_type is None:
            raise
        nodes = [n.name or n.output[0] for n in model.graph.node if n.op_type == op_type]
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise OperatorConversionError(op_type, nodes, f"{type(err).__name__}: {reason}") from err
    finally:
        if printed.getvalue():
            log.debug("TVM importer output:\n%s", printed.getvalue())


def _failed_op(printed: str) -> str | None:
    prefix = "Error converting operator "
    for line in printed.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].split(",", 1)[0].strip()
    return None


def _pipeline(
    tvm_target,
    target: Target,
    coverage: ScheduleCoverage,
    rules: bool = True,
    int8_log: Int8Log | None = None,
    int8_kernels: list[str] | None = None,
    tuning: Any = None,
    say: Callable[[str], None] = log.info,
    dynamic: int8_dynamic.DynamicInt8Report | None = None,
):
    """The Relax pipeline for ``tvm_target`` (see the module docstring for the choice).

    On CPU the integer lowering of QDQ graphs (:mod:`edgecc.lower.int8`, decisions recorded in
    ``int8_log``) runs first, with or without the rules: it is a graph rewrite, not a schedule;
    the fused integer kernels are listed in ``int8_kernels``, in call order.

    CPU: TVM's CPU pipeline split in two around edgecc's schedule rules, which run on the fused
    kernels (:mod:`edgecc.lower.schedules`), with the rules' layout passes before legalization.
    Weight-only int8 matmuls become integer matmuls first (:mod:`edgecc.lower.int8_dynamic`,
    facts in ``dynamic``), and their kernels are named once fused.
    CUDA: TVM's default pipeline (dlight GPU rules). ``rules=False`` leaves the rules (and their
    layout passes) out: TVM's serial default code, the build before the rules existed.
    ``tuning`` (:class:`edgecc.lower.tune.Tuning`) puts the record pass before the rules.
    """
    import tvm
    from tvm import relax

    head = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()]
    if tvm_target.kind.name != "llvm":
        return tvm.transform.Sequential([*head, relax.get_default_pipeline(tvm_target)])
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    params = CpuParams.of(target)
    int8_x86 = [pad_channels_pass(tvm_target), shift_pass(tvm_target)]
    head = [*head, *integer_lowering_passes(int8_log), *int8_x86]
    kernels = record_kernels_pass(int8_kernels if int8_kernels is not None else [])
    dynamic = dynamic or int8_dynamic.DynamicInt8Report()
    head.append(int8_dynamic.rewrite_pass(dynamic))
    if not rules:
        return tvm.transform.Sequential(
            [
                *head,
                *cpu.library_dispatch_passes(tvm_target),
                *cpu.legalize_passes(tvm_target),
                kernels,
                int8_dynamic.locate_pass(dynamic),
                *cpu.dataflow_lower_passes(tvm_target),
                *cpu.finalize_passes(tvm_target),
            ]
        )
    return tvm.transform.Sequential(
        [
            *head,
            *cpu.library_dispatch_passes(tvm_target),
            *schedules.pre_legalize_passes(params),
            *cpu.legalize_passes(tvm_target),
            kernels,
            *_records(tuning, target, params, coverage, say),
            schedules.apply_schedules(params, coverage),
            int8_dynamic.locate_pass(dynamic),
            *schedules.post_schedule_passes(params),
            *cpu.dataflow_lower_passes(tvm_target),
            *cpu.finalize_passes(tvm_target),
        ]
    )


def _records(tuning: Any, target: Target, params: CpuParams, coverage, say) -> list:
    """The tuning-record pass (:mod:`edgecc.lower.tune`) when ``tuning`` is given, else none."""
    if tuning is None:
        return []
    from edgecc.lower.tune import records_pass

    return [records_pass(tuning, target, schedules.rules_for(params), coverage, say)]


def _pipeline_name(tvm_target) -> str:
    kind = tvm_target.kind.name
    if kind == "llvm":
        return "DecomposeOpsForInference + relax cpu pipeline + edgecc CPU schedule rules"
    rules = " + dlight GPU rules" if kind == "cuda" else ""
    return f"DecomposeOpsForInference + relax {kind} default pipeline{rules}"


def _device_compiler(target: Target, nvcc: cuda.Nvcc | None):
    """During the build, route TVM's CUDA compile callback to nvcc (used when a driver exists)."""
    if nvcc is None:
        return contextlib.nullcontext()
    return cuda.nvcc_callback(target.cuda_arch or "")


def _compile_ptx(source: str, target: Target, tvm_target) -> bytes:
    with tvm_target:
        return cuda.compile_ptx(source, target.cuda_arch or "")


def _export(executable, out_path: Path, linker: str, packer: cuda.PtxPacker | None) -> None:
    """Link the executable into ``out_path`` atomically, in a scratch workspace."""
    from tvm.support import cc

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fcompile = cc.cross_compiler(linker)
    tmp_root = Path(tempfile.gettempdir())
    interrupt.remove_stale(tmp_root, r"edgecc-link-(?P<pid>\d+)-.+")  # left by killed compiles
    with (
        tempfile.TemporaryDirectory(prefix=interrupt.pid_prefix("edgecc-link-")) as work,
        interrupt.cleanup_on_abort(Path(work)),
    ):
        tmp = Path(work) / out_path.name
        if packer is None:
            executable.export_library(str(tmp), fcompile=fcompile, workspace_dir=work)
        else:
            executable.mod.export_library(
                str(tmp), fcompile=fcompile, fpack_imports=packer, workspace_dir=work
            )
        staged = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
        shutil.copyfile(tmp, staged)
        os.replace(staged, out_path)


def _cuda_facts(
    target: Target,
    nvcc: cuda.Nvcc | None,
    packer: cuda.PtxPacker | None,
    details: dict[str, Any],
    notes: list[str],
) -> str:
    """Record how the device code was built; return ``cuda_code`` (``ptx`` or ``source``)."""
    details["cuda_arch"] = target.cuda_arch
    if nvcc is None or packer is None:
        notes.append(
            "nvcc was not found: the library carries CUDA source; the board must "
            "compile it at load time (TVM's Python with tvm_callback_cuda_compile and "
            "NVRTC, or nvcc with TVM_CUDA_COMPILE_MODE=nvcc)"
        )
        details["cuda_format"] = "cuda source"
        return "source"
    details.update(
        {
            "nvcc": nvcc.path,
            "nvcc_release": nvcc.release,
            "cuda_modules": packer.formats,
            "ptx_isa": sorted(packer.ptx_isa),
        }
    )
    isa = ", ".join(sorted(packer.ptx_isa)) or "?"
    notes.append(
        f"CUDA kernels are {target.cuda_arch} PTX (ISA {isa}) from nvcc {nvcc.release}; "
        f"the board's driver JIT-compiles them and must support CUDA >= {nvcc.release} "
        f"(a JetPack 6 board has CUDA 12.x: build with a CUDA 12 nvcc for it)"
    )
    return "ptx"
