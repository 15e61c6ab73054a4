"""Seeded mutants of small ONNX models through the CLI's ``main`` in this process.

Each mutant changes dims, dtypes, attributes, node inputs, initializers or graph inputs of one of
a few small models. Whatever the mutant, the CLI must: never exit 1 (internal error), never print
a traceback, print exactly one line on stderr when it fails (``-q``: no progress lines; checked
at the file-descriptor level, so ONNX Runtime's and TVM's own C++ logging count too), and leave
nothing at the output path (nor a staging folder beside it) unless it succeeded.

Time bound: the first :data:`REAL_BUILDS` mutants that reach TVM are built and linked for real;
after that ``lower`` runs its real first half only (operator coverage and TVM's ONNX import,
where odd models fail) and writes a placeholder library, so a few hundred mutants take well
under a minute.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecc.lower
from edgecc.cli import main
from edgecc.errors import EXIT_INTERNAL
from edgecc.lower.build import LoweredLibrary, import_relax

MUTANTS = 300
REAL_BUILDS = 6
F = TensorProto.FLOAT


def _init(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def base_models() -> list[onnx.ModelProto]:
    rng = np.random.default_rng(0)

    def model(nodes, inputs, outputs, inits):
        g = helper.make_graph(nodes, "g", inputs, outputs, inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 9
        return m

    conv = model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], group=1),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", F, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", F, [1, 4, 6, 6])],
        [_init(rng, "w", (4, 4, 3, 3)), _init(rng, "b", (4,))],
    )
    gemm = model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, alpha=1.0)],
        [helper.make_tensor_value_info("x", F, [2, 5])],
        [helper.make_tensor_value_info("y", F, [2, 3])],
        [_init(rng, "w", (3, 5)), _init(rng, "b", (3,))],
    )
    matmul = model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["a"]),
            helper.make_node("Softmax", ["a"], ["y"], axis=-1),
        ],
        [helper.make_tensor_value_info("x", F, [3, 4])],
        [helper.make_tensor_value_info("y", F, [3, 6])],
        [_init(rng, "w", (4, 6)), _init(rng, "b", (6,))],
    )
    pool = model(
        [
            helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Reshape", ["p", "s"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", F, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", F, [1, 8])],
        [numpy_helper.from_array(np.array([1, 8], np.int64), "s")],
    )
    return [conv, gemm, matmul, pool]


DTYPES = [TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT32]


def _mutate_once(m: onnx.ModelProto, rng: np.random.Generator) -> None:
    g = m.graph
    kind = rng.integers(10)
    if kind == 0 and g.initializer:  # an initializer's dims (values follow the new shape)
        t = g.initializer[rng.integers(len(g.initializer))]
        arr = numpy_helper.to_array(t)
        dims = list(arr.shape) or [1]
        i = rng.integers(len(dims))
        dims[i] = int(max(0, dims[i] + rng.choice([-1, 1, 2, -dims[i]])))
        t.CopyFrom(numpy_helper.from_array(np.resize(arr, dims).astype(arr.dtype), t.name))
    elif kind == 1 and g.initializer:  # an initializer's dtype
        t = g.initializer[rng.integers(len(g.initializer))]
        dtype = helper.tensor_dtype_to_np_dtype(int(rng.choice(DTYPES)))
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    elif kind == 2:  # a graph input's dims
        dims = g.input[0].type.tensor_type.shape.dim
        d = dims[rng.integers(len(dims))]
        d.dim_value = int(max(0, d.dim_value + rng.choice([-1, 1, -d.dim_value])))
    elif kind == 3:  # a graph input's or output's dtype
        vi = g.input[0] if rng.random() < 0.5 else g.output[0]
        vi.type.tensor_type.elem_type = int(rng.choice(DTYPES))
    elif kind == 4:  # an attribute's value
        nodes = [n for n in g.node if n.attribute]
        if nodes:
            a = nodes[rng.integers(len(nodes))].attribute
            attr = a[rng.integers(len(a))]
            if attr.type == onnx.AttributeProto.INT:
                attr.i = int(rng.choice([0, 2, 3, -1, attr.i + 1]))
            elif attr.type == onnx.AttributeProto.INTS and attr.ints:
                attr.ints[rng.integers(len(attr.ints))] = int(rng.choice([0, 3, -1, 5]))
            elif attr.type == onnx.AttributeProto.FLOAT:
                attr.f = float(rng.choice([0.0, -1.0, np.inf, np.nan]))
    elif kind == 5:  # drop a node input
        n = g.node[rng.integers(len(g.node))]
        if n.input:
            del n.input[rng.integers(len(n.input))]
    elif kind == 6 and g.initializer:  # drop an initializer
        del g.initializer[rng.integers(len(g.initializer))]
    elif kind == 7:  # an unknown or extra attribute
        n = g.node[rng.integers(len(g.node))]
        n.attribute.append(helper.make_attribute(str(rng.choice(["group", "axis", "bogus"])), 7))
    elif kind == 8:  # a node reads a value nobody produces
        n = g.node[rng.integers(len(g.node))]
        if n.input:
            n.input[rng.integers(len(n.input))] = "nowhere"
    else:  # the opset
        m.opset_import[0].version = int(rng.choice([7, 11, 13, 21, 99]))


def mutants(count: int, seed: int = 1234) -> list[onnx.ModelProto]:
    rng = np.random.default_rng(seed)
    bases = base_models()
    out = []
    for _ in range(count):
        m = copy.deepcopy(bases[rng.integers(len(bases))])
        for _ in range(1 + rng.integers(2)):
            _mutate_once(m, rng)
        out.append(m)
    return out


@pytest.fixture
def bounded_lower(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """``lower`` for real for the first builds, then its import half and a placeholder file."""
    real = edgecc.lower.lower
    counts = {"real": 0, "import_only": 0}

    def lower(model, target, shapes, dtypes, out_path, progress=None, **options):
        if counts["real"] < REAL_BUILDS:
            counts["real"] += 1
            return real(model, target, shapes, dtypes, out_path, progress=progress, **options)
        import_relax(model, shapes, dtypes, progress or (lambda line: None))
        counts["import_only"] += 1
        Path(out_path).write_bytes(b"placeholder: TVM build skipped by the fuzz test")
        return LoweredLibrary(path=Path(out_path), cuda_code=None)

    monkeypatch.setattr(edgecc.lower, "lower", lower)
    return counts


def test_mutants_give_one_line_and_a_user_exit_code(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], bounded_lower: dict[str, int]
) -> None:
    codes: dict[int, int] = {}
    for i, m in enumerate(mutants(MUTANTS)):
        src = tmp_path / f"m{i}.onnx"
        src.write_bytes(m.SerializeToString())
        out = tmp_path / "out" / f"pkg{i}"
        code = main(["-q", "compile", str(src), "-o", str(out)])
        err = capfd.readouterr().err
        codes[code] = codes.get(code, 0) + 1
        where = f"mutant {i}: exit {code}: {err!r}"
        assert code != EXIT_INTERNAL, where
        assert "Traceback" not in err, where
        if code == 0:
            assert (out / "manifest.json").is_file(), where
        else:
            assert len(err.strip().splitlines()) == 1 and err.startswith("edgecc: error:"), where
            assert not out.exists(), where
        if (tmp_path / "out").exists():
            assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")], where
    assert sum(codes.values()) == MUTANTS
    assert codes.get(0, 0) > 0 and sum(v for k, v in codes.items() if k != 0) > MUTANTS // 2, codes
    assert bounded_lower["real"] > 0
