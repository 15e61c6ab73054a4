"""Lowering: ONNX -> TVM Relax -> target pipeline -> a shared library for the device.

The only package of edgecc that imports TVM; it does so inside functions, so ``import edgecc``
stays fast. Entry points:

* :func:`check_coverage`: fail early on operators TVM's ONNX importer cannot convert;
* :func:`lower`: compile and export the library, returning a :class:`LoweredLibrary`.
"""

from edgecc.lower.build import LoweredLibrary, check_toolchain, lower
from edgecc.lower.coverage import OperatorConversionError, check_coverage

__all__ = [
    "LoweredLibrary",
    "OperatorConversionError",
    "check_coverage",
    "check_toolchain",
    "lower",
]
