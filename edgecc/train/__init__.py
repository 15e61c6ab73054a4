"""Training support shared by the training-based passes (``distill``, gradual pruning).

:mod:`edgecc.train.bridge` makes an ONNX graph a trainable torch module and writes the weights
back; :mod:`edgecc.train.loop` is the one distillation loop every pass uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgecc.errors import UserInputError


def load_train_data(
    data: str | Path | Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], str]:
    """Training arrays (``--train DATA.npz`` or arrays by name) and a description of them."""
    if isinstance(data, Mapping):
        arrays = {k: np.asarray(v) for k, v in data.items()}
        source = "arrays given through the API"
    else:
        path = Path(data)
        if path.suffix != ".npz":
            raise UserInputError(f"--train {path}: expected an .npz file (arrays by input name)")
        from edgecc.package import read_arrays

        arrays, source = read_arrays(path), str(path)
    if not arrays:
        raise UserInputError("the training data holds no arrays")
    count = len(next(iter(arrays.values())))
    return arrays, f"{source} ({count} samples{', labelled' if 'labels' in arrays else ''})"
