"""report --bench times an x86 package that has no bench.json and saves it there (manifest and
library untouched); later reports use it. One tiny real package compiled for x86."""

from __future__ import annotations

import json

import onnx

import edgecc
from edgecc.package import sha256_file
from edgecc.report.variants import BENCH_FILE
from tests.report.fake_packages import tiny_onnx


def test_report_bench_times_saves_and_reuses(tmp_path):
    onnx.save(tiny_onnx(), str(tmp_path / "m.onnx"))
    package = edgecc.compile(tmp_path / "m.onnx", "x86", out=tmp_path / "pkg", passes="").path
    before = {p.name: sha256_file(p) for p in package.iterdir()}
    assert edgecc.report([package], tmp_path / "a.html")["variants"][0]["latency"] is None
    data = edgecc.report([package], tmp_path / "b.html", bench=True)
    latency = data["variants"][0]["latency"]
    assert latency["kind"] == "ratio" and latency["ratio"] > 0 and latency["edgecc_ms"] > 0
    saved = json.loads((package / BENCH_FILE).read_text())
    assert saved["ratio"] == latency["ratio"]
    assert saved["library_sha256"] == edgecc.load(package).manifest["library"]["sha256"]
    after = {p.name: sha256_file(p) for p in package.iterdir() if p.name != BENCH_FILE}
    assert after == before  # manifest, model.so and the rest untouched
    edgecc.load(package).verify_library()
    again = edgecc.report([package], tmp_path / "c.html")  # no --bench: bench.json is used
    assert again["variants"][0]["latency"] == latency
    assert f"{latency['ratio']:.2f}x ONNX Runtime" in (tmp_path / "c.html").read_text()
