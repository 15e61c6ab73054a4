"""edgecc report: the data gathered from packages, the page's content, safety and writing.

Packages are written by hand (tests/report/fake_packages.py) with the manifest entries other
commands add; the browser tests are in test_report_browser.py.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from edgecc.cli import main
from edgecc.errors import UserInputError
from edgecc.package import Package, sha256_file
from edgecc.report import write_report
from edgecc.report.variants import BENCH_FILE, collect, save_bench
from tests.report.fake_packages import bench_result, make_package, sensitivity_result

EVIL = "<script>console.error('pwned')</script>"
ACCURACY = {"metric": "top1", "float": 0.9, "final": 0.885, "drop": 0.015, "max_drop": 0.02,
            "samples": 1000, "data": "fm.npz"}


@pytest.fixture()
def variants(tmp_path) -> list[Path]:
    """fp32 (accuracy, bench), int8 (accuracy, kept float, sensitivity, bench), pruned (no
    accuracy, spared layers), rpi4 (instruction counts)."""
    fp32 = make_package(tmp_path / "m-fp32", pipeline="fold-bn", cosine=0.999999,
                        library_bytes=400_000,
                        extra={"accuracy": {**ACCURACY, "final": 0.9, "drop": 0.0}})
    int8 = make_package(tmp_path / "m-int8", library_bytes=150_000,
                        extra={"accuracy": ACCURACY, "kept_float": [f"/head/Gemm{EVIL}"],
                               "sensitivity": sensitivity_result(30, EVIL)})
    pruned = make_package(tmp_path / "m-pruned", pipeline="prune(ratio=0.5)", final_params=5000,
                          extra={"spared": [{"layer": "/blocks.3/conv", "ratio": 0.2}]})
    rpi4 = make_package(tmp_path / "m-rpi4", target="rpi4")
    for pkg, ratio in ((fp32, 1.0), (int8, 0.55), (pruned, 0.7)):
        save_bench(Package(pkg), bench_result(ratio))
    save_bench(Package(rpi4), {"emulated": True, "instructions_per_inference": 12_345_678,
                               "threads": 1})
    return [fp32, int8, pruned, rpi4]


def test_collect_reads_every_source(variants):
    data = collect(variants)
    fp32, int8, pruned, rpi4 = data["variants"]
    assert [v["name"] for v in data["variants"]] == ["m-fp32", "m-int8", "m-pruned", "m-rpi4"]
    assert int8["accuracy"]["final"] == 0.885 and int8["accuracy"]["drop"] == 0.015
    assert int8["accuracy_source"] == "manifest" and pruned["accuracy"] is None
    assert int8["latency"] == {"kind": "ratio", "ratio": 0.55, "edgecc_ms": 1.1,
                               "onnxruntime_ms": 2.0, "threads": 2}
    assert rpi4["latency"]["kind"] == "instructions"
    assert rpi4["latency"]["instructions_per_inference"] == 12_345_678
    assert int8["kept_float"] == [f"/head/Gemm{EVIL}"] and fp32["kept_float"] is None
    assert pruned["spared"] == [{"layer": "/blocks.3/conv", "ratio": 0.2}]
    assert int8["sizes"]["library_bytes"] == 150_000
    assert int8["sizes"]["onnx_bytes"] == (variants[1] / "model.onnx").stat().st_size
    assert pruned["sizes"]["params"] == 5000 and pruned["sizes"]["source_params"] == 10_000
    assert [r["cosine"] for r in int8["passes"]] == [1.0, 0.999999, 0.995]
    # the manifest's sensitivity, sorted by damage
    (sens,) = data["sensitivity"]
    drops = [r["drop"] for r in sens["layers"]]
    assert drops == sorted(drops, reverse=True) and len(drops) == 30
    assert data["notes"] == []


def test_eval_file_wins_over_the_manifest_and_fills_missing(variants, tmp_path):
    (tmp_path / "e.json").write_text(json.dumps({"top1": 0.7, "top5": 0.95, "samples": 64}))
    (tmp_path / "f.json").write_text(json.dumps({"top1": 0.8, "samples": 64}))
    data = collect(variants, evals=[f"m-pruned={tmp_path / 'e.json'}",
                                    f"{variants[1]}={tmp_path / 'f.json'}"])
    pruned, int8 = data["variants"][2], data["variants"][1]
    assert pruned["accuracy"]["final"] == 0.7 and pruned["accuracy"]["top5"] == 0.95
    assert int8["accuracy"]["final"] == 0.8 and int8["accuracy_source"].endswith("f.json")


@pytest.mark.parametrize("evals, message", [
    (["nope=e.json"], "names none of the packages"),
    (["e.json"], "with several packages write PKG=FILE.json"),
    (["m-fp32=missing.json"], "does not exist"),
])
def test_bad_eval_arguments_are_user_errors(variants, evals, message):
    with pytest.raises(UserInputError, match=message):
        collect(variants, evals=evals)


def test_eval_file_without_a_metric_is_refused(variants, tmp_path):
    (tmp_path / "e.json").write_text(json.dumps({"samples": 3}))
    with pytest.raises(UserInputError, match="no top1, cosine or agreement"):
        collect(variants, evals=[f"m-fp32={tmp_path / 'e.json'}"])


def test_a_stale_or_damaged_bench_json_is_not_used(variants):
    bench = variants[0] / BENCH_FILE
    data = json.loads(bench.read_text())
    bench.write_text(json.dumps({**data, "library_sha256": "0" * 64}))
    (variants[1] / BENCH_FILE).write_text("[1, 2")
    fp32, int8 = collect(variants)["variants"][:2]
    assert fp32["latency"] is None and int8["latency"] is None
    notes = collect(variants)["notes"]
    assert any("another build of model.so" in n for n in notes)
    assert any("unreadable" in n for n in notes)


def test_malformed_optional_entries_become_notes(tmp_path):
    pkg = make_package(tmp_path / "odd", extra={
        "accuracy": {"metric": "top1", "final": "high"},
        "sensitivity": {"layers": "many"},
        "kept_float": "all",
        "spared": [3, {"layer": "a", "ratio": "x"}],
    })
    (v,) = collect([pkg])["variants"]
    assert v["accuracy"] is None and v["sensitivity"] is None and v["kept_float"] is None
    assert v["spared"] == [{"layer": "a", "ratio": None}]
    notes = collect([pkg])["notes"]
    assert any("no final number" in n for n in notes)
    assert any("not a sensitivity result" in n for n in notes)
    render_ok = write_report([pkg], tmp_path / "r.html")
    assert "not measured" in Path(render_ok["output"]).read_text()


def test_sensitivity_file_and_its_validation(variants, tmp_path):
    good, bad = tmp_path / "sens.json", tmp_path / "bad.json"
    good.write_text(json.dumps(sensitivity_result(3)))
    bad.write_text(json.dumps({"layers": [{"layer": "a"}]}))
    data = collect(variants[:1], sensitivity_files=[good])
    assert [len(s["layers"]) for s in data["sensitivity"]] == [3]
    with pytest.raises(UserInputError, match="not a sensitivity result"):
        collect(variants[:1], sensitivity_files=[bad])


def test_data_evaluates_the_packages_without_accuracy(variants, monkeypatch):
    from edgecc.evaluation import core

    calls = []

    def evaluate(path, data):
        calls.append((Path(path).name, data))
        return {"top1": 0.5, "samples": 10}

    monkeypatch.setattr(core, "evaluate", evaluate)
    pruned = collect(variants, data="d.npz")["variants"][2]
    # only the packages without accuracy are evaluated
    assert calls == [("m-pruned", "d.npz"), ("m-rpi4", "d.npz")]
    assert pruned["accuracy"]["final"] == 0.5


class _Refs(HTMLParser):
    """Every attribute that can load something, and every script/link/img element."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "srcset", "data", "action", "poster"):
                self.refs.append((tag, name, value or ""))


