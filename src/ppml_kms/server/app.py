"""The eHSM-compatible ASGI application: routing, body parsing, envelope checks, request signatures.

``create_app(store)`` serves ``/ehsm`` and ``/ehsm/`` (``?Action=Name``):

* GET ``GetVersion`` and ``Enroll``: no body, no signature. GET of any other action fails the
  parameter check (400), POST of these two is ``API Not Found`` (404), as in eHSM.
* POST of every other action: a JSON body ``{appid, timestamp, nonce?, sign, payload?}`` checked in
  eHSM's order (``ehsm-api.md`` §2.2): required fields -> types -> nonce length -> timestamp
  length -> timestamp window -> replay cache -> payload validation -> signature. Only then is the
  Action looked up (an unknown one is 404) and run.

Every answer is HTTP 200 with ``{code, message, result}``; no exception escapes as an HTTP 500. The
request body is capped at 100 kB (Express's default), and it is parsed only when the content type is
``application/json``: otherwise it counts as ``{}``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ppml_kms import signing
from ppml_kms.server import responses as r
from ppml_kms.server.actions import GET_ACTIONS, POST_ACTIONS, Context
from ppml_kms.server.replay import MemoryReplayCache, ReplayCache
from ppml_kms.server.store import KeyStore
from ppml_kms.server.validation import CRYPTO_ACTIONS, check_payload, js_length

__all__ = ["BODY_LIMIT", "MAX_NONCE_LENGTH", "MAX_TIMESTAMP_DIFF_MS", "create_app"]

logger = logging.getLogger(__name__)

BODY_LIMIT = 100 * 1024  # Express json() default, "100kb"
MAX_NONCE_LENGTH = 64
TIMESTAMP_LENGTH = 13
MAX_TIMESTAMP_DIFF_MS = 10 * 60 * 1000  # eHSM's MAX_TIME_STAMP_DIFF
_TIMESTAMP_RE = re.compile(r"[0-9]{13}")
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class _BadBody(Exception):
    def __init__(self, reply: r.Reply) -> None:
        self.reply = reply


def _js_falsy(value: Any) -> bool:
    """JavaScript's ``!value`` for JSON values (``{}`` and ``[]`` are truthy)."""
    if value is None or value is False or value == "":
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # JSON.parse refuses NaN and Infinity


