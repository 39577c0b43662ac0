"""Run the server: :func:`serve` in the foreground, :class:`ServerThread` in the background.

Both prepare the data directory the same way::

    DIR/               mode 0700
      domain.key       the key wrapping every secret in the database (0600)
      kms.sqlite3      apps and keys
      tls/cert.pem     self-signed certificate: clients pass it as their CA (verify=...)
      tls/key.pem      its private key (0600)

and serve the same application over HTTPS with uvicorn, on a socket bound here (so port 0 works and
the real port is known before serving).

Slow or abandoned clients are bounded: a connection must send a complete request head within
``request_timeout`` seconds of connecting (or of its previous answer), and then its body within
``request_timeout`` again (the application answers 400 and closes); idle keep-alive connections
close after 5 s; at most 512 connections/requests are served at once (uvicorn answers 503 beyond).
On SIGINT/SIGTERM the server stops accepting, answers requests whose body stalls, lets running
requests finish for up to 5 s, and returns without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import math
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ppml_kms.exceptions import ConfigError
from ppml_kms.server.app import KmsApp, create_app
from ppml_kms.server.store import KeyStore, SQLiteKeyStore, open_sqlite_store
from ppml_kms.server.tls import certificate_names, ensure_tls

__all__ = ["REQUEST_TIMEOUT_SECONDS", "ServerThread", "prepare_data_dir", "serve"]

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_SECONDS = 30.0  # for a request's head, then again for its body
_CONCURRENCY_LIMIT = 512  # connections or requests at once; uvicorn answers 503 beyond
_KEEP_ALIVE_SECONDS = 5  # Node's default keepAliveTimeout, as eHSM has
_GRACEFUL_SHUTDOWN_SECONDS = 5
_CLOSE_LINGER_SECONDS = 2.0  # then a connection whose peer does not finish the TLS close is aborted
_WILDCARDS = ("", "0.0.0.0", "::")
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


def _check_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"invalid port {port!r}: use 0 to 65535 (0 picks a free port)")
    return port


def _check_timeout(seconds: float) -> float:
    if isinstance(seconds, bool) or not (
        isinstance(seconds, (int, float)) and 0 < seconds < math.inf
    ):
        raise ConfigError(f"invalid request timeout {seconds!r}: use a positive number of seconds")
    return float(seconds)


def lock_data_dir(path: Path) -> int:
    """Take the data directory's exclusive lock (``DIR/server.lock``); returns the fd to keep open.

    One server process per data directory: SQLite and the in-memory replay cache are per
    process. A second server, or a failed start, must not touch a live server's files.

    Raises:
        ConfigError: another ppml-kms server holds the lock.
    """
    fd = os.open(path / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another ppml-kms server is already using {path}") from None
    return fd


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


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _banner(url: str, data_dir: Path, host: str, cert: Path) -> str:
    """The line printed once serving; off loopback it says which names the certificate covers."""
    line = f"ppml-kms server listening on {url} (data: {data_dir}, CA certificate: {cert})"
    if not _is_loopback(host):
        names = ", ".join(certificate_names(cert))
        line += (
            f"; the certificate covers {names}: clients must connect by one of these names "
            "(add others with --hostname NAME)"
        )
    return line


class _LingeringTransport:
    """A transport whose ``close()`` becomes ``abort()`` if the peer is not gone ``linger`` s later.

    Closing a TLS connection waits for the peer's close_notify (asyncio waits up to 30 s): a client
    that never reads would keep its connection that long after its answer, and make a graceful
    shutdown wait for it. Everything else is delegated to the wrapped transport.
    """

    def __init__(
        self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, linger: float
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._linger = linger
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._gone = False

    def close(self) -> None:
        # Once only: asyncio's TLS transport forgets its protocol on a second close(), after which
        # abort() fails (and uvicorn closes again, e.g. on shutdown).
        if self._closed:
            return
        self._closed = True
        self._transport.close()
        if not self._gone:
            self._timer = self._loop.call_later(self._linger, self._abort)

    def abort(self) -> None:
        self._closed = True
        self._abort()

    def _abort(self) -> None:
        self._timer = None
        if not self._gone:
            self._transport.abort()

    def gone(self) -> None:
        """The connection is lost: nothing left to abort."""
        self._gone = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with bounded waits for clients that stall.

    * A connection must send a complete request head within ``header_timeout`` seconds of
      connecting or of its previous answer, else it is aborted: uvicorn itself only times out the
      idle wait between requests, so a client that sends nothing after the TLS handshake, or
      trickles its request line and headers, would keep its connection (and file descriptor)
      forever. The body that follows the head is timed by the application.
    * A closed connection whose peer does not finish the TLS close within a short linger is
      aborted (see :class:`_LingeringTransport`).
    """

    header_timeout: float = REQUEST_TIMEOUT_SECONDS
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        lingering = _LingeringTransport(transport, self.loop, _CLOSE_LINGER_SECONDS)
        super().connection_made(lingering)  # type: ignore[arg-type]
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # for the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)
        if isinstance(self.transport, _LingeringTransport):
            self.transport.gone()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # IDLE: no complete request head yet (a request in progress is SEND_BODY or DONE).
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.debug(
                "aborting a connection that sent no request in %gs", self.header_timeout
            )
            self.transport.abort()


