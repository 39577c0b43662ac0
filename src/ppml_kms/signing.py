"""eHSM request signing, shared by the ``ehsm`` client and our eHSM-compatible server.

The canonical string is eHSM's ``params_sort_str`` (``svc/function.js``), reproduced exactly
(see ``ehsm-api.md`` §2.3):

* keys sorted in plain string order;
* values that are ``None``, ``''``, the number ``0`` or ``False`` are skipped (JavaScript's
  loose ``!= ''``), a non-empty string such as ``"0"`` is kept;
* ``key=value`` pairs joined by ``&``; an object value is replaced by its own canonical
  string (no braces, no escaping); numbers print as JavaScript's ``String()``; no URL-encoding.

``sign = base64(HMAC-SHA256(key=utf8(apikey), msg=utf8(canonical)))``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from collections.abc import Mapping
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
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return repr(value)


def _js_string(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return _js_number(value)
    if isinstance(value, list):  # Array.prototype.toString
        return ",".join("" if v is None else _js_string(v) for v in value)
    return str(value)


def canonical_string(params: Mapping[str, Any]) -> str:
    """Return eHSM's canonical string for ``params`` (the fields to sign, without ``sign``)."""
    parts: list[str] = []
    for key in sorted(params):
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
