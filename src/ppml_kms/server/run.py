"""Run the server: :func:`serve` in the foreground, :class:`ServerThread` in the background.

Both prepare the data directory the same way::

    DIR/               mode 0700
      domain.key       the key wrapping every secret in the database (0600)
      kms.sqlite3      apps and keys
      tls/cert.pem     self-signed certificate: clients pass it as their CA (verify=...)
      tls/key.pem      its private key (0600)

and serve the same application over HTTPS with uvicorn, on a socket bound here (so port 0 works and
the real port is known before serving).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import uvicorn

from ppml_kms.exceptions import ConfigError
from ppml_kms.server.app import create_app
from ppml_kms.server.store import KeyStore, SQLiteKeyStore, open_sqlite_store
from ppml_kms.server.tls import ensure_tls

__all__ = ["ServerThread", "prepare_data_dir", "serve"]

logger = logging.getLogger(__name__)

_WILDCARDS = ("", "0.0.0.0", "::")
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


def prepare_data_dir(data_dir: Path | str) -> Path:
    """Create ``data_dir`` (mode 0700) if needed and return it as an absolute path."""
    path = Path(data_dir).expanduser().absolute()
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)
        path.chmod(0o700)  # mkdir's mode is filtered by the umask
    elif not path.is_dir():
        raise ConfigError(f"the data directory {path} is not a directory")
    return path


def _url(host: str, port: int) -> str:
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    shown = f"[{host}]" if literal is not None and literal.version == 6 else host
    return f"https://{shown}:{port}/ehsm"


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _certificate_names(host: str, hostnames: Iterable[str]) -> list[str]:
    names = list(hostnames)
    if host not in _WILDCARDS:
        names.append(host)
    return names


class _Uvicorn(uvicorn.Server):
    """uvicorn's server with a callback once it is accepting connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[_Uvicorn], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started(self)


def _uvicorn_config(
    store: KeyStore, cert: Path, key: Path, clock: Callable[[], float], *, own_logging: bool
) -> uvicorn.Config:
    extra: dict[str, Any] = {} if own_logging else {"log_config": None}
    return uvicorn.Config(
        create_app(store, clock=clock),
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        log_level="warning",
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=5,
        **extra,
    )


@contextlib.contextmanager
def _deferred_stop_signals() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM while uvicorn is not listening for them; yield the signals received.

    uvicorn handles both while it serves, shuts down gracefully, then re-raises the signal it got.
    The handlers installed here receive that re-raise (and anything arriving during startup), so the
    caller can close the store and return normally: exit status 0, no KeyboardInterrupt.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    data_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 9000,
    *,
    ready: Callable[[str], None] | None = None,
    hostnames: Iterable[str] = (),
    clock: Callable[[], float] = time.time,
) -> None:
    """Serve the KMS over HTTPS until SIGINT or SIGTERM, then close the store and return.

    Prints one line once the server accepts connections, then calls ``ready(url)`` if given.

    Args:
        data_dir: the data directory (created 0700 if missing).
        host: address to bind; it is added to the certificate's names unless it is a wildcard.
        port: TCP port; 0 picks a free one (the printed URL shows it).
        ready: called with ``https://HOST:PORT/ehsm`` once serving, on the server's event loop:
            it must return quickly.
        hostnames: extra DNS names or addresses for a newly generated certificate.
        clock: seconds since the epoch (tests only).

    Raises:
        ConfigError: the address cannot be bound, or the TLS files are unusable.
        KeyFileError: the domain key file is malformed.
        KeyStoreError: the database cannot be opened.
    """
    with _deferred_stop_signals() as received:
        path = prepare_data_dir(data_dir)
        cert, key = ensure_tls(path, _certificate_names(host, hostnames))
        sock = _bind(host, port)
        url = _url(host, sock.getsockname()[1])
        banner = f"ppml-kms server listening on {url} (data: {path}, CA certificate: {cert})"

        def started(server: _Uvicorn) -> None:
            if received:  # a stop signal arrived during startup
                server.should_exit = True
                return
            print(banner, flush=True)
            if ready is not None:
                ready(url)

        try:
            with open_sqlite_store(path) as store:
                config = _uvicorn_config(store, cert, key, clock, own_logging=True)
                server = _Uvicorn(config, started)
                if not received:
                    server.run(sockets=[sock])
        finally:
            sock.close()


class ServerThread:
    """The same server on a background thread, for tests and the demo.

    ::

        with ServerThread(tmp_path / "kms") as server:
            httpx.get(server.url + "?Action=GetVersion", verify=server.ssl_context())

    Args:
        data_dir: the data directory (created 0700 if missing; reused if it exists).
        host: address to bind (loopback by default).
        port: TCP port, 0 (default) for a free one; see :attr:`port` and :attr:`url`.
        hostnames: extra certificate names, as for :func:`serve`.
        clock: seconds since the epoch; tests inject one to move time.
    """

    def __init__(
        self,
        data_dir: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        hostnames: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self._requested_port = port
        self._hostnames = tuple(hostnames)
        self._clock = clock
        self._store: SQLiteKeyStore | None = None
        self._sock: socket.socket | None = None
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self.port = 0
        self.ca_cert = self.data_dir / "tls" / "cert.pem"

    @property
    def url(self) -> str:
        """``https://HOST:PORT/ehsm`` (valid once started)."""
        return _url(self.host, self.port)

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts only this server's certificate.

        Pass it as ``httpx.Client(verify=...)``: httpx 0.28 deprecates ``verify=<path>``.
        """
        return ssl.create_default_context(cafile=str(self.ca_cert))

    @property
    def store(self) -> SQLiteKeyStore:
        """The server's key store (tests inspect it)."""
        if self._store is None:
            raise RuntimeError("the server is not running")
        return self._store

    def start(self) -> ServerThread:
        """Start serving; returns once connections are accepted.

        Raises:
            ConfigError, KeyFileError, KeyStoreError: as :func:`serve`.
            RuntimeError: uvicorn did not start.
        """
        if self._thread is not None:
            raise RuntimeError("the server was already started")
        self.data_dir = prepare_data_dir(self.data_dir)
        cert, key = ensure_tls(self.data_dir, _certificate_names(self.host, self._hostnames))
        self.ca_cert = cert
        self._sock = _bind(self.host, self._requested_port)
        self.port = self._sock.getsockname()[1]
        try:
            self._store = open_sqlite_store(self.data_dir)
            config = _uvicorn_config(self._store, cert, key, self._clock, own_logging=False)
            self._server = _Uvicorn(config, lambda _: self._started.set())
            self._thread = threading.Thread(
                target=self._run,
                args=(self._server, self._sock),
                name="ppml-kms-server",
                daemon=True,
            )
            self._thread.start()
            deadline = time.monotonic() + _START_TIMEOUT
            while not self._started.wait(0.05):
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the ppml-kms server did not start") from self._failure
        except BaseException:
            self.stop()
            raise
        return self

    def _run(self, server: _Uvicorn, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - reported by start()/stop(), not lost in a thread
            self._failure = exc
            logger.error("the ppml-kms server thread failed: %r", exc)

    def stop(self) -> None:
        """Stop serving, wait for the thread, close the store. Safe to call twice."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(_STOP_TIMEOUT)
        self._thread = None
        self._server = None
        self._started.clear()
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
