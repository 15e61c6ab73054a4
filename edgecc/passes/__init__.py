"""Graph passes: ONNX -> ONNX, one per file, registered by name.

Importing this package registers every built-in pass with :func:`edgecc.passes.manager.register`.
"""

from edgecc.passes.manager import (
    PassContext,
    PassManager,
    PassResult,
    PassSpec,
    format_pipeline,
    parse_pipeline,
    register,
    registered_passes,
)

__all__ = [
    "PassContext",
    "PassManager",
    "PassResult",
    "PassSpec",
    "format_pipeline",
    "parse_pipeline",
    "register",
    "registered_passes",
]

# Built-in passes register themselves on import. Each module below is one pass.
import importlib as _importlib
import pkgutil as _pkgutil

_SUPPORT = {"manager", "dump", "graph", "calibration", "channel_groups", "gradual"}
for _mod in _pkgutil.iter_modules(__path__):
    if _mod.name not in _SUPPORT and not _mod.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_mod.name}")