def _single_query(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    return values[0] if len(values) == 1 else None  # repeated: Express makes an array, no match


async def _read_json(request: Request) -> Any:
    """The parsed body, as ``express.json()`` would give it (``{}`` when it is not JSON-typed)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        return {}
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > BODY_LIMIT:
        raise _BadBody(r.error(400, r.TOO_LARGE))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > BODY_LIMIT:
            raise _BadBody(r.error(400, r.TOO_LARGE))
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        return {}  # body-parser: an empty JSON body is {}
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _BadBody(r.error(400, r.INVALID_JSON)) from None
    if isinstance(body, list):
        return {}  # Express accepts an array; it has no appid, so: Missing required parameters
    if not isinstance(body, dict):
        raise _BadBody(r.error(400, r.INVALID_JSON))
    return body


class _Service:
    def __init__(self, store: KeyStore, clock: Callable[[], float], replay: ReplayCache) -> None:
        self.ctx = Context(store=store, clock=clock)
        self.replay = replay

    # -- HTTP ---------------------------------------------------------------------------------

    async def ehsm(self, request: Request) -> JSONResponse:
        action = _single_query(request, "Action")
        try:
            if request.method == "GET":
                get_handler = GET_ACTIONS.get(action or "")
                if get_handler is None:
                    reply = r.error(400, r.MISSING_PARAMETERS)  # the envelope check fails
                else:
                    reply = await run_in_threadpool(get_handler, self.ctx)
            elif request.method == "POST":
                try:
                    body = await _read_json(request)
                except _BadBody as bad:
                    reply = bad.reply
                else:
                    reply = await run_in_threadpool(self._post, action, body)
            else:  # HEAD included: it must not enroll anything
                reply = r.error(404, r.API_NOT_FOUND)
        except Exception:
            # Log the failure (traceback, no values) and answer like eHSM; never a bare 500.
            logger.exception("internal error while handling Action=%r", action)
            reply = r.error(500, r.INTERNAL_ERROR)
        logger.info("Action=%r code=%s", action, reply.get("code"))
        return JSONResponse(reply)

    async def elsewhere(self, request: Request) -> JSONResponse:
        return JSONResponse(r.error(404, r.API_NOT_FOUND))

    # -- POST ---------------------------------------------------------------------------------

    def _post(self, action: str | None, body: Mapping[str, Any]) -> r.Reply:
        if action in GET_ACTIONS:
            return r.error(404, r.API_NOT_FOUND)
        checked = self._authenticate(action or "", body)
        if not isinstance(checked, tuple):
            return checked
        appid, payload = checked
        handler = POST_ACTIONS.get(action or "")
        if handler is None:
            return r.error(404, r.API_NOT_FOUND)
        return handler(self.ctx, appid, payload)

    def _authenticate(
        self, action: str, body: Mapping[str, Any]
    ) -> tuple[str, Mapping[str, Any]] | r.Reply:
        """eHSM's ``_checkParams``: the envelope, replay, payload and signature checks, in order."""
        appid, timestamp, sign = body.get("appid"), body.get("timestamp"), body.get("sign")
        nonce, payload = body.get("nonce"), body.get("payload")
        if _js_falsy(appid) or _js_falsy(timestamp) or _js_falsy(sign):
            return r.error(400, r.MISSING_PARAMETERS)
        if action in CRYPTO_ACTIONS and _js_falsy(payload):
            return r.error(400, r.MISSING_PARAMETERS)
        if (
            not isinstance(appid, str)
            or not isinstance(timestamp, str)
            or not isinstance(sign, str)
            or (nonce is not None and not isinstance(nonce, str))
            or (not _js_falsy(payload) and not isinstance(payload, dict))
        ):
            return r.error(400, r.PARAM_TYPE_ERROR)
        if _js_falsy(payload):
            payload = None  # an empty-ish payload signs like an absent one
        if nonce is not None and js_length(nonce) > MAX_NONCE_LENGTH:
            return r.error(400, r.NONCE_LENGTH_ERROR)
        if js_length(timestamp) != TIMESTAMP_LENGTH:
            return r.error(400, r.TIMESTAMP_LENGTH_ERROR)
        if (
            _TIMESTAMP_RE.fullmatch(timestamp) is None
            or abs(self.ctx.now_ms() - int(timestamp)) >= MAX_TIMESTAMP_DIFF_MS
        ):
            return r.error(400, r.TIMESTAMP_ERROR)
        if self.replay.seen(appid, nonce, timestamp):
            return r.error(400, r.REPLAYED)
        if payload is not None:
            message = check_payload(action, payload)
            if message is not None:
                return r.error(400, message)
        try:
            apikey = self.ctx.store.apikey_for(appid)
        except Exception:
            logger.exception("cannot look up the apikey of an appid")
            return r.error(400, r.DATABASE_ERROR)
        if apikey is None:
            return r.unknown_appid()
        signed = {"appid": appid, "nonce": nonce, "timestamp": timestamp, "payload": payload}
        if not signing.verify(apikey, signed, sign):
            return r.error(400, r.SIGN_ERROR)
        if not self.replay.record(appid, nonce, timestamp):
            return r.error(400, r.REPLAYED)  # an identical request won the race
        return appid, payload if payload is not None else {}


def create_app(
    store: KeyStore,
    *,
    clock: Callable[[], float] = time.time,
    replay_cache: ReplayCache | None = None,
) -> Starlette:
    """The eHSM-compatible application over ``store``.

    Args:
        store: where apps and keys live; the caller keeps ownership (and closes it).
        clock: seconds since the epoch, for timestamps, key dates and expiry (tests inject one).
        replay_cache: defaults to a per-process :class:`MemoryReplayCache` on ``clock``.
    """
    service = _Service(store, clock, replay_cache or MemoryReplayCache(clock=clock))
    return Starlette(
        routes=[
            Route("/ehsm", service.ehsm, methods=_ALL_METHODS),
            Route("/ehsm/", service.ehsm, methods=_ALL_METHODS),
            Route("/{path:path}", service.elsewhere, methods=_ALL_METHODS),
        ]
    )
