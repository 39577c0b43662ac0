"""Hostile or odd clients: unknown methods, non-UTF-8 text, deep nesting, slow and vanishing
clients, shutdown with stalled connections, port range."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest


from ppml_kms.exceptions import ConfigError
from ppml_kms.server.app import MAX_JSON_DEPTH, KmsApp, _plain_json, create_app
from ppml_kms.server.run import ServerThread
from ppml_kms.server.store import open_sqlite_store

from .conftest import spawn_server, Caller

NOT_FOUND = {"code": 404, "message": "API Not Found", "result": {}}
INVALID_JSON = {"code": 400, "message": "Invalid JSON", "result": {}}


# -- helpers ---------------------------------------------------------------------------------------


def connect(server: ServerThread) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1")


def read_until_closed(sock: ssl.SSLSocket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Everything the server sends before closing; and whether it closed within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, socket.timeout):
        return data, False
    except (ConnectionResetError, ssl.SSLError):
        pass
    return data, True


def read_response(sock: ssl.SSLSocket, timeout: float = 5.0) -> bytes:
    """One response (head and Content-Length body), leaving the connection open."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    match = re.search(rb"content-length: (\d+)", data, re.I)
    assert match, data
    length = int(match.group(1))
    while len(data.partition(b"\r\n\r\n")[2]) < length:
        data += sock.recv(65536)
    return data


