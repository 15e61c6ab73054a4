"""The schedule-rule switch: ``lower(schedules=False)`` and ``EDGECC_SCHEDULES=off`` build the
old default (no rule pass in the pipeline), for before/after comparisons in one run."""

from __future__ import annotations

import numpy as np
import pytest

from edgecc.lower import build
from edgecc.targets import get_target
from tests.runtime.test_runtime import add_model

FEEDS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 10, 100], np.float32)}


@pytest.fixture
def rule_calls(monkeypatch) -> list[str]:
    """Records each time the lowering asks for the rule pass (then runs the real one)."""
    calls: list[str] = []
    real = build.schedules.apply_schedules

    def spy(params, coverage):
        calls.append(params.arch)
        return real(params, coverage)

    monkeypatch.setattr(build.schedules, "apply_schedules", spy)
    return calls


def _lower(tmp_path, **kwargs):
    return build.lower(
        add_model(),
        get_target("x86"),
        {"a": (2, 3), "b": (3,)},
        {"a": "float32", "b": "float32"},
        tmp_path / "add.so",
        **kwargs,
    )


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, True),
        ("on", True),
        ("off", False),
        ("OFF", False),
        ("0", False),
        ("no", False),
    ],
)
def test_environment_variable(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("EDGECC_SCHEDULES", raising=False)
    else:
        monkeypatch.setenv("EDGECC_SCHEDULES", value)
    assert build.schedules_enabled() is expected
    assert build.schedules_enabled(True) is True and build.schedules_enabled(False) is False


def test_off_leaves_the_rules_out_and_still_computes(tmp_path, rule_calls, monkeypatch):
    from edgecc.runtime import run_library

    monkeypatch.delenv("EDGECC_SCHEDULES", raising=False)
    lib = _lower(tmp_path, schedules=False)
    assert rule_calls == [] and lib.details["schedule_rules"] == "off"
    assert lib.details["schedules"]["kernels"] == {}
    out = run_library(lib.path, get_target("x86"), FEEDS, ["y"])
    np.testing.assert_array_equal(out["y"], FEEDS["a"] + 2 * FEEDS["b"])  # exact: add, multiply


def test_default_applies_the_rules_and_env_turns_them_off(tmp_path, rule_calls, monkeypatch):
    monkeypatch.delenv("EDGECC_SCHEDULES", raising=False)
    assert _lower(tmp_path).details["schedule_rules"] == "on" and rule_calls == ["x86_64"]
    monkeypatch.setenv("EDGECC_SCHEDULES", "off")
    assert _lower(tmp_path).details["schedule_rules"] == "off" and rule_calls == ["x86_64"]
    assert _lower(tmp_path, schedules=True).details["schedule_rules"] == "on"
    assert rule_calls == ["x86_64", "x86_64"]
