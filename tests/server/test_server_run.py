"""Running the server: the foreground process and its signals, ServerThread, the catch-all."""

from __future__ import annotations

import asyncio
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest


from ppml_kms import signing
from ppml_kms.exceptions import ConfigError
from ppml_kms.server.app import create_app
from ppml_kms.server.run import ServerThread, _banner, _certificate_names, prepare_data_dir
from ppml_kms.server.store import KeyRecord, SQLiteKeyStore, open_sqlite_store
from ppml_kms.server.tls import certificate_names, ensure_tls

from .conftest import enroll, spawn_server, stop_server

_LINE = re.compile(
    r"ppml-kms server listening on (https://127\.0\.0\.1:\d+/ehsm) "
    r"\(data: (.+), CA certificate: (.+/tls/cert\.pem)\)"
)


def _read_line(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the server printed nothing"
    return proc.stdout.readline()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signal(tmp_path: Path, signum: int) -> None:
    data = tmp_path / "kms"
    proc = spawn_server(data)
    try:
        line = _read_line(proc)
        match = _LINE.fullmatch(line.strip())
        assert match, line
        url, shown_dir, ca_cert = match.groups()
        assert shown_dir == str(data) and ca_cert == str(data / "tls" / "cert.pem")
        with httpx.Client(verify=ssl.create_default_context(cafile=ca_cert)) as http:
            caller = enroll(http, url)
            caller.create_key()  # something in the write-ahead log
        assert (data / "kms.sqlite3-wal").exists()
    finally:
        stderr = stop_server(proc, signum)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    # SQLite removes the WAL when the last connection closes: the store was closed.
    assert not (data / "kms.sqlite3-wal").exists()
    with open_sqlite_store(data) as store:
        assert len(store.list_keys(caller.appid)) == 1


def test_serve_reports_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = textwrap.dedent(
            f"""
            import sys
            from ppml_kms.exceptions import ConfigError
            from ppml_kms.server.run import serve
            try:
                serve(sys.argv[1], port={port})
            except ConfigError as exc:
                print(exc.diagnostics())
                sys.exit(3)
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "kms")],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 3, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stdout


def test_server_thread_port_and_restart(tmp_path: Path) -> None:
    server = ServerThread(tmp_path / "kms")
    with pytest.raises(RuntimeError):
        server.store  # noqa: B018 - not running yet
    with server:
        assert server.port > 0 and server.url == f"https://127.0.0.1:{server.port}/ehsm"
        assert server.ca_cert == (tmp_path / "kms" / "tls" / "cert.pem").absolute()
        with httpx.Client(verify=server.ssl_context()) as http:
            assert http.get(server.url, params={"Action": "GetVersion"}).json()["code"] == 200
        with pytest.raises(RuntimeError):
            server.start()
    server.stop()  # idempotent
    with socket.socket() as probe:  # the port was released
        probe.bind(("127.0.0.1", server.port))


def test_server_thread_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match="cannot listen"):
            ServerThread(tmp_path / "kms", port=busy.getsockname()[1]).start()


def test_data_dir_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        prepare_data_dir(tmp_path / "file")


def _asgi(app: Any, method: str, action: str, body: Any = None) -> dict[str, Any]:
    """One request straight into the ASGI app (no sockets)."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kms.test") as client:
            return await client.request(method, "/ehsm", params={"Action": action}, json=body)

    response = asyncio.run(go())
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


class _BrokenStore(SQLiteKeyStore):
    def list_keys(self, creator: str, limit: int = 10000) -> list[KeyRecord]:
        raise RuntimeError("simulated failure")


def test_internal_errors_become_code_500(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = open_sqlite_store(tmp_path)
    store = _BrokenStore(tmp_path / "kms.sqlite3", base._domain_key)
    base.close()
    apikey = "A" * 32
    store.add_app("app-1", apikey, 0)
    body = {"appid": "app-1", "timestamp": str(int(time.time() * 1000)), "nonce": "n"}
    body["sign"] = signing.sign(apikey, body)
    reply = _asgi(create_app(store), "POST", "ListKey", body)
    store.close()
    assert reply == {
        "code": 500,
        "message": "Server internal error, please contact the administrator.",
        "result": {},
    }
    assert "simulated failure" in caplog.text and apikey not in caplog.text


def test_database_error_on_apikey_lookup(tmp_path: Path) -> None:
    store = open_sqlite_store(tmp_path)
    app = create_app(store)
    store.close()  # every lookup now fails
    body = {"appid": "app-1", "timestamp": str(int(time.time() * 1000)), "sign": "x"}
    assert _asgi(app, "POST", "ListKey", body) == {
        "code": 400,
        "message": "database error",
        "result": {},
    }
    assert _asgi(app, "GET", "Enroll")["code"] == 500


# -- the listening line names the certificate's names off loopback ---------------------------------


def test_banner_on_loopback_is_unchanged(tmp_path: Path) -> None:
    cert, _ = ensure_tls(tmp_path)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        line = _banner("https://h:1/ehsm", tmp_path, host, cert)
        assert line == (
            f"ppml-kms server listening on https://h:1/ehsm (data: {tmp_path}, "
            f"CA certificate: {cert})"
        )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "kms.example.org"])
def test_banner_off_loopback_lists_the_names(tmp_path: Path, host: str) -> None:
    cert, _ = ensure_tls(tmp_path, _certificate_names(host, ["kms.example.org"]))
    line = _banner("https://h:1/ehsm", tmp_path, host, cert)
    assert "\n" not in line
    names = certificate_names(cert)
    assert line.endswith(
        f"; the certificate covers {', '.join(names)}: clients must connect by one of these "
        "names (add others with --hostname NAME)"
    )
    assert names[:4] == ["localhost", "127.0.0.1", "::1", "kms.example.org"]
    assert (host in names) == (host not in ("0.0.0.0", "::", ""))


def test_serve_on_all_interfaces_prints_the_names(tmp_path: Path) -> None:
    data = tmp_path / "kms"
    proc = spawn_server(data, host="0.0.0.0", hostnames=["kms.example.org"])
    try:
        line = _read_line(proc)
    finally:
        stderr = stop_server(proc)
    assert proc.returncode == 0, stderr
    assert re.fullmatch(
        r"ppml-kms server listening on https://0\.0\.0\.0:\d+/ehsm \(data: .+, CA certificate: "
        r".+/tls/cert\.pem\); the certificate covers localhost, 127\.0\.0\.1, ::1, "
        r"kms\.example\.org: clients must connect by one of these names "
        r"\(add others with --hostname NAME\)\n",
        line,
    ), line


def test_a_second_server_on_the_same_data_dir_is_refused_and_changes_nothing(tmp_path) -> None:
    from ppml_kms.exceptions import ConfigError
    from ppml_kms.server.run import ServerThread

    with ServerThread(tmp_path / "kms") as first:
        cert_before = first.ca_cert.read_bytes()
        second = ServerThread(tmp_path / "kms", hostnames=["kms.example"])
        with pytest.raises(ConfigError, match="already using"):
            second.start()
        assert first.ca_cert.read_bytes() == cert_before


def test_a_failed_bind_leaves_the_certificate_alone(tmp_path) -> None:
    import socket

    from ppml_kms.exceptions import ConfigError
    from ppml_kms.server.run import ServerThread

    with ServerThread(tmp_path / "kms") as server:
        cert = server.ca_cert
    before = cert.read_bytes()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(ConfigError):
            ServerThread(tmp_path / "kms", port=taken, hostnames=["other.example"]).start()
    assert cert.read_bytes() == before