def parse(response: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return status, headers, json.loads(body) if body else None


def request_head(method: str, action: str = "ListKey", **headers: str | int) -> bytes:
    lines = [f"{method} /ehsm?Action={action} HTTP/1.1", "Host: kms.test"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def asgi(app: Any, method: str, content: bytes | None = None, **headers: str) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kms.test") as client:
            return await client.request(
                method, "/ehsm", params={"Action": "ListKey"}, content=content, headers=headers
            )

    return asyncio.run(go())


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.ERROR or record.exc_info is not None
    ]


@pytest.fixture
def quick_server(tmp_path: Path) -> Iterator[ServerThread]:
    """A server whose clients get 0.5 s for a request head, then 0.5 s for its body."""
    with ServerThread(tmp_path / "kms", request_timeout=0.5) as running:
        yield running


@pytest.fixture
def app_only(tmp_path: Path) -> Iterator[KmsApp]:
    with open_sqlite_store(tmp_path) as store:
        yield create_app(store)


# -- 2. every request that reaches the application gets HTTP 200 and the envelope ------------------


@pytest.mark.parametrize("method", ["TRACE", "FOO", "PROPFIND", "MKCOL", "LOCK"])
def test_unknown_methods_get_the_envelope(
    server: ServerThread, http: httpx.Client, method: str
) -> None:
    for url in (server.url, server.url + "/", server.url.replace("/ehsm", "/elsewhere")):
        response = http.request(method, url, params={"Action": "GetVersion"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json() == NOT_FOUND
    # With a body too, and the connection stays usable.
    response = http.request(method, server.url, content=b"<xml/>")
    assert (response.status_code, response.json()) == (200, NOT_FOUND)
    assert http.get(server.url, params={"Action": "GetVersion"}).json()["code"] == 200


@pytest.mark.parametrize("method", ["TRACE", "FOO", "PROPFIND"])
def test_unknown_methods_in_the_application(app_only: KmsApp, method: str) -> None:
    response = asgi(app_only, method)
    assert (response.status_code, response.json()) == (200, NOT_FOUND)


def test_connect_gets_the_envelope_with_405(server: ServerThread) -> None:
    # A 2xx answer to CONNECT would open a tunnel and cannot carry a body (RFC 9110 9.3.6).
    with connect(server) as sock:
        sock.sendall(request_head("CONNECT", "GetVersion"))
        data, closed = read_until_closed(sock)
    status, headers, body = parse(data)
    assert (status, body) == (405, NOT_FOUND)
    assert headers["content-type"] == "application/json" and closed


def test_failures_outside_the_handler_are_json(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("router exploded")

    response = asgi(KmsApp(None, broken), "GET")  # type: ignore[arg-type]
    assert response.status_code == 200
    assert response.json() == {
        "code": 500,
        "message": "Server internal error, please contact the administrator.",
        "result": {},
    }
    assert "router exploded" in caplog.text


# -- 3. lone surrogates and deep nesting are Invalid JSON, without a traceback ---------------------


def _post_raw(caller: Caller, text: str) -> dict[str, Any]:
    response = caller.http.post(
        caller.url,
        params={"Action": "ListKey"},
        content=text.encode("ascii"),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("field", ["appid", "nonce", "timestamp", "sign", "payload", "key"])
def test_lone_surrogates_are_invalid_json(
    app: Caller, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    body = app.envelope({"keyid": "x"})
    lone = "x\\ud800y"
    text = json.dumps(body)
    if field == "payload":
        text = text.replace('"keyid": "x"', f'"keyid": "{lone}"')
    elif field == "key":
        text = text.replace('"keyid"', f'"{lone}"')
    else:
        text = text.replace(f'"{field}": "', f'"{field}": "{lone}', 1)
    assert lone in text
    assert _post_raw(app, text) == INVALID_JSON
    assert _post_raw(app, text.replace(lone, "x\\udfffy")) == INVALID_JSON
    assert errors_logged(caplog) == []


def test_valid_surrogate_pairs_are_text(app: Caller) -> None:
    # An escaped pair is one character (U+1F600): valid JSON text, signed as UTF-8.
    nonce = "\U0001f600"
    body = app.envelope(nonce=nonce)
    reply = _post_raw(app, json.dumps(body))  # ensure_ascii: sent as "\ud83d\ude00"
    assert reply["code"] == 200, reply


def test_deep_nesting_is_invalid_json(app: Caller, caplog: pytest.LogCaptureFixture) -> None:
    deep = "[" * 500 + "]" * 500
    text = json.dumps(app.envelope({"keyid": "PLACEHOLDER"})).replace('"PLACEHOLDER"', deep)
    assert _post_raw(app, text) == INVALID_JSON
    deeper = "[" * 50_000 + "]" * 50_000  # beyond what json.loads itself can nest
    assert _post_raw(app, deeper) == INVALID_JSON
    assert errors_logged(caplog) == []


def test_depth_limit_boundary(app: Caller) -> None:
    def nested(depth: int) -> str:  # a top-level array nesting ``depth`` containers
        return "[" * depth + "]" * depth

    # A top-level array is accepted like Express does (it has no appid).
    assert _post_raw(app, nested(MAX_JSON_DEPTH))["message"] == "Missing required parameters"
    assert _post_raw(app, nested(MAX_JSON_DEPTH + 1)) == INVALID_JSON
    assert _plain_json({"a": {"b": [1, "x", None]}})
    assert not _plain_json({"a": [[[]]]}, max_depth=3)
    assert _plain_json({"a": [["x"]]}, max_depth=3)


# -- 4. slow, abandoned and vanishing clients ------------------------------------------------------


def test_stalled_body_times_out(
    quick_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    body = b'{"appid": "a", "timestamp": "1"}'
    with connect(quick_server) as sock:
        started = time.monotonic()
        head = request_head("POST", content_type="application/json", content_length=len(body))
        sock.sendall(head)
        sock.sendall(body[:10])  # ... and never the rest
        data, closed = read_until_closed(sock)
        elapsed = time.monotonic() - started
    status, headers, reply = parse(data)
    assert (status, reply) == (200, {"code": 400, "message": "request timeout", "result": {}})
    assert headers["connection"] == "close" and closed
    assert 0.4 < elapsed < 5
    assert errors_logged(caplog) == []


def test_complete_body_within_the_timeout(quick_server: ServerThread) -> None:
    body = b'{"appid": "a"}'
    with connect(quick_server) as sock:
        head = request_head("POST", content_type="application/json", content_length=len(body))
        sock.sendall(head)
        time.sleep(0.1)
        sock.sendall(body)
        status, headers, reply = parse(read_response(sock))
        assert (status, reply["message"]) == (200, "Missing required parameters")
        assert "connection" not in headers  # the connection stays open for the next request
        sock.sendall(request_head("GET", "GetVersion"))
        assert parse(read_response(sock))[2]["code"] == 200


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /ehsm?Action=ListKey HTTP/1.1\r\nHost: kms.test\r\n"],
    ids=["nothing", "partial-head"],
)
def test_stalled_request_head_is_dropped(quick_server: ServerThread, sent: bytes) -> None:
    with connect(quick_server) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        data, closed = read_until_closed(sock)
    assert data == b"" and closed
    assert time.monotonic() - started < 5


def test_unread_body_closes_the_connection(server: ServerThread) -> None:
    # Not JSON-typed: answered without reading the body, so the connection cannot be reused.
    with connect(server) as sock:
        sock.sendall(request_head("POST", content_type="text/plain", content_length=1000) + b"abc")
        data, closed = read_until_closed(sock)
    status, headers, reply = parse(data)
    assert (status, reply["message"]) == (200, "Missing required parameters")
    assert headers["connection"] == "close" and closed


def test_client_leaving_mid_body_is_not_an_error(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ppml_kms.server.app")
    sock = connect(server)
    sock.sendall(request_head("POST", content_type="application/json", content_length=100))
    sock.sendall(b'{"appid": ')
    time.sleep(0.2)
    sock.close()
    deadline = time.monotonic() + 10
    while "went away" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "the client went away while sending Action='ListKey'" in caplog.text
    assert errors_logged(caplog) == []
    assert "ClientDisconnect" not in caplog.text and "Traceback" not in caplog.text


def test_cancelled_request_ends_quietly(caplog: pytest.LogCaptureFixture) -> None:
    sent: list[dict[str, Any]] = []

    async def stuck(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(3600)

    async def go() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "headers": [], "path": "/ehsm"}
        guard = KmsApp(None, stuck)  # type: ignore[arg-type]
        task = asyncio.create_task(guard(scope, receive, send))
        await asyncio.sleep(0.01)
        task.cancel()  # what uvicorn does when its graceful shutdown times out
        await task  # no CancelledError escapes to uvicorn (it would log a traceback)

    asyncio.run(go())
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"]) == {
        "code": 503,
        "message": "Server is shutting down",
        "result": {},
    }
    assert errors_logged(caplog) == []


_LINE = re.compile(r"ppml-kms server listening on https://127\.0\.0\.1:(\d+)/ehsm ")


def test_sigterm_with_stalled_clients_is_quiet(tmp_path: Path) -> None:
    data = tmp_path / "kms"
    proc = spawn_server(data)
    socks: list[ssl.SSLSocket] = []
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the server printed nothing"
        match = _LINE.match(proc.stdout.readline())
        assert match
        context = ssl.create_default_context(cafile=str(data / "tls" / "cert.pem"))
        head = request_head("POST", content_type="application/json", content_length=100)
        for _ in range(40):
            raw = socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=10)
            sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(head + b'{"appid": ')
            socks.append(sock)
        idle = context.wrap_socket(
            socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=10),
            server_hostname="127.0.0.1",
        )
        socks.append(idle)  # connected, sent nothing
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        answer, _ = read_until_closed(socks[0])
        _, stderr = proc.communicate(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert stderr == ""  # no traceback, no CancelledError, no "graceful shutdown exceeded"
    assert elapsed < 5  # stalled bodies were answered, not waited for
    status, headers, reply = parse(answer)
    assert status == 200
    assert reply == {"code": 503, "message": "Server is shutting down", "result": {}}


# -- 5. the port range -----------------------------------------------------------------------------


@pytest.mark.parametrize("port", [-1, 65536, 99999, True, "9000", 9000.0])
def test_server_thread_port_out_of_range(tmp_path: Path, port: Any) -> None:
    with pytest.raises(ConfigError, match=r"invalid port .*: use 0 to 65535"):
        ServerThread(tmp_path / "kms", port=port)


@pytest.mark.parametrize("port", ["-1", "65536", "99999"])
def test_serve_port_out_of_range(tmp_path: Path, port: str) -> None:
    # In a subprocess: a serve() that wrongly accepted the port would serve forever.
    code = (
        "import sys\n"
        "from ppml_kms.exceptions import ConfigError\n"
        "from ppml_kms.server.run import serve\n"
        "try:\n"
        "    serve(sys.argv[1], port=int(sys.argv[2]))\n"
        "except ConfigError as exc:\n"
        "    print(exc.diagnostics())\n"
        "    sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "kms"), port],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout == f"invalid port {port}: use 0 to 65535 (0 picks a free port)\n"
    assert not (tmp_path / "kms").exists()  # refused before anything was created


def test_request_timeout_must_be_positive(tmp_path: Path) -> None:
    for bad in (0, -1.0, float("nan"), float("inf"), True, "30"):
        with pytest.raises(ConfigError, match="request timeout"):
            ServerThread(tmp_path / "kms", request_timeout=bad)
