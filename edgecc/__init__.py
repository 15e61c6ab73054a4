"""edgecc: compile PyTorch and ONNX models for edge devices through graph passes and Apache TVM.

The Python API::

    import edgecc
    pkg = edgecc.compile("model.pt", target="rpi4", input_shapes=["x:1x3x224x224"], out="build/m")
    outputs = edgecc.load("build/m").run({"x": x})
    edgecc.evaluate("build/m", "test.npz")["top1"]
"""

__version__ = "0.1.0"

from typing import Any

__all__ = ["Package", "__version__", "compile", "evaluate", "load", "report", "sensitivity"]

_LAZY = {
    "compile": "edgecc.api",
    "load": "edgecc.api",
    "Package": "edgecc.package",
    "evaluate": "edgecc.evaluation.core",
    "sensitivity": "edgecc.evaluation.sensitivity",
}


def __getattr__(name: str) -> Any:
    """Import the API on first use: ``import edgecc`` (and so the CLI's start, when a Ctrl-C
    must already be handled) stays fast; onnx and numpy load with the first call."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "report":  # the callable module edgecc.report (edgecc.report(packages, out))
        import importlib

        return importlib.import_module("edgecc.report")
    raise AttributeError(f"module 'edgecc' has no attribute {name!r}")
