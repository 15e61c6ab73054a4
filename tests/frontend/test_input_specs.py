"""Input spec text: ``name:1x3x224x224[:dtype]``."""

from __future__ import annotations

import pytest

from edgecc.errors import UserInputError
from edgecc.frontend import InputSpec, parse_input_spec


@pytest.mark.parametrize(
    "text,expected",
    [
        ("x:1x3x224x224", InputSpec("x", (1, 3, 224, 224), "float32")),
        ("input_ids:1x16:int64", InputSpec("input_ids", (1, 16), "int64")),
        ("ids:1x16:long", InputSpec("ids", (1, 16), "int64")),
        ("x:2x8:fp16", InputSpec("x", (2, 8), "float16")),
        ("mask:1x16:bool", InputSpec("mask", (1, 16), "bool")),
        (" x : 4 ", InputSpec("x", (4,), "float32")),
        ("1x3x8x8", InputSpec("", (1, 3, 8, 8), "float32")),
    ],
)
def test_parse(text: str, expected: InputSpec) -> None:
    spec = parse_input_spec(text)
    assert spec == expected
    assert parse_input_spec(spec.text()) == spec  # round trip


@pytest.mark.parametrize(
    "text",
    ["", "x:", ":1x3", "x:1xthree", "x:1x0x3", "x:1x3:complex128", "a:1:float32:extra", "x:1,3"],
)
def test_bad_text_is_a_one_line_user_error(text: str) -> None:
    with pytest.raises(UserInputError) as err:
        parse_input_spec(text)
    assert "\n" not in str(err.value)


def test_message_quotes_the_text() -> None:
    with pytest.raises(UserInputError, match="1xthree"):
        parse_input_spec("x:1xthree")


def test_dimensions_must_be_positive() -> None:
    with pytest.raises(UserInputError, match="positive"):
        InputSpec("x", (1, 0))
