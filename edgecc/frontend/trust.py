"""What loading a torch file would run, checked before anything from the file runs.

Both torch zip formats are read by torch through ``torch._C.PyTorchFileReader`` (miniz). With
two entries of one name (miniz compares names case-insensitively) which copy it returns depends
on where the names sort, while Python's ``zipfile`` returns the last: a check through
``zipfile`` can approve bytes torch never reads. So archives with duplicate names (ignoring case)
or more than one root folder are refused, and every record is checked as
``PyTorchFileReader.get_record`` returns it, i.e. exactly the bytes torch will load.

``.pt2`` (``torch.export.save``) archives, torch 2.13: torch unpickles with ``weights_only=False``
(arbitrary code) weights and constants flagged ``use_pickle``, opaque and custom objects, and
sample inputs or legacy weight files that fail a ``weights_only`` load; it ``exec``s the
``guards_code`` strings of each model; it resolves node targets by ``getattr`` from the ``torch``
module (``torch.os.system`` is a valid target); it ``dlopen``s AOTInductor libraries. Without
trust, an archive passes only when: every entry is one the layout documents (AOTInductor,
ExecuTorch and other compiled payloads are refused); every payload is a raw tensor; every ``.pt``
record loads with ``weights_only=True``; guards are comparisons of input sizes; node targets are
``torch.ops`` operators (or ``_operator``/``math`` functions) outside :data:`DENIED_OPS`. During
the load itself :func:`no_unsafe_unpickling` turns any ``weights_only=False`` request into a
``weights_only=True`` one, so a fallback inside torch cannot unpickle code either.

TorchScript archives are code: ``code/**/*.py`` is compiled at load time and its
``__setstate__`` methods run then, ``forward`` runs on the trace. Every identifier and string in
that code is compared with :data:`DENIED_OPS` (file, storage-from-file, save/load, debug loads)
and :data:`DENIED_NAMESPACES` (distributed/network ops, profiler); a hit is refused unless the
user trusts the file. This is a deny-list on tokens: it cannot prove code harmless (an operator
added to torch later is not on it), it only refuses the known ways to reach files and networks.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import tokenize
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# aten/prim operators (TorchScript builtins) that touch files, and names that reach them.
DENIED_OPS = frozenset(
    {
        "from_file",  # aten::from_file(filename, shared=True) creates and writes a file
        "save",  # aten::save(t, filename)
        "load",
        "load_tensor",  # debugprims::load_tensor
        "_load_for_mobile",
        "load_library",
        "_save_for_mobile",
        "_save_parameters",
        "_new_shared_filename",
        "_share_filename_",
        "_share_filename_cpu_",
        "_new_using_filename_cpu",
        "system",
        "popen",
        "open",
    }
)
# Operator namespaces (torch.ops.<ns>) that talk to other processes or machines.
DENIED_NAMESPACES = frozenset(
    {
        "c10d",
        "_c10d_functional",
        "_c10d_functional_autograd",
        "c10d_functional",
        "_dtensor",
        "symm_mem",
        "distributed",
        "rpc",
        "dist_autograd",
        "_dist_autograd",
        "profiler",
        "debugprims",
    }
)

# torch.export.save layout (relative to the root folder); anything else is refused untrusted.
_PT2_ENTRY = re.compile(
    r"(archive_format|archive_version|byteorder|version|\.data/version|\.data/serialization_id"
    r"|models/[^/]+\.json|data/weights/[^/]+|data/constants/[^/]+|data/sample_inputs/[^/]+\.pt"
    r"|extra/.+)"
)
# The pre-2.7 layout torch still reads (entries at the top level, read through zipfile).
_PT2_LEGACY_ENTRY = re.compile(
    r"(version|byteorder|serialized_exported_program\.json|serialized_(state_dict|constants)"
    r"\.(json|pt)|serialized_example_inputs\.pt|extra_files/.+)"
)
_SAFE_TARGET = re.compile(r"(torch\.ops\.(\w+)\.(\w+)(\.\w+)?|_operator\.\w+|math\.\w+)")
_GUARD_NODES = (
    ast.Expression,
    ast.Compare,
    ast.BoolOp,
    ast.BinOp,
    ast.UnaryOp,
    ast.Load,
    ast.boolop,
    ast.operator,
    ast.unaryop,
    ast.cmpop,
)


def zip_entries(path: Path) -> list[str]:
    """The archive's entry names, refusing layouts where readers could disagree.

    Returns:
        Entry names without the root folder (as ``PyTorchFileReader`` names them), or the
        plain names for a rootless (legacy) archive.

    Raises:
        ValueError: duplicate names (ignoring case), several root folders, unsafe paths.
    """
    with zipfile.ZipFile(path) as zf:
        names = [i.filename for i in zf.infolist()]
    seen: dict[str, str] = {}
    for name in names:
        key = name.lower()
        if key in seen:
            raise ValueError(f"two entries named {name!r}")
        seen[key] = name
        if name.startswith("/") or "\\" in name or ".." in name.split("/"):
            raise ValueError(f"unsafe entry name {name!r}")
    roots = {n.split("/", 1)[0] for n in names if "/" in n}
    if all("/" in n for n in names) and len(roots) == 1:
        return [n.split("/", 1)[1] for n in names]
    if len(roots) > 1 and all("/" in n for n in names):
        raise ValueError(f"entries under several root folders ({', '.join(sorted(roots)[:3])})")
    return names


def _rooted(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        return all("/" in n for n in zf.namelist())


def _records(path: Path) -> Any:
    import torch

    return torch._C.PyTorchFileReader(str(path))


def pt2_problem(path: Path) -> str:
    """Why loading the ``.pt2`` archive could run code from it ('' when it could not)."""
    try:
        names = zip_entries(path)
    except ValueError as err:
        return str(err)
    if _rooted(path):
        unexpected = [n for n in names if not _PT2_ENTRY.fullmatch(n)]
        if unexpected:
            return f"unexpected entry {unexpected[0]!r} (compiled code or an unknown layout)"
        reader = _records(path)
        read = reader.get_record
    else:
        unexpected = [n for n in names if not _PT2_LEGACY_ENTRY.fullmatch(n)]
        if unexpected:
            return f"unexpected entry {unexpected[0]!r} (compiled code or an unknown layout)"
        read = _ZipReader(path).read
    for name in names:
        if name.endswith("_config.json") and name.startswith("data/"):
            config = json.loads(read(name)).get("config", {})
            for fqn, meta in config.items():
                if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(
                    ("weight_", "tensor_")
                ):
                    return f"pickled member {fqn!r}"
        elif name.endswith(".pt"):
            if not _loads_weights_only(read(name)):
                return f"pickled objects in {name}"
        elif name.endswith(".json") and (name.startswith("models/") or "exported" in name):
            problem = _program_problem(json.loads(read(name)))
            if problem:
                return problem
    return ""


class _ZipReader:
    """Reads entries as torch's pre-2.7 path does (through zipfile; names are unique)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, name: str) -> bytes:
        with zipfile.ZipFile(self.path) as zf:
            return zf.read(name)


