"""eHSM request signing, shared by the ``ehsm`` client and our eHSM-compatible server.

The canonical string is eHSM's ``params_sort_str`` (``svc/function.js``), reproduced exactly
(see ``docs/ehsm-compat.md`` §2.3):

* keys sorted by UTF-16 code units (JavaScript's default sort);
* values that are ``None``, ``''``, the number ``0`` or ``False`` are skipped (JavaScript's
  loose ``!= ''``), a non-empty string such as ``"0"`` is kept;
* ``key=value`` pairs joined by ``&``; an object value is replaced by its own canonical
  string (no braces, no escaping); numbers and arrays print as JavaScript's ``String()``;
  no URL-encoding.

``sign = base64(HMAC-SHA256(key=utf8(apikey), msg=utf8(canonical)))``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

__all__ = ["canonical_string", "sign", "verify"]


def _js_skipped(value: Any) -> bool:
    # JavaScript `value != ''` is false for undefined/null (absent here), '', 0, -0, false,
    # and also for values whose string form is empty ([] -> ''), which JSON can carry.
    if value is None or value is False:
        return True
    if isinstance(value, bool):  # True is kept
        return False
    if isinstance(value, (int, float)):
        return value == 0
    if isinstance(value, str):
        return value == ""
    if isinstance(value, list):
        return _js_string(value) == ""
    return False


def _js_number(value: int | float) -> str:
    """JavaScript's ``String(number)`` (ECMA-262 Number::toString) for a JSON number.

    JSON integers beyond 2**53 are doubles in JavaScript, so they are rounded the same way here.
    """
    if isinstance(value, int):
        if abs(value) <= 2**53:
            return str(value)
        try:
            value = float(value)
        except OverflowError:
            return "Infinity" if value > 0 else "-Infinity"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    # Shortest round-trip digits s and exponent n with value = 0.s * 10**n (repr gives them).
    _, digit_tuple, exponent = Decimal(repr(abs(value))).as_tuple()
    digits = "".join(map(str, digit_tuple))
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)  # type: ignore[operator]
    k = len(stripped)
    n = exponent + k  # type: ignore[operator]
    if k <= n <= 21:
        text = stripped + "0" * (n - k)
    elif 0 < n <= 21:
        text = stripped[:n] + "." + stripped[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + stripped
    else:
        e = n - 1
        mantissa = stripped if k == 1 else stripped[0] + "." + stripped[1:]
        text = f"{mantissa}e{'+' if e > 0 else '-'}{abs(e)}"
    return sign + text


def _js_string(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return _js_number(value)
    if isinstance(value, Mapping):
        return "[object Object]"
    if isinstance(value, list):  # Array.prototype.toString: null/undefined become ''
        return ",".join("" if v is None else _js_string(v) for v in value)
    return str(value)


def _utf16_order(key: str) -> bytes:
    # Array.prototype.sort compares UTF-16 code units, not code points.
    return key.encode("utf-16-be", "surrogatepass")


def canonical_string(params: Mapping[str, Any]) -> str:
    """Return eHSM's canonical string for ``params`` (the fields to sign, without ``sign``)."""
    parts: list[str] = []
    for key in sorted(params, key=_utf16_order):
        value = params[key]
        if _js_skipped(value):
            continue
        if isinstance(value, Mapping):
            parts.append(f"{key}={canonical_string(value)}")
        else:
            parts.append(f"{key}={_js_string(value)}")
    return "&".join(parts)


def sign(apikey: str, params: Mapping[str, Any]) -> str:
    """Sign ``params`` (``appid``, ``timestamp``, optional ``nonce`` and ``payload``) with ``apikey``."""
    msg = canonical_string(params).encode("utf-8")
    digest = hmac.new(apikey.encode("utf-8"), msg, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def verify(apikey: str, params: Mapping[str, Any], signature: str) -> bool:
    """Check ``signature`` against ``params`` in constant time."""
    expected = sign(apikey, params).encode("ascii")
    try:
        given = signature.encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(expected, given)
