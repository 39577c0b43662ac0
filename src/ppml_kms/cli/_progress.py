"""A small progress bar on stderr for long file work; silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

__all__ = ["Progress"]

#: Below this many bytes of input, work is quick enough to need no bar.
MIN_BYTES = 32 << 20


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class Progress:
    """Thread-safe byte counter that redraws one status line a few times a second.

    Use as a context manager; call the instance with a byte count from any thread.
    """

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None, enabled: bool | None = None):
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = total >= MIN_BYTES and getattr(self.stream, "isatty", lambda: False)()
        self.enabled = enabled
        self.done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n  # int += under the GIL; a lost update would only delay the bar

    def println(self, text: str) -> None:
        """Print a line on stdout without mixing it into the bar's line."""
        with self._lock:
            if self._thread is not None:
                self.stream.write("\r\033[K")
                self.stream.flush()
            print(text, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        done = min(self.done, self.total)
        fraction = done / self.total
        width = 24
        bar = "#" * int(fraction * width)
        return (
            f"\r{self.label} [{bar:<{width}}] {fraction * 100:5.1f}% "
            f"{_size(done)} / {_size(self.total)}  {_size(done / elapsed)}/s "
        )

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            with self._lock:
                self.stream.write(self.line())
                self.stream.flush()

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="ppml-kms-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.stream.write(self.line() + "\n")
            self.stream.flush()
