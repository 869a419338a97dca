"""A one-line progress report on stderr for long jobs: downloads (formats.remote) and dumps."""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """A line on stderr, renewed at most once a second, of how much of `total` (None: not
    known) is done, how fast and how long the rest will take; the line is ended when all is done.
    `scale`, `unit`: amounts shown in units (1e6 and " MB" for bytes). Silent unless `enabled`."""

    def __init__(self, what: str, total: Optional[int], enabled: bool = True, scale: float = 1.0, unit: str = ""):
        self.what, self.total, self.scale, self.unit = what, total, scale, unit
        self.enabled = enabled
        self.start = self.last = time.monotonic()

    def update(self, done: int, last: bool = False) -> None:
        """`done` of the total so far; `last`: nothing more comes."""
        now = time.monotonic()
        last = last or (self.total is not None and done >= self.total)
        if not self.enabled or (now - self.last < 1.0 and not last):
            return
        self.last = now
        sys.stderr.write(f"\r{self._line(done, now - self.start)} ")
        if last:
            sys.stderr.write("\n")
            self.enabled = False  # the line is ended
        sys.stderr.flush()

    def done(self, done: int) -> None:
        """The final line (if the report has shown one and not yet ended it)."""
        self.update(done, last=True)

    def _line(self, done: int, seconds: float) -> str:
        scale, unit, total = self.scale, self.unit, self.total
        rate = done / max(seconds, 1e-9)
        amount = f"{done / scale:.0f}/{total / scale:.0f}{unit} ({100 * done / total:.0f}%)" if total else \
            f"{done / scale:.0f}{unit}"
        line = f"{self.what}: {amount}, {rate / scale:.{0 if scale == 1 else 1}f}{unit}/s"
        if total:
            left = (total - done) / rate if rate > 0 else float("inf")
            line += f", {left:.0f}s left"
        return line