def _loads_weights_only(data: bytes) -> bool:
    import torch

    from edgecc.frontend.torch_export import quiet

    try:
        with quiet():
            torch.load(io.BytesIO(data), weights_only=True)
    except Exception:
        return False
    return True


def _program_problem(program: dict[str, Any]) -> str:
    """A serialized ExportedProgram's guards and node targets, checked."""
    for guard in program.get("guards_code") or []:
        if not _simple_guard(str(guard)):
            return f"guard code {str(guard)[:60]!r} (Python code torch would execute)"
    for target in _targets(program.get("graph_module", {})):
        match = _SAFE_TARGET.fullmatch(target)
        if not match:
            return f"graph node target {target!r} (not a torch operator)"
        if match.group(2) in DENIED_NAMESPACES or match.group(3) in DENIED_OPS:
            return f"operator {target} (reads or writes files, or talks to other processes)"
    return ""


def _targets(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, sub in value.items():
            if key == "target" and isinstance(sub, str):
                yield sub
            else:
                yield from _targets(sub)
    elif isinstance(value, list):
        for sub in value:
            yield from _targets(sub)


def _simple_guard(code: str) -> bool:
    """True for a comparison of input sizes, e.g. ``L['x'].size()[0] == L['y'].size()[0]``."""
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if isinstance(node, _GUARD_NODES):
            continue
        if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            continue
        if isinstance(node, ast.Name) and node.id == "L":
            continue
        if isinstance(node, ast.Subscript):
            continue  # L['x'], .size()[0]: the key and the value are walked as nodes too
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r"\w+", node.value):
                continue  # an input name: no quote or newline can leave the generated string
            return False
        if isinstance(node, ast.Attribute) and node.attr in ("size", "stride"):
            continue
        if (
            isinstance(node, ast.Call)
            and not node.args
            and not node.keywords
            and isinstance(node.func, ast.Attribute)
        ):
            continue  # its func is an Attribute, checked as a node
        return False
    return True


def torchscript_problem(path: Path) -> str:
    """The first denied operator the TorchScript archive's code uses ('' when none)."""
    try:
        names = zip_entries(path)
    except ValueError as err:
        return str(err)
    reader = _records(path)
    for name in names:
        if not (name.startswith("code/") and name.endswith(".py")):
            continue
        source = bytes(reader.get_record(name)).decode("utf-8", errors="replace")
        hit = denied_token(source)
        if hit:
            token, line = hit
            return f"its code calls {token} ({name} line {line})"
    return ""


def denied_token(source: str) -> tuple[str, int] | None:
    """The first identifier or string in ``source`` naming a denied operator, with its line."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return ("unparsable code", 1)
    for i, tok in enumerate(tokens):
        word = tok.string
        if tok.type == tokenize.STRING:
            try:
                word = str(ast.literal_eval(tok.string))
            except (ValueError, SyntaxError):
                continue
        elif tok.type != tokenize.NAME:
            continue
        if word in DENIED_OPS or word in DENIED_NAMESPACES:
            parts, j = [word], i
            while j >= 2 and tokens[j - 1].string == "." and tokens[j - 2].type == tokenize.NAME:
                parts.insert(0, tokens[j - 2].string)  # torch.ops.aten.from_file, not from_file
                j -= 2
            return (".".join(parts), tok.start[0])
    return None


@contextlib.contextmanager
def no_unsafe_unpickling() -> Iterator[None]:
    """Within the block, ``torch.load`` always runs with ``weights_only=True``."""
    import torch

    original = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = weights_only_load
    try:
        yield
    finally:
        torch.load = original
