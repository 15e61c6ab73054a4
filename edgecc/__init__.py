"""edgecc: compile PyTorch and ONNX models for edge devices through graph passes and Apache TVM.

The Python API::

    import edgecc
    pkg = edgecc.compile("model.pt", target="rpi4", input_shapes=["x:1x3x224x224"], out="build/m")
    outputs = edgecc.load("build/m").run({"x": x})
"""

__version__ = "0.1.0"

from edgecc.api import compile, load  # noqa: E402, A004
from edgecc.package import Package  # noqa: E402

__all__ = ["Package", "__version__", "compile", "load"]
