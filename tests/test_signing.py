"""JavaScript-exact canonical strings for values beyond the standard payloads."""

from __future__ import annotations

import pytest

from ppml_kms.signing import canonical_string


@pytest.mark.parametrize(
    ("value", "javascript"),
    [
        # String(x) as ECMA-262 Number::toString defines it.
        (16, "16"),
        (1.0, "1"),
        (-2.5, "-2.5"),
        (123.456, "123.456"),
        (1e-7, "1e-7"),
        (1.5e-7, "1.5e-7"),
        (0.000001, "0.000001"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1.2345e25, "1.2345e+25"),
        (2**53 + 1, "9007199254740992"),  # a double in JavaScript
        (12345678901234567890, "12345678901234567000"),
        (True, "true"),
        ([1, None, "a", [2, 3]], "1,,a,2,3"),
        ([{"k": 1}], "[object Object]"),
    ],
)
def test_values_print_as_javascript_string(value, javascript) -> None:
    assert canonical_string({"v": value}) == f"v={javascript}"


def test_keys_sort_by_utf16_code_units() -> None:
    # U+FF21 sorts after U+1F600 in UTF-16 (0xFF21 > 0xD83D) though not by code point.
    assert canonical_string({"\uff21": "1", "\U0001f600": "2"}) == "\U0001f600=2&\uff21=1"


def test_js_skip_rule() -> None:
    params = {"a": 0, "b": False, "c": "", "d": None, "e": "0", "f": {}, "g": [], "h": 0.0}
    assert canonical_string(params) == "e=0&f="