def test_page_is_self_contained_and_escaped(variants, tmp_path):
    out = tmp_path / "report.html"
    write_report(variants, out)
    page = out.read_text()
    assert not re.search(r"https?://", page)  # no external resource, not even a namespace URL
    parser = _Refs()
    parser.feed(page)
    assert parser.refs and all(v.startswith("#") for _, _, v in parser.refs), parser.refs
    assert not parser.tags & {"script", "link", "img", "iframe", "object", "embed"}
    assert "@import" not in page
    assert set(re.findall(r"url\((.)", page)) <= {"#"}  # only references inside the SVGs
    assert "default-src 'none'" in page  # the browser refuses any load should one slip in
    # untrusted names are escaped, never markup
    assert "<script>" not in page and "&lt;script&gt;console.error(&#x27;pwned&#x27;)" in page
    # ids are unique across the inline charts
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))


def test_untrusted_folder_model_and_pipeline_names_are_escaped(tmp_path):
    pkg = make_package(tmp_path / "m<b>x", pipeline=f"qdq{EVIL}",
                       extra={"sensitivity": {**sensitivity_result(2), "model": EVIL}})
    write_report([pkg], tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "<b>" not in page and "<script>" not in page
    assert "m&lt;b&gt;x" in page and page.count("&lt;script&gt;") >= 3


def test_same_folder_names_are_told_apart(tmp_path):
    a = make_package(tmp_path / "a" / "pkg")
    b = make_package(tmp_path / "b" / "pkg")
    assert [v["name"] for v in collect([a, b])["variants"]] == ["a/pkg", "b/pkg"]


def test_page_content(variants, tmp_path):
    out = tmp_path / "report.html"
    write_report(variants, out, title="tinycnn variants")
    page = out.read_text()
    for ident in ("fig-accuracy", "fig-latency", "fig-instructions", "fig-sensitivity-0"):
        assert f'id="{ident}"' in page
    assert page.count("<svg") == 4
    assert "<title>tinycnn variants</title>" in page
    assert "0.55x ONNX Runtime" in page and "12.35M instructions/inference (emulated)" in page
    assert "top1 0.885 (drop 0.015, budget 0.02)" in page and "budget 0.02 (met)" in page
    assert "0.995000" in page  # cosine after the qdq pass
    assert "/blocks.3/conv" in page  # spared
    assert "25 of 30 layers shown" in page
    assert re.search(r"m-pruned.*?not measured", page, re.S)


def test_page_with_nothing_measured(tmp_path):
    pkg = make_package(tmp_path / "bare")
    out = tmp_path / "r.html"
    data = write_report([pkg], out)
    page = out.read_text()
    assert "<svg" not in page and page.count("not measured") >= 4
    assert data["variants"][0]["latency"] is None


def test_writing_is_atomic(variants, tmp_path):
    out = tmp_path / "out" / "report.html"
    out.parent.mkdir()
    out.write_text("earlier")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserInputError, match="cannot read JSON"):
        write_report(variants, out, sensitivity=[tmp_path / "bad.json"])
    damaged = make_package(tmp_path / "damaged")
    (damaged / "model.onnx").unlink()
    with pytest.raises(UserInputError, match="model.onnx is missing"):
        write_report([*variants, damaged], out)
    assert out.read_text() == "earlier" and sorted(p.name for p in out.parent.iterdir()) == [
        "report.html"]
    new = tmp_path / "new" / "r.html"
    with pytest.raises(UserInputError):
        write_report([damaged], new)
    assert not new.exists()


