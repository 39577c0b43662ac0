"""Fixtures for the server tests: a real HTTPS server on loopback and a signing test client."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ppml_kms import signing
from ppml_kms.server.run import ServerThread

ABSENT: Any = object()  # "leave this field out of the envelope"


@dataclass
class Caller:
    """Talks to one server as one enrolled app; builds eHSM envelopes the way a client does."""

    http: httpx.Client
    url: str
    appid: str
    apikey: str
    clock: Callable[[], float] = time.time

    def now_ms(self) -> str:
        return str(int(self.clock() * 1000))

    def envelope(
        self,
        payload: Any = ABSENT,
        *,
        nonce: Any = None,
        timestamp: Any = None,
        appid: Any = None,
        apikey: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "appid": self.appid if appid is None else appid,
            "timestamp": self.now_ms() if timestamp is None else timestamp,
            "nonce": uuid.uuid4().hex if nonce is None else nonce,
        }
        if body["nonce"] is ABSENT:
            del body["nonce"]
        if payload is not ABSENT:
            body["payload"] = payload
        body["sign"] = signing.sign(apikey or self.apikey, body)
        return body

    def post(
        self, action: str, body: Any, *, url: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        response = self.http.post(url or self.url, params={"Action": action}, json=body, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def call(self, action: str, payload: Any = ABSENT, **envelope: Any) -> dict[str, Any]:
        url = envelope.pop("url", None)
        return self.post(action, self.envelope(payload, **envelope), url=url)

    def ok(self, action: str, payload: Any = ABSENT, **envelope: Any) -> dict[str, Any]:
        reply = self.call(action, payload, **envelope)
        assert reply["code"] == 200, reply
        assert "success" in reply["message"].lower()
        return reply["result"]  # type: ignore[no-any-return]

    def create_key(self, keyspec: str = "EH_AES_GCM_256", **extra: Any) -> str:
        payload = {"keyspec": keyspec, "origin": "EH_INTERNAL_KEY", **extra}
        return self.ok("CreateKey", payload)["keyid"]  # type: ignore[no-any-return]


def enroll(http: httpx.Client, url: str, clock: Callable[[], float] = time.time) -> Caller:
    response = http.get(url, params={"Action": "Enroll"})
    assert response.status_code == 200
    reply = response.json()
    assert reply["code"] == 200 and reply["message"] == "successful", reply
    return Caller(http, url, reply["result"]["appid"], reply["result"]["apikey"], clock)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(tmp_path_factory.mktemp("kms")) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(verify=server.ssl_context(), timeout=10) as client:
        yield client


@pytest.fixture
def app(http: httpx.Client, server: ServerThread) -> Caller:
    """A freshly enrolled app on the shared server."""
    return enroll(http, server.url)


class FakeClock:
    """A settable clock (seconds), starting at the real time."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clocked_server(tmp_path: Path) -> Iterator[tuple[ServerThread, FakeClock]]:
    clock = FakeClock()
    with ServerThread(tmp_path / "kms", clock=clock) as running:
        yield running, clock


def spawn_server(data_dir: Path, **kwargs: Any) -> subprocess.Popen[str]:
    """``serve(data_dir, port=0, **kwargs)`` in a child process (for signal and exit tests)."""
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    code = f"import sys; from ppml_kms.server.run import serve; serve(sys.argv[1], port=0{extra})"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_server(proc: subprocess.Popen[str], signum: int = signal.SIGTERM) -> str:
    """Send ``signum`` to a spawned server, wait for it (killing it if it hangs); return its stderr."""
    try:
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return stderr
