"""eHSM's replay cache (``docs/ehsm-compat.md`` §2.4).

Per appid, the server remembers ``(nonce, timestamp)`` of recent requests for 20 minutes. A
request is a replay when the cache already holds *an* entry with the same nonce **and** *an* entry
with the same timestamp (not necessarily the same entry). An absent nonce equals an absent nonce,
so two nonce-less requests of one appid in the same millisecond collide; an empty-string nonce is
not absent.

Unlike eHSM, which records a request before checking its signature, the server here only records
requests whose signature verified, so unsigned junk cannot fill or poison the cache.
``record()`` checks again under the lock, so two copies of one request racing each other cannot
both pass.

The in-memory cache is per process, like eHSM's; a shared (PostgreSQL) cache implements the same
:class:`ReplayCache` protocol.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["NONCE_CACHE_SECONDS", "MemoryReplayCache", "ReplayCache"]

NONCE_CACHE_SECONDS = 20 * 60  # eHSM's NONCE_CACHE_TIME
_FULL_SWEEP_SECONDS = 60.0


class ReplayCache(Protocol):
    """Where the server remembers recent ``(nonce, timestamp)`` pairs per appid."""

    def seen(self, appid: str, nonce: str | None, timestamp: str) -> bool:
        """Whether a request with these values would be a replay (no side effect)."""
        ...

    def record(self, appid: str, nonce: str | None, timestamp: str) -> bool:
        """Atomically check and remember a verified request; ``False`` if it is a replay."""
        ...


@dataclass
class _AppEntries:
    entries: deque[tuple[float, str | None, str]] = field(default_factory=deque)
    nonces: Counter[str | None] = field(default_factory=Counter)
    timestamps: Counter[str] = field(default_factory=Counter)

    def purge(self, cutoff: float) -> None:
        while self.entries and self.entries[0][0] <= cutoff:
            _, nonce, timestamp = self.entries.popleft()
            self.nonces[nonce] -= 1
            if self.nonces[nonce] == 0:
                del self.nonces[nonce]
            self.timestamps[timestamp] -= 1
            if self.timestamps[timestamp] == 0:
                del self.timestamps[timestamp]

    def collides(self, nonce: str | None, timestamp: str) -> bool:
        return nonce in self.nonces and timestamp in self.timestamps


class MemoryReplayCache:
    """A thread-safe in-memory :class:`ReplayCache`; entries expire ``ttl`` seconds after recording.

    ``clock`` gives seconds (``time.time``); tests inject one to move time.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.time, ttl: float = NONCE_CACHE_SECONDS
    ) -> None:
        self._clock = clock
        self._ttl = ttl
        self._lock = threading.Lock()
        self._apps: dict[str, _AppEntries] = {}
        self._last_sweep = clock()

    def _entries(self, appid: str, now: float) -> _AppEntries | None:
        # Caller holds the lock. Purge this appid, and now and then every appid, so memory stays
        # bounded by the traffic of the last 20 minutes.
        cutoff = now - self._ttl
        if now - self._last_sweep >= _FULL_SWEEP_SECONDS:
            self._last_sweep = now
            for key in list(self._apps):
                self._apps[key].purge(cutoff)
                if not self._apps[key].entries:
                    del self._apps[key]
        app = self._apps.get(appid)
        if app is not None:
            app.purge(cutoff)
        return app

    def seen(self, appid: str, nonce: str | None, timestamp: str) -> bool:
        with self._lock:
            app = self._entries(appid, self._clock())
            return app is not None and app.collides(nonce, timestamp)

    def record(self, appid: str, nonce: str | None, timestamp: str) -> bool:
        with self._lock:
            now = self._clock()
            app = self._entries(appid, now)
            if app is None:
                app = self._apps[appid] = _AppEntries()
            elif app.collides(nonce, timestamp):
                return False
            app.entries.append((now, nonce, timestamp))
            app.nonces[nonce] += 1
            app.timestamps[timestamp] += 1
            return True