def test_api_name_is_the_callable_module(variants, tmp_path):
    import edgecc.report.compare  # a submodule imported: edgecc.report stays callable

    data = edgecc.report(variants[:2], tmp_path / "r.html")
    assert data["output"] == str(tmp_path / "r.html") and (tmp_path / "r.html").is_file()


def test_save_bench_leaves_the_package_alone(variants):
    pkg = Package(variants[2])
    before = {p.name: sha256_file(p) for p in variants[2].iterdir() if p.name != BENCH_FILE}
    save_bench(pkg, bench_result(0.3))
    after = {p.name: sha256_file(p) for p in variants[2].iterdir() if p.name != BENCH_FILE}
    assert before == after
    saved = json.loads((variants[2] / BENCH_FILE).read_text())
    assert saved["ratio"] == 0.3 and saved["library_sha256"] == pkg.manifest["library"]["sha256"]
    Package(variants[2]).verify_library()


def test_cli_report(variants, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", *map(str, variants), "-o", str(out), "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["output"] == str(out) and len(data["variants"]) == 4 and out.is_file()
    assert main(["report", str(variants[0]), "-o", str(out)]) == 0
    assert f"wrote {out}: 1 packages" in capsys.readouterr().out
    assert main(["report", *map(str, variants), "--eval", "x.json", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgecc: error: --eval x.json: with several packages")


def test_cli_bench_saves_bench_json(variants, monkeypatch, capsys):
    """edgecc bench writes what it prints to PKG/bench.json (the real timing is in
    test_report_bench.py; here the measurement is replaced to keep the test fast)."""
    monkeypatch.setattr(Package, "benchmark", lambda self, *a: bench_result(0.42))
    (variants[2] / BENCH_FILE).unlink()
    assert main(["bench", str(variants[2]), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((variants[2] / BENCH_FILE).read_text())
    assert printed["ratio"] == saved["ratio"] == 0.42
    assert collect(variants)["variants"][2]["latency"]["ratio"] == 0.42
