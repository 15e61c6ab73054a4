"""Rule variants as tuning candidates (edgecc.lower.schedules.variants, edgecc.lower.tune).

The variants' order is deterministic and starts with one-knob changes; every distinct variant
schedule of a conv and of a matmul kernel computes what TVM's unscheduled kernel computes
(random inputs, rtol = atol = 1e-5: the variants change tiling and loop order, not the order of
the sum over the reduction axis within an output, except the conv's channel blocking, which keeps
it too). No timing assertions.
"""

from __future__ import annotations

import dataclasses
import tempfile

import numpy as np
import pytest
from lower_models import fused_kernels, make_model
from onnx import TensorProto, helper, numpy_helper

from edgecc.lower.schedules import CpuParams, rules_for
from edgecc.lower.schedules.variants import KNOBS, knob_values, param_variants
from edgecc.targets import get_target

RTOL = ATOL = 1e-5
AVX2 = CpuParams(lanes=8, cores=2, l1d_bytes=32768, l2_bytes=524288, arch="x86_64")
AVX512 = dataclasses.replace(AVX2, lanes=16)


@pytest.mark.parametrize("params", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_variants_are_distinct_ordered_and_never_the_defaults(params):
    variants = param_variants(params)
    assert params not in variants and len(set(variants)) == len(variants)
    changed = [
        sum(getattr(v, k) != getattr(params, k) for k in KNOBS) for v in variants
    ]  # fmt: skip
    assert changed == sorted(changed) and changed[0] == 1
    assert param_variants(params) == variants  # deterministic
    assert param_variants(params, limit=3) == variants[:3]
    only = param_variants(params, knobs=("rows_outer",))
    assert only == [dataclasses.replace(params, rows_outer=True)]
    expected = 1
    for knob in KNOBS:
        expected *= len(knob_values(params)[knob])
    assert len(variants) == expected - 1  # every combination of the knobs' values


def conv_matmul_model():
    """x[1,16,10,10] -> Conv 3x3 16->24 (pad 1) + bias -> Relu; z[20,32] @ W[32,48] + b."""
    rng = np.random.default_rng(0)

    def const(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
        helper.make_node("MatMul", ["z", "m"], ["p"]),
        helper.make_node("Add", ["p", "mb"], ["q"]),
    ]
    info = helper.make_tensor_value_info
    return make_model(
        nodes,
        [info("x", TensorProto.FLOAT, [1, 16, 10, 10]), info("z", TensorProto.FLOAT, [20, 32])],
        [info("y", TensorProto.FLOAT, [1, 24, 10, 10]), info("q", TensorProto.FLOAT, [20, 48])],
        [const("w", 24, 16, 3, 3), const("b", 24), const("m", 32, 48), const("mb", 48)],
    )


def run_kernel(mod, tvm_target, arrays):
    import tvm

    lib = tvm.compile(mod, target=tvm_target)
    out = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*out)
    return out[-1].numpy()


@pytest.mark.parametrize("rule_name", ["conv2d", "matmul"])
def test_every_variant_schedule_computes_the_kernel(rule_name):
    from edgecc.lower.tune import _rule_variants, _task_module, open_records, tuning_target

    target = get_target("x86")
    tvm_target = tuning_target(target)
    rules = rules_for(CpuParams.of(target))
    rule = next(r for r in rules if r.name == rule_name)
    funcs = [f for f in fused_kernels(conv_matmul_model()).values()]
    with tvm_target:
        func = next(f for f in funcs if rule.apply(f, tvm_target, False) is not None)
    task = _task_module(func)
    with tempfile.TemporaryDirectory() as folder:  # an empty database: no record seen yet
        variants = _rule_variants(open_records(folder), func, task, tvm_target, rules, 4)
    assert len(variants) >= 2  # the knobs give this kernel other schedules than the rule's
    rng = np.random.default_rng(1)
    arrays = [
        rng.standard_normal([int(d) for d in buf.shape]).astype(str(buf.dtype))
        for buf in task["main"].params  # tirx: the params are the buffers
    ]
    expected = run_kernel(task, tvm_target, arrays)
    for sch in variants:
        np.testing.assert_allclose(run_kernel(sch.mod, tvm_target, arrays), expected, RTOL, ATOL)
