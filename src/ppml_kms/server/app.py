"""The eHSM-compatible ASGI application: routing, body parsing, envelope checks, request signatures.

``create_app(store)`` serves ``/ehsm`` and ``/ehsm/`` (``?Action=Name``):

* GET ``GetVersion`` and ``Enroll``: no body, no signature. GET of any other action fails the
  parameter check (400), POST of these two is ``API Not Found`` (404), as in eHSM.
* POST of every other action: a JSON body ``{appid, timestamp, nonce?, sign, payload?}`` checked in
  eHSM's order (``docs/ehsm-compat.md`` §2.2): required fields -> types -> nonce length -> timestamp
  length -> timestamp window -> replay cache -> payload validation -> signature. Only then is the
  Action looked up (an unknown one is 404) and run.

Every answer is HTTP 200 with ``{code, message, result}``; no exception escapes as an HTTP 500. An
outer ASGI layer (:class:`KmsApp`) keeps that promise for whatever reaches the application: methods
the router does not know (TRACE, PROPFIND, FOO, ...) are ``API Not Found`` like unknown paths, and a
failure outside the handler is a JSON 500. CONNECT is the one exception: an HTTP 2xx answer to it
opens a tunnel and cannot carry a body, so it gets the same envelope with HTTP 405. Requests that
the HTTP server itself (h11/uvicorn) rejects at the protocol level, such as a malformed request
line, a bad ``Content-Length`` or an HTTP/2 preface, never reach the application; uvicorn answers
those with a plain-text 400 (out of scope here).

The request body is capped at 100 kB (Express's default), and it is parsed only when the content
type is ``application/json``: otherwise it counts as ``{}``. Reading it is bounded in time
(``body_timeout``, 30 s): a client that stalls mid-body gets a 400 and the connection is closed, as
is every connection whose request body was left unread. A parsed body must nest at most
:data:`MAX_JSON_DEPTH` deep and hold only valid Unicode text (no lone UTF-16 surrogate such as
``"\\ud800"``); otherwise it is ``Invalid JSON``. A client that goes away mid-body is logged at
DEBUG level only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ppml_kms import signing
from ppml_kms.server import responses as r
from ppml_kms.server.actions import GET_ACTIONS, POST_ACTIONS, Context
from ppml_kms.server.replay import MemoryReplayCache, ReplayCache
from ppml_kms.server.store import KeyStore
from ppml_kms.server.validation import CRYPTO_ACTIONS, check_payload, js_length

__all__ = [
    "BODY_LIMIT",
    "BODY_TIMEOUT_SECONDS",
    "MAX_JSON_DEPTH",
    "MAX_NONCE_LENGTH",
    "MAX_TIMESTAMP_DIFF_MS",
    "KmsApp",
    "create_app",
]

logger = logging.getLogger(__name__)

BODY_LIMIT = 100 * 1024  # Express json() default, "100kb"
MAX_NONCE_LENGTH = 64
TIMESTAMP_LENGTH = 13
MAX_TIMESTAMP_DIFF_MS = 10 * 60 * 1000  # eHSM's MAX_TIME_STAMP_DIFF
BODY_TIMEOUT_SECONDS = 30.0  # to receive a whole request body, once its headers arrived
MAX_JSON_DEPTH = 32  # objects/arrays nested deeper than this are Invalid JSON
_STOP_GRACE_SECONDS = 1.0  # on shutdown, how much longer a body still arriving may take
_TIMESTAMP_RE = re.compile(r"[0-9]{13}")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs: these are lone
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


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


def _plain_json(value: Any, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests at most ``max_depth`` containers deep and every string in it (keys
    included) is encodable as UTF-8, i.e. holds no lone surrogate. Iterative: no recursion limit."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE_RE.search(item) is not None:
                return False
        elif isinstance(item, dict):
            if depth > max_depth:
                return False
            for key, child in item.items():
                if _SURROGATE_RE.search(key) is not None:
                    return False
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > max_depth:
                return False
            stack.extend((child, depth + 1) for child in item)
    return True


async def _collect_body(request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > BODY_LIMIT:
            raise _BadBody(r.error(400, r.TOO_LARGE))
        chunks.append(chunk)
    return b"".join(chunks)


class _Stopper:
    """Tells body readers that the server is shutting down (used on the server's event loop)."""

    def __init__(self) -> None:
        self.stopping = False
        self._waiters: set[asyncio.Future[None]] = set()

    def stop(self) -> None:
        self.stopping = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        if self.stopping:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)


