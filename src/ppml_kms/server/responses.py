"""The eHSM response envelope and the exact messages the real server sends.

Every answer is HTTP 200 with a JSON body ``{"code": int, "message": str, "result": object|null}``
(``docs/ehsm-compat.md`` §3). Errors raised by eHSM's JavaScript layer carry ``"result": {}``; errors from
its enclave bridge carry ``"result": null``. Both shapes are reproduced because clients see them.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "API_NOT_FOUND",
    "BODY_TIMEOUT",
    "DATABASE_ERROR",
    "DECRYPTION_FAILED",
    "INTERNAL_ERROR",
    "INVALID_JSON",
    "MISSING_PARAMETERS",
    "NONCE_LENGTH_ERROR",
    "PARAM_TYPE_ERROR",
    "REPLAYED",
    "REQUEST_ABORTED",
    "Reply",
    "SHUTTING_DOWN",
    "SIGN_ERROR",
    "TIMESTAMP_ERROR",
    "TIMESTAMP_LENGTH_ERROR",
    "TOO_LARGE",
    "enclave_error",
    "error",
    "success",
    "unknown_appid",
]

Reply = dict[str, Any]

MISSING_PARAMETERS = "Missing required parameters"
PARAM_TYPE_ERROR = "param type error"
NONCE_LENGTH_ERROR = "Nonce length error"
TIMESTAMP_LENGTH_ERROR = "Timestamp length error"
TIMESTAMP_ERROR = "Timestamp error"
REPLAYED = "Timestamp can't be repeated in 20 minutes"
SIGN_ERROR = "sign error"
DATABASE_ERROR = "database error"
INVALID_JSON = "Invalid JSON"
TOO_LARGE = "request entity too large"
REQUEST_ABORTED = "request aborted"  # body-parser's words when the client goes away mid-body
BODY_TIMEOUT = "request timeout"
SHUTTING_DOWN = "Server is shutting down"
API_NOT_FOUND = "API Not Found"
INTERNAL_ERROR = "Server internal error, please contact the administrator."
DECRYPTION_FAILED = "Decryption failed, Please confirm that your parameters are correct."


def success(result: dict[str, Any] | None = None, message: str = "success!") -> Reply:
    """A 200 answer. eHSM says ``success!`` from the enclave path, ``successful`` elsewhere."""
    return {"code": 200, "message": message, "result": result if result is not None else {}}


def error(code: int, message: str) -> Reply:
    """An error as eHSM's JavaScript layer sends it (``result`` is ``{}``)."""
    return {"code": code, "message": message, "result": {}}


def enclave_error(code: int, message: str) -> Reply:
    """An error as eHSM's enclave bridge sends it (``result`` is ``null``)."""
    return {"code": code, "message": message, "result": None}


def unknown_appid() -> Reply:
    """eHSM's answer for an appid it does not know: no ``message`` key at all (§2.5)."""
    return {"code": 400, "result": {}}
