"""A minimal progress bar on stderr (no extra dependency)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints ``desc: 40% 400/1000 [3.1s, 129.0 img/s] extra`` on one refreshed line.

    Disabled instances do nothing, so callers need no ``if verbose`` around calls.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "img"):
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.unit = unit
        self.done = 0
        self.postfix = ""
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = -1  # the count shown by the last draw

    def update(self, n: int, postfix: str | None = None) -> None:
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if self.enabled and (now - self._last_draw > 0.2 or self.done >= self.total):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._drawn = self.done
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        percent = 100 * self.done / self.total if self.total else 100
        line = (
            f"\r{self.desc}: {percent:3.0f}% {self.done}/{self.total} "
            f"[{elapsed:.1f}s, {rate:.1f} {self.unit}/s] {self.postfix}"
        )
        sys.stderr.write(line)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            if self._drawn != self.done:
                self._draw(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
