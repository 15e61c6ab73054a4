"""Hostile torch files: nothing from the file may run without --trust-code.

Each archive is crafted here from a small legit model: a .pt2 whose zip holds a second entry of
one name (the pickle that would create a marker file first), a .pt2 whose guards or node
targets are code, TorchScript whose code calls torch.from_file / torch.save. Each must be
refused with exit 2 and a line naming the problem, and no marker file may appear; with
--trust-code the TorchScript one loads (and then, as trusted code, writes its file).
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edgecc.cli import main
from edgecc.errors import EXIT_USER, UserInputError
from edgecc.frontend import load_model, trust
from edgecc.frontend.trust import denied_token


class Lin(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class Stateful(torch.nn.Module):
    """Has __setstate__: TorchScript runs it while loading."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.ones(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> list[torch.Tensor]:
        return [self.w]

    @torch.jit.export
    def __setstate__(self, state: list[torch.Tensor]) -> None:
        self.w = state[0]
        self.training = False


class _Touch:
    """Unpickling this creates ``path`` (what a malicious pickle does)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.path}",))


def _evil_pickle(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"x": _Touch(marker)}, buf)
    return buf.getvalue()


def _rewrite(
    src: Path,
    dst: Path,
    edit: Callable[[str, bytes], bytes | None] = lambda n, d: d,
    before: dict[str, bytes] | None = None,
) -> Path:
    """Copy a zip entry by entry; ``edit`` may change (or drop, with None) an entry, and
    ``before`` adds an entry of the same name ahead of the one whose name ends so."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            for suffix, data in (before or {}).items():
                if item.filename.endswith(suffix):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # zipfile warns about the duplicate
                        zout.writestr(item.filename, data)
            data = edit(item.filename, zin.read(item.filename))
            if data is not None:
                zout.writestr(item.filename, data)
    return dst


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trust") / "lin.pt2"
    torch.export.save(torch.export.export(Lin().eval(), (torch.randn(2, 4),)), str(path))
    return path


@pytest.fixture(scope="module")
def stateful_ts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trust") / "stateful.pt"
    torch.jit.save(torch.jit.script(Stateful()), str(path))
    return path


