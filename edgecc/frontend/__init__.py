"""Frontend: load a model (torch or ONNX), export it to ONNX, record a reference output.

Entry point: :func:`load_model`, returning a :class:`LoadedModel`. Input shapes are described by
:class:`InputSpec` (text form ``name:1x3x224x224[:dtype]``, see :func:`parse_input_spec`).
"""

from edgecc.frontend.loader import LoadedModel, load_model
from edgecc.frontend.probe import make_probe_inputs
from edgecc.frontend.specs import InputSpec, parse_input_spec

__all__ = ["InputSpec", "LoadedModel", "load_model", "make_probe_inputs", "parse_input_spec"]
