"""Tell model file formats apart without running any code from the file.

torch 2.13 writes three zip layouts under one top folder ``<archive>/``:

* ``torch.jit.save``: ``constants.pkl`` and ``code/`` (TorchScript source) beside ``data.pkl``;
* ``torch.export.save``: ``archive_format`` (containing ``pt2``), ``models/*.json``,
  ``data/weights/``; older archives have ``serialized_exported_program.json``;
* ``torch.save``: ``data.pkl`` and ``data/<n>`` only (a pickle: state_dict or a whole module).

The legacy non-zip ``torch.save`` format is a raw pickle stream starting with ``\\x80`` and a
protocol number. Anything else is tried as ONNX (a protobuf, which has no magic number).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from edgecc.errors import UserInputError

ONNX, TORCHSCRIPT, EXPORT, PICKLE = "onnx", "torchscript", "export", "pickle"


def detect_format(path: Path) -> str:
    """The format of the model file at ``path``: ``onnx``, ``torchscript``, ``export``, ``pickle``.

    Only the zip directory and the first bytes are read. A file that is none of the torch formats
    is reported as ``onnx``; the ONNX loader then says whether it really is one.

    Raises:
        UserInputError: missing file, a directory, or a zip archive of an unknown layout.
    """
    if not path.exists():
        raise UserInputError(f"model file {path} does not exist")
    if path.is_dir():
        raise UserInputError(f"{path} is a directory; pass a model file (.pt, .pt2, .onnx)")
    if path.suffix.lower() == ".onnx":
        return ONNX
    with path.open("rb") as fh:
        head = fh.read(2)
    if zipfile.is_zipfile(path):
        return _zip_format(path)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return PICKLE
    return ONNX


def _zip_format(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise UserInputError(f"cannot read {path}: corrupt zip archive ({err})") from err
    inner = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "archive_format" in inner or any(
        n.endswith("serialized_exported_program.json") for n in inner
    ):
        return EXPORT
    if "constants.pkl" in inner or any(n.startswith("code/") for n in inner):
        return TORCHSCRIPT
    if "data.pkl" in inner:
        return PICKLE
    raise UserInputError(
        f"{path} is a zip archive but not a TorchScript, torch.export (.pt2) or torch.save file"
    )