class _Service:
    def __init__(
        self,
        store: KeyStore,
        clock: Callable[[], float],
        replay: ReplayCache,
        body_timeout: float,
    ) -> None:
        self.ctx = Context(store=store, clock=clock)
        self.replay = replay
        self.body_timeout = body_timeout
        self.stopper = _Stopper()

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
                    body = await self._read_json(request)
                except _BadBody as bad:
                    reply = bad.reply
                except ClientDisconnect:
                    # Nobody will read the answer; not a server problem, so no traceback.
                    logger.debug("the client went away while sending Action=%r", action)
                    reply = r.error(400, r.REQUEST_ABORTED)
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

    async def _read_json(self, request: Request) -> Any:
        """The parsed body, as ``express.json()`` would give it (``{}`` when it is not JSON-typed).

        Raises:
            _BadBody: too large, too slow, not JSON, or not plain JSON (see :func:`_plain_json`).
            ClientDisconnect: the client went away before sending the whole body.
        """
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            return {}
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > BODY_LIMIT:
            raise _BadBody(r.error(400, r.TOO_LARGE))
        raw = await self._read_body(request)
        if not raw:
            return {}  # body-parser: an empty JSON body is {}
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise _BadBody(r.error(400, r.INVALID_JSON)) from None
        if not _plain_json(body):
            raise _BadBody(r.error(400, r.INVALID_JSON))
        if isinstance(body, list):
            return {}  # Express accepts an array; it has no appid, so: Missing required parameters
        if not isinstance(body, dict):
            raise _BadBody(r.error(400, r.INVALID_JSON))
        return body

    async def _read_body(self, request: Request) -> bytes:
        """The raw body, within ``body_timeout`` (and promptly once the server is stopping)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        reader = asyncio.ensure_future(_collect_body(request))
        stopping = asyncio.ensure_future(self.stopper.wait())
        try:
            done, _ = await asyncio.wait(
                {reader, stopping}, timeout=self.body_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if reader not in done and stopping in done:
                # Shutting down: a body that is still arriving gets a moment, a stalled one not.
                grace = min(_STOP_GRACE_SECONDS, deadline - loop.time())
                done, _ = await asyncio.wait({reader}, timeout=max(grace, 0.0))
                if reader not in done:
                    logger.debug("stopped waiting for a request body: shutting down")
                    raise _BadBody(r.error(503, r.SHUTTING_DOWN))
            if reader not in done:
                logger.debug("a client took over %gs to send a request body", self.body_timeout)
                raise _BadBody(r.error(400, r.BODY_TIMEOUT))
            return reader.result()
        finally:
            reader.cancel()
            stopping.cancel()

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


def _announces_body(scope: _Scope) -> bool:
    for name, value in scope.get("headers", ()):
        name = name.lower()
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
    return False


async def _send_reply(send: _Send, reply: r.Reply, status: int = 200) -> None:
    response = JSONResponse(reply)
    headers = response.raw_headers
    if status != 200:
        headers = [*headers, (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


class KmsApp:
    """The ASGI application :func:`create_app` returns: eHSM's routes behind a guard.

    The guard answers every HTTP request with HTTP 200 and a JSON envelope: an unknown method is
    ``API Not Found`` (Starlette would say 405), an exception outside the handler is a JSON 500,
    and a request cancelled by the server's shutdown ends quietly (a JSON 503 if nothing was sent
    yet). CONNECT, whose 2xx answers cannot carry a body, gets the ``API Not Found`` envelope with
    HTTP 405. When a request body was not read to its end (too large, too slow, not JSON-typed),
    the answer carries ``Connection: close`` so the server drops the connection instead of
    waiting for the rest.
    """

    def __init__(self, service: _Service, router: _ASGIApp) -> None:
        self._service = service
        self._router = router

    def stop_reading(self) -> None:
        """The server is shutting down: stop waiting for request bodies that do not arrive.

        Call it on the server's event loop (``uvicorn.Server.shutdown`` does, in ``run.py``).
        """
        self._service.stopper.stop()

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self._router(scope, receive, send)  # lifespan; no websockets are served
            return
        body_pending = _announces_body(scope)
        started = False

        async def tracked_receive() -> _Message:
            nonlocal body_pending
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_pending = False
            return message

        async def tracked_send(message: _Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if body_pending and not any(k.lower() == b"connection" for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            method = scope.get("method")
            if method == "CONNECT":
                # A 2xx answer to CONNECT opens a tunnel and has no body (RFC 9110 9.3.6; h11
                # enforces it), so CONNECT is the one request whose envelope comes with a 405.
                await _send_reply(tracked_send, r.error(404, r.API_NOT_FOUND), status=405)
            elif method not in _ALL_METHODS:
                await _send_reply(tracked_send, r.error(404, r.API_NOT_FOUND))
            else:
                await self._router(scope, tracked_receive, tracked_send)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when its graceful shutdown times out. Answer if we
            # still can and end quietly: re-raising would print a traceback per connection.
            logger.debug("a request was cancelled (server shutdown)")
            if not started:
                with contextlib.suppress(Exception):
                    await _send_reply(tracked_send, r.error(503, r.SHUTTING_DOWN))
        except Exception:
            logger.exception("internal error outside the request handler")
            if not started:
                await _send_reply(tracked_send, r.error(500, r.INTERNAL_ERROR))


def create_app(
    store: KeyStore,
    *,
    clock: Callable[[], float] = time.time,
    replay_cache: ReplayCache | None = None,
    body_timeout: float = BODY_TIMEOUT_SECONDS,
) -> KmsApp:
    """The eHSM-compatible application over ``store``.

    Args:
        store: where apps and keys live; the caller keeps ownership (and closes it).
        clock: seconds since the epoch, for timestamps, key dates and expiry (tests inject one).
        replay_cache: defaults to a per-process :class:`MemoryReplayCache` on ``clock``.
        body_timeout: seconds a client may take to send a request body once its headers arrived;
            then it gets a 400 (``request timeout``) and the connection is closed.
    """
    if not body_timeout > 0:
        raise ValueError("body_timeout must be positive")
    service = _Service(store, clock, replay_cache or MemoryReplayCache(clock=clock), body_timeout)
    router = Starlette(
        routes=[
            Route("/ehsm", service.ehsm, methods=_ALL_METHODS),
            Route("/ehsm/", service.ehsm, methods=_ALL_METHODS),
            Route("/{path:path}", service.elsewhere, methods=_ALL_METHODS),
        ]
    )
    return KmsApp(service, router)