def _refused(path: Path, match: str, **kwargs: Any) -> str:
    with pytest.raises(UserInputError) as info:
        load_model(path, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and match in msg and "--trust-code" in msg, msg
    return msg


@pytest.mark.parametrize(
    "entry", ["data/sample_inputs/model.pt", "data/weights/model_weights_config.json"]
)
def test_pt2_duplicate_entry_is_refused(pt2: Path, tmp_path: Path, entry: str) -> None:
    marker = tmp_path / "marker"
    evil = _rewrite(pt2, tmp_path / "dup.pt2", before={entry: _evil_pickle(marker)})
    _refused(evil, "two entries named")
    assert not marker.exists()


def test_pt2_duplicate_names_differing_in_case_are_refused(pt2: Path, tmp_path: Path) -> None:
    """miniz (torch's zip reader) looks names up case-insensitively."""
    marker = tmp_path / "marker"

    def upper(name: str, data: bytes) -> bytes:
        return data

    evil = _rewrite(pt2, tmp_path / "case.pt2", upper)
    with zipfile.ZipFile(evil, "a") as zf:
        root = zf.namelist()[0].split("/")[0]
        zf.writestr(f"{root}/data/sample_inputs/MODEL.pt", _evil_pickle(marker))
    _refused(evil, "two entries named")
    assert not marker.exists()


def test_pt2_pickled_sample_inputs_are_refused(pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = _rewrite(
        pt2,
        tmp_path / "pickled.pt2",
        lambda n, d: _evil_pickle(marker) if n.endswith("sample_inputs/model.pt") else d,
    )
    _refused(evil, "pickled objects in data/sample_inputs/model.pt")
    assert not marker.exists()


def test_torch_load_stays_weights_only_even_past_the_check(
    pt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch retries a failed sample-input load with weights_only=False: that must not unpickle
    either, even were the pre-check fooled."""
    marker = tmp_path / "marker"
    evil = _rewrite(
        pt2,
        tmp_path / "pickled.pt2",
        lambda n, d: _evil_pickle(marker) if n.endswith("sample_inputs/model.pt") else d,
    )
    monkeypatch.setattr(trust, "pt2_problem", lambda path: "")
    with pytest.raises(UserInputError, match="cannot load torch.export archive"):
        load_model(evil)
    assert not marker.exists()


def _edit_program(key: str, edit: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def apply(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        edit(program[key] if key else program)
        return json.dumps(program).encode()

    return apply


@pytest.mark.parametrize(
    "key,edit,match",
    [
        (
            "",
            lambda p: p.__setitem__("guards_code", ["__import__('os').system('touch m')"]),
            "guard code",
        ),
        (
            "",
            lambda p: p.__setitem__("guards_code", ["L['x'].size()[0] == 2 or print('x')"]),
            "guard code",
        ),
        (
            "graph_module",
            lambda g: g["graph"]["nodes"][0].__setitem__("target", "torch.os.system"),
            "not a torch operator",
        ),
        (
            "graph_module",
            lambda g: g["graph"]["nodes"][0].__setitem__(
                "target", "torch.ops.aten.from_file.default"
            ),
            "operator torch.ops.aten.from_file.default",
        ),
    ],
)
def test_pt2_code_in_the_program_is_refused(
    pt2: Path, tmp_path: Path, key: str, edit: Callable, match: str
) -> None:
    evil = _rewrite(pt2, tmp_path / "prog.pt2", _edit_program(key, edit))
    _refused(evil, match)


def test_pt2_size_guards_are_accepted(tmp_path: Path) -> None:
    class Two(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x[:, :4] + y

    batch = torch.export.Dim("b", min=2, max=64)
    program = torch.export.export(
        Two(),
        (torch.randn(3, 8), torch.randn(3, 4)),
        dynamic_shapes={"x": {0: batch}, "y": {0: batch}},
    )
    path = tmp_path / "guards.pt2"
    torch.export.save(program, str(path))
    assert trust.pt2_problem(path) == ""  # guards_code: L['x'].size()[0] == L['y'].size()[0]
    lm = load_model(path)
    x, y = lm.probe_inputs["x"], lm.probe_inputs["y"]
    np.testing.assert_allclose(lm.reference_outputs["output"], x[:, :4] + y, rtol=0, atol=1e-6)


def test_pt2_unexpected_entry_is_refused(pt2: Path, tmp_path: Path) -> None:
    evil = _rewrite(pt2, tmp_path / "aoti.pt2")
    with zipfile.ZipFile(evil, "a") as zf:
        root = zf.namelist()[0].split("/")[0]
        zf.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    _refused(evil, "unexpected entry 'data/aotinductor/model/model.so'")


edited: list[bool] = []


def _inject(source: str, after: str, lines: list[str]) -> str:
    if after not in source:
        return source  # another class's file
    edited.append(True)
    indent = after[: len(after) - len(after.lstrip())]
    return source.replace(after, after + "".join(f"{indent}{line}\n" for line in lines), 1)


def _evil_torchscript(src: Path, dst: Path, after: str, lines: list[str]) -> Path:
    def edit(name: str, data: bytes) -> bytes | None:
        if name.endswith(".debug_pkl"):
            return None  # source ranges of the original code
        if "/code/" in name and name.endswith(".py"):
            return _inject(data.decode(), after, lines).encode()
        return data

    edited.clear()
    out = _rewrite(src, dst, edit)
    assert edited, "nothing injected"
    return out


def test_torchscript_setstate_from_file_is_refused(stateful_ts: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = _evil_torchscript(
        stateful_ts,
        tmp_path / "evil.pt",
        "    self.training = False\n",
        [
            f'_0 = torch.from_file("{marker}", True, 16)',
            "self.w = torch.add(state[0], torch.sum(_0))",
        ],
    )
    msg = _refused(evil, "torch.from_file", input_specs=[_spec("x:1x4")])
    assert "test_trust.py line" in msg  # code/__torch__/tests/frontend/test_trust.py
    assert not marker.exists()
    # trusted: it loads (and, being trusted code, writes its file)
    lm = load_model(evil, input_specs=[_spec("x:1x4")], trust_code=True)
    assert marker.exists() and lm.source_format == "torchscript"


def test_torchscript_forward_save_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "lin.pt"
    torch.jit.save(torch.jit.script(Lin()), str(src))
    marker = tmp_path / "saved"
    evil = _evil_torchscript(
        src, tmp_path / "evil.pt", "    x: Tensor) -> Tensor:\n", [f'torch.save(x, "{marker}")']
    )
    _refused(evil, "torch.save", input_specs=[_spec("x:1x4")])
    _refused(evil, "torch.save", input_specs=[_spec("x:1x4")], trust_pickle=False)
    assert not marker.exists()
    lm = load_model(evil, input_specs=[_spec("x:1x4")], trust_pickle=True)  # the old flag name
    assert marker.exists() and lm.reference_outputs["output"].shape == (1, 3)


@pytest.mark.parametrize(
    "code,hit",
    [
        ("y = torch.from_file(p, True, 4)", "torch.from_file"),
        ("y = ops.aten.from_file(p)", "ops.aten.from_file"),
        ('y = getattr(torch, "save")', "save"),
        ("y = torch.ops._c10d_functional.all_reduce(x)", "torch.ops._c10d_functional"),
        ("y = torch.add(x, 1)", None),
        ("y = torch.conv2d(x, w)  # saves memory", None),
    ],
)
def test_denied_tokens(code: str, hit: str | None) -> None:
    found = denied_token(code + "\n")
    assert (found[0] if found else None) == hit


def _spec(text: str) -> Any:
    from edgecc.frontend import parse_input_spec

    return parse_input_spec(text)


# --- the CLI ---------------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("edgecc: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_refuses_hostile_files(
    pt2: Path, stateful_ts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "marker"
    dup = _rewrite(
        pt2, tmp_path / "dup.pt2", before={"data/sample_inputs/model.pt": _evil_pickle(marker)}
    )
    code, err = _cli(capsys, "compile", dup, "-o", tmp_path / "out1")
    assert code == EXIT_USER and "two entries named" in _one_error_line(err)
    evil = _evil_torchscript(
        stateful_ts,
        tmp_path / "evil.pt",
        "    self.training = False\n",
        [
            f'_0 = torch.from_file("{marker}", True, 16)',
            "self.w = torch.add(state[0], torch.sum(_0))",
        ],
    )
    code, err = _cli(capsys, "compile", evil, "--input-shape", "x:1x4", "-o", tmp_path / "out2")
    line = _one_error_line(err)
    assert code == EXIT_USER and "torch.from_file" in line and "--trust-code" in line
    assert not marker.exists()
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


class ScaledSum(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor, scale: int) -> torch.Tensor:
        return a * scale + b


@pytest.mark.slow  # compiles through TVM (~45 s on the shared machine)
def test_cli_binds_inputs_by_name_with_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--input-shape given b first: the package still takes a, b and computes a*scale+b."""
    from edgecc.api import load

    src = tmp_path / "sum.pt"
    torch.jit.save(torch.jit.script(ScaledSum()), str(src))
    out = tmp_path / "pkg"
    code, err = _cli(
        capsys, "-q", "compile", src, "--input-shape", "b:1x4", "--input-shape", "a:1x4",
        "--input-value", "scale=2", "-o", out,
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["a", "b"]
    assert manifest["source"]["input_values"] == {"scale": 2}
    a, b = np.full((1, 4), 3.0, np.float32), np.arange(4, dtype=np.float32)[None]
    got = load(out).run({"b": b, "a": a})
    np.testing.assert_allclose(next(iter(got.values())), a * 2 + b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "args,match",
    [
        (["--input-shape", "inp:1x4"], "forward(a, b, scale: int)"),
        (["--input-shape", "a:1x4", "--input-shape", "b:1x4"], "--input-value scale="),
        (["--input-shape", "a:1x4", "--input-shape", "b:1x4", "--input-value", "2"], "NAME=VALUE"),
        (["--input-shape", "a:1x3x16x16:float128"], "unknown dtype 'float128'"),
        (["--input-shape", "a:7x8x1024x1024x1024", "--input-shape", "b:1", "--input-value",
          "scale=1"], "224 GiB"),
    ],
)  # fmt: skip
def test_cli_input_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], match: str
) -> None:
    src = tmp_path / "sum.pt"
    torch.jit.save(torch.jit.script(ScaledSum()), str(src))
    code, err = _cli(capsys, "compile", src, *args, "-o", tmp_path / "pkg")
    assert code == EXIT_USER and match in _one_error_line(err)
