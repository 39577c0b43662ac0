"""Shared fixtures: a real HTTPS KMS server on loopback, enrolled apps, the CLI in-process."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ppml_kms.kms import EhsmClient, KmsConfig
from ppml_kms.kms.config import write_credentials_file
from ppml_kms.server.run import ServerThread

_KMS_ENV = (
    "PPML_KMS_URL",
    "PPML_KMS_APPID",
    "PPML_KMS_APIKEY",
    "PPML_KMS_CA_CERT",
    "PPML_KMS_CREDENTIALS",
    "APPID",
    "APIKEY",
)


@pytest.fixture(autouse=True)
def _clean_kms_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test sees the developer's own KMS settings or credentials file."""
    for name in _KMS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg")))


@pytest.fixture(scope="session")
def kms_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(tmp_path_factory.mktemp("kms-data")) as server:
        yield server


@dataclass
class App:
    """One enrolled application on the test server."""

    url: str
    appid: str
    apikey: str
    ca_cert: str
    credentials_file: str

    def config(self, **overrides: object) -> KmsConfig:
        fields = dict(
            url=self.url,
            appid=self.appid,
            apikey=self.apikey,
            ca_cert=self.ca_cert,
            credentials_file=self.credentials_file,
        )
        fields.update(overrides)
        return KmsConfig(**fields)  # type: ignore[arg-type]

    def client(self) -> EhsmClient:
        return EhsmClient(self.url, self.appid, self.apikey, ca_cert=self.ca_cert)

    def env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PPML_KMS_URL", self.url)
        monkeypatch.setenv("PPML_KMS_APPID", self.appid)
        monkeypatch.setenv("PPML_KMS_APIKEY", self.apikey)
        monkeypatch.setenv("PPML_KMS_CA_CERT", self.ca_cert)


def enroll_app(server: ServerThread) -> App:
    with EhsmClient(server.url, ca_cert=str(server.ca_cert)) as client:
        appid, apikey = client.enroll()
    credentials = Path(tempfile.mkdtemp(prefix="ppml-kms-test-")) / "credentials"
    write_credentials_file(credentials, {"PPML_KMS_APPID": appid, "PPML_KMS_APIKEY": apikey})
    return App(server.url, appid, apikey, str(server.ca_cert), str(credentials))


@pytest.fixture
def app(kms_server: ServerThread) -> App:
    return enroll_app(kms_server)


@pytest.fixture
def client(app: App) -> Iterator[EhsmClient]:
    with app.client() as c:
        yield c


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Run ``ppml-kms ARGS...`` in-process; returns exit code and captured output."""
    from ppml_kms.cli import main

    def run(*args: str | os.PathLike[str]) -> CliResult:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors and --help
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def tree(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
