"""Calibration loading (npz, .npy folders, random) with its errors, observers and collection."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.errors import UserInputError
from edgecc.passes.calibration import (
    NO_PROGRESS_ENV,
    RANDOM_NOTE,
    HistogramObserver,
    InputSpec,
    MinMaxObserver,
    calibrated_range,
    load_calibration,
    observe,
    progress,
)

SPECS = [InputSpec("x", (None, 3, 4, 4), "float32")]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _batches(data) -> list[dict[str, np.ndarray]]:
    return list(data())


# ------------------------------------------------------------------------------------------
# Loading


def test_npz_batches_cover_every_sample_once(tmp_path):
    x = _rng().normal(size=(20, 3, 4, 4))  # float64 on disk: converted to the input's float32
    np.savez(tmp_path / "c.npz", x=x, labels=np.arange(20))  # extra arrays are ignored
    data, desc = load_calibration(str(tmp_path / "c.npz"), SPECS, batch_size=8)
    batches = _batches(data)
    assert [b["x"].shape[0] for b in batches] == [8, 8, 4]
    assert len(data()) == data.num_batches == 3 and data.num_samples == 20
    assert all(b["x"].dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x.astype(np.float32))
    assert "c.npz" in desc and "20 samples" in desc and "batches of 8" in desc
    assert _batches(data)[0]["x"].tobytes() == batches[0]["x"].tobytes()  # re-iterable


def test_limit_and_model_spec(tmp_path):
    model = _linear_model()
    np.savez(tmp_path / "c.npz", x=_rng().normal(size=(50, 6)).astype(np.float32))
    data, desc = load_calibration(str(tmp_path / "c.npz"), model, batch_size=16, limit=40)
    assert [b["x"].shape for b in data()] == [(16, 6), (16, 6), (8, 6)]
    assert "40 samples" in desc


@pytest.mark.parametrize("specs", [
    {"x": (None, 6)}, {"x": ([None, 6], "float32")}, [InputSpec("x", (None, 6))]])
def test_input_specs_in_any_form(tmp_path, specs):
    np.savez(tmp_path / "c.npz", x=np.zeros((5, 6)))
    data, _ = load_calibration(str(tmp_path / "c.npz"), specs, batch_size=4)
    assert [b["x"].shape for b in data()] == [(4, 6), (1, 6)]


def test_frontend_input_specs():
    """The API passes the frontend's InputSpecs (static shapes: batches of the model's batch)."""
    from edgecc.frontend import InputSpec as FrontendSpec

    data, _ = load_calibration("random", [FrontendSpec("x", (1, 3, 4, 4), "float32")], limit=5)
    assert [b["x"].shape for b in data()] == [(1, 3, 4, 4)] * 5


@pytest.mark.parametrize("layout", ["rows", "per-sample"])
def test_fixed_batch_dim_forces_batches_of_that_size(tmp_path, layout):
    spec = [InputSpec("x", (2, 3), "float32")]
    x = _rng().normal(size=(7, 3)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x if layout == "rows" else x[:6].reshape(3, 2, 3))
    data, _ = load_calibration(str(tmp_path / "c.npz"), spec, batch_size=8)
    shapes = [b["x"].shape for b in data()]
    assert shapes == [(2, 3)] * 3 and data.num_samples == 6  # the 7th row is dropped (warned)


def test_folder_of_named_npy(tmp_path):
    specs = [InputSpec("a", (None, 2), "float32"), InputSpec("b", (None, 5), "int64")]
    np.save(tmp_path / "a.npy", np.ones((6, 2), np.float32))
    np.save(tmp_path / "b.npy", np.arange(30).reshape(6, 5))
    data, desc = load_calibration(str(tmp_path), specs, batch_size=4)
    batches = _batches(data)
    assert [b["a"].shape[0] for b in batches] == [4, 2]
    assert batches[1]["b"].dtype == np.int64 and batches[1]["b"][0, 0] == 20
    assert "named .npy" in desc


def test_folder_of_sample_files_for_a_single_input(tmp_path):
    for i in range(5):  # one sample each, without the batch axis
        np.save(tmp_path / f"s{i:02d}.npy", np.full((3, 4, 4), i, np.float32))
    np.save(tmp_path / "s99.npy", np.full((2, 3, 4, 4), 9, np.float32))  # a stack of two
    data, desc = load_calibration(str(tmp_path), SPECS, batch_size=4)
    firsts = np.concatenate([b["x"][:, 0, 0, 0] for b in data()])
    np.testing.assert_array_equal(firsts, [0, 1, 2, 3, 4, 9, 9])
    assert "6 .npy files" in desc and "7 samples" in desc


def test_random_is_seeded_and_says_so():
    data, desc = load_calibration("random", SPECS, batch_size=8, limit=20, seed=3)
    assert desc.startswith(RANDOM_NOTE)
    first, again = _batches(data), _batches(data)
    assert [b["x"].shape[0] for b in first] == [8, 8, 4]
    np.testing.assert_array_equal(first[2]["x"], again[2]["x"])
    other, _ = load_calibration("random", SPECS, batch_size=8, limit=20, seed=4)
    assert not np.array_equal(_batches(other)[0]["x"], first[0]["x"])
    values = np.concatenate([b["x"] for b in first])
    assert abs(values.mean()) < 0.1 and abs(values.std() - 1) < 0.1  # N(0, 1)
    default, _ = load_calibration("random", SPECS)
    assert default.num_samples == 32


def _write(tmp_path, kind: str) -> str:
    if kind == "missing":
        return str(tmp_path / "nope.npz")
    if kind == "names":
        np.savez(tmp_path / "c.npz", input=np.zeros((4, 3, 4, 4), np.float32))
    elif kind == "shape":
        np.savez(tmp_path / "c.npz", x=np.zeros((4, 3, 5, 5), np.float32))
    elif kind == "dtype":
        np.savez(tmp_path / "c.npz", x=np.zeros((4, 3, 4, 4), np.complex64))
    elif kind == "corrupt":
        (tmp_path / "c.npz").write_bytes(b"not a zip file")
    elif kind == "suffix":
        (tmp_path / "c.txt").write_text("1 2 3")
        return str(tmp_path / "c.txt")
    elif kind == "empty-dir":
        (tmp_path / "d").mkdir()
        return str(tmp_path / "d")
    return str(tmp_path / "c.npz")


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "calibration data '.*nope.npz' not found: "
                + re.escape("pass --calib data.npz|dir|random")),
    ("names", r"has arrays \[input\] but the model inputs are \[x\]: missing x"),
    ("shape", r"has shape \(4, 3, 5, 5\); model input x:\?x3x4x4:float32 "
              r"needs \(samples, 3, 4, 4\)"),
    ("dtype", "is complex64; model input .* cannot take it"),
    ("corrupt", "cannot read calibration data"),
    ("suffix", "expected a .npz file, a folder of .npy files or 'random'"),
    ("empty-dir", "has no .npy files"),
])
def test_bad_calibration_data_is_a_user_error(tmp_path, kind, message):
    with pytest.raises(UserInputError, match=message):
        load_calibration(_write(tmp_path, kind), SPECS)


def test_random_needs_float_inputs_of_static_shape():
    with pytest.raises(UserInputError, match="only generated for float inputs"):
        load_calibration("random", [InputSpec("ids", (1, 8), "int64")])
    with pytest.raises(UserInputError, match="has dynamic dims"):
        load_calibration("random", [InputSpec("x", (1, None), "float32")])


def test_too_few_samples_for_a_fixed_batch(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 5), np.float32))
    with pytest.raises(UserInputError, match="has 3 samples; the model's fixed batch size needs"):
        load_calibration(str(tmp_path / "c.npz"), [InputSpec("x", (4, 5))])


# ------------------------------------------------------------------------------------------
# Observers


def test_minmax_observer_streams():
    obs = MinMaxObserver()
    assert obs.range() == (0.0, 0.0)
    for chunk in np.array_split(np.arange(-5.0, 12.0), 4):
        obs.update(chunk)
    assert obs.range() == (-5.0, 11.0) and obs.count == 17


def test_histogram_growth_is_exact():
    """Merging bins by powers of two gives the histogram one would build at the final edge."""
    rng = _rng(1)
    chunks = [rng.uniform(-1, 1, 1000), rng.normal(0, 3, 1000), rng.uniform(-9, 9, 1000)]
    obs = HistogramObserver(bins=256)
    for c in chunks:
        obs.update(c.astype(np.float32))
    assert obs.edge >= 9 * 0.9 and obs.edge < 2 * np.abs(np.concatenate(chunks)).max()
    a = np.abs(np.concatenate(chunks)).astype(np.float32)
    direct = np.bincount(np.minimum((a * (256 / obs.edge)).astype(np.int64), 255), minlength=256)
    assert np.abs(obs.hist - direct).sum() <= 4  # float rounding at bin boundaries only
    assert obs.hist.sum() == 3000


def test_percentile_threshold_within_one_bin():
    x = _rng(2).normal(size=100_000).astype(np.float32)
    obs = HistogramObserver(bins=2048)
    for c in np.array_split(x, 10):
        obs.update(c)
    expected = np.percentile(np.abs(x), 99.0)
    assert abs(obs.percentile_threshold(99.0) - expected) <= obs.bin_width
    lo, hi = calibrated_range(obs, "percentile", 99.0)
    assert lo == pytest.approx(-hi) and hi == pytest.approx(obs.percentile_threshold(99.0))


def test_entropy_clips_outliers_and_keeps_uniform_ranges():
    rng = _rng(3)
    gauss = np.concatenate([rng.normal(size=200_000), [60.0, -55.0]]).astype(np.float32)
    obs = HistogramObserver()
    obs.update(gauss)
    t = obs.entropy_threshold()
    assert 2.0 < t < 10.0  # clips the two outliers, keeps the Gaussian's bulk
    uniform = HistogramObserver()
    uniform.update(rng.uniform(-4, 4, 200_000).astype(np.float32))
    assert uniform.entropy_threshold() >= 0.97 * 4  # nothing to gain by clipping


@pytest.mark.parametrize("levels", [128, 256])
def test_entropy_is_not_dragged_down_by_relu_zeros(levels):
    """Half the values of a ReLU output are exact zeros; counted as they are, that bin dominates
    P and the threshold falls to ~1.8 here. With bin 0 = bin 1 it stays near the tail."""
    obs = HistogramObserver()
    obs.update(np.maximum(_rng(5).normal(size=200_000), 0).astype(np.float32))
    assert 3.0 < obs.entropy_threshold(levels) <= obs.max


def test_ranges_of_a_post_relu_tensor_start_at_zero():
    obs = HistogramObserver()
    obs.update(np.maximum(_rng(4).normal(size=10_000), 0).astype(np.float32))
    for method in ("minmax", "percentile", "entropy"):
        lo, hi = calibrated_range(obs, method)
        assert lo == 0.0 and 0 < hi <= obs.max


# ------------------------------------------------------------------------------------------
# Collection


def _linear_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(_rng(5).normal(size=(6, 4)).astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Relu", ["h"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_observe_collects_inputs_and_intermediates_batch_by_batch(monkeypatch):
    monkeypatch.setenv(NO_PROGRESS_ENV, "1")
    model = _linear_model()
    w = numpy_helper.to_array(model.graph.initializer[0])
    xs = [_rng(i).normal(size=(n, 6)).astype(np.float32) for i, n in enumerate((5, 5, 3))]
    seen = observe(model, ["x", "h", "y"], [{"x": x} for x in xs], MinMaxObserver)
    assert (seen.samples, seen.batches) == (13, 3)
    x = np.concatenate(xs)
    h = x @ w
    assert seen.observers["x"].range() == (x.min(), x.max())
    np.testing.assert_allclose(seen.observers["h"].range(), (h.min(), h.max()), rtol=1e-5)
    assert seen.observers["y"].range()[0] == 0.0
    assert len(model.graph.output) == 1  # the caller's model is untouched


def test_observe_reports_bad_batches():
    with pytest.raises(UserInputError, match="calibration data gave no batches"):
        observe(_linear_model(), ["h"], [], MinMaxObserver)
    with pytest.raises(UserInputError, match="lacks model inputs: x"):
        observe(_linear_model(), ["h"], [{"z": np.zeros((1, 6), np.float32)}], MinMaxObserver)
    with pytest.raises(UserInputError, match="calibration batch 1 does not run"):
        observe(_linear_model(), ["h"], [{"x": np.zeros((1, 7), np.float32)}], MinMaxObserver)


def test_progress_bar_is_off_when_asked(monkeypatch):
    monkeypatch.setenv(NO_PROGRESS_ENV, "1")
    assert progress(range(3), "x").disable
    monkeypatch.delenv(NO_PROGRESS_ENV)
    assert progress(range(3), "x").disable  # pytest captures stderr: not a tty