def _http_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    return type("TimedH11Protocol", (_TimedH11Protocol,), {"header_timeout": header_timeout})


class _Uvicorn(uvicorn.Server):
    """uvicorn's server with a callback once it is accepting connections.

    On shutdown it first tells the application to stop waiting for request bodies, so stalled
    clients get their answer at once instead of being cancelled (with a traceback each) when the
    graceful shutdown times out.
    """

    def __init__(
        self, config: uvicorn.Config, app: KmsApp, on_started: Callable[[_Uvicorn], None]
    ) -> None:
        super().__init__(config)
        self._app = app
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started(self)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._app.stop_reading()
        await super().shutdown(sockets=sockets)


def _uvicorn_config(
    app: KmsApp, cert: Path, key: Path, request_timeout: float, *, own_logging: bool
) -> uvicorn.Config:
    extra: dict[str, Any] = {} if own_logging else {"log_config": None}
    return uvicorn.Config(
        app,
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        http=_http_protocol(request_timeout),
        ws="none",  # plain HTTP only: an Upgrade request is answered like any other
        log_level="warning",
        lifespan="off",
        server_header=False,
        limit_concurrency=_CONCURRENCY_LIMIT,
        timeout_keep_alive=_KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
        **extra,
    )


def _start_uvicorn(
    store: KeyStore,
    cert: Path,
    key: Path,
    clock: Callable[[], float],
    request_timeout: float,
    on_started: Callable[[_Uvicorn], None],
    *,
    own_logging: bool,
) -> _Uvicorn:
    app = create_app(store, clock=clock, body_timeout=request_timeout)
    config = _uvicorn_config(app, cert, key, request_timeout, own_logging=own_logging)
    return _Uvicorn(config, app, on_started)


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
    request_timeout: float = REQUEST_TIMEOUT_SECONDS,
) -> None:
    """Serve the KMS over HTTPS until SIGINT or SIGTERM, then close the store and return.

    Prints one line once the server accepts connections, then calls ``ready(url)`` if given.
    When ``host`` is not a loopback address, the line also lists the names the certificate covers
    (clients must connect by one of them) and hints at ``--hostname``.

    Args:
        data_dir: the data directory (created 0700 if missing).
        host: address to bind; it is added to the certificate's names unless it is a wildcard.
        port: TCP port, 0 to 65535; 0 picks a free one (the printed URL shows it).
        ready: called with ``https://HOST:PORT/ehsm`` once serving, on the server's event loop:
            it must return quickly.
        hostnames: extra DNS names or addresses the certificate must cover; an existing
            certificate that lacks one is re-issued (see :func:`~ppml_kms.server.tls.ensure_tls`).
        clock: seconds since the epoch (tests only).
        request_timeout: seconds a client may take to send a request head, then its body.

    Raises:
        ConfigError: the port is out of range, the address cannot be bound, or the TLS files are
            unusable.
        KeyFileError: the domain key file is malformed, or missing beside a database with keys.
        KeyStoreError: the database cannot be opened, or the domain key does not match it.
    """
    _check_port(port)
    request_timeout = _check_timeout(request_timeout)
    hostnames = tuple(hostnames)
    with _deferred_stop_signals() as received:
        path = prepare_data_dir(data_dir)
        lock = lock_data_dir(path)
        try:
            sock = _bind(host, port)  # before the certificate: a failed start changes no file
        except BaseException:
            os.close(lock)
            raise
        try:
            cert, key = ensure_tls(path, _certificate_names(host, hostnames))
        except BaseException:
            sock.close()
            os.close(lock)
            raise
        url = _url(host, sock.getsockname()[1])
        banner = _banner(url, path, host, cert)

        def started(server: _Uvicorn) -> None:
            if received:  # a stop signal arrived during startup
                server.should_exit = True
                return
            print(banner, flush=True)
            if ready is not None:
                ready(url)

        try:
            with open_sqlite_store(path) as store:
                server = _start_uvicorn(
                    store, cert, key, clock, request_timeout, started, own_logging=True
                )
                if not received:
                    server.run(sockets=[sock])
        finally:
            sock.close()
            os.close(lock)


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
        request_timeout: as for :func:`serve`.

    Raises:
        ConfigError: ``port`` is out of range or ``request_timeout`` is not positive.
    """

    def __init__(
        self,
        data_dir: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        hostnames: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self._requested_port = _check_port(port)
        self._hostnames = tuple(hostnames)
        self._clock = clock
        self._request_timeout = _check_timeout(request_timeout)
        self._store: SQLiteKeyStore | None = None
        self._sock: socket.socket | None = None
        self._lock: int | None = None
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
        self._lock = lock_data_dir(self.data_dir)
        try:
            self._sock = _bind(self.host, self._requested_port)
            self.port = self._sock.getsockname()[1]
            cert, key = ensure_tls(self.data_dir, _certificate_names(self.host, self._hostnames))
            self.ca_cert = cert
            self._store = open_sqlite_store(self.data_dir)
            self._server = _start_uvicorn(
                self._store,
                cert,
                key,
                self._clock,
                self._request_timeout,
                lambda _: self._started.set(),
                own_logging=False,
            )
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
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
