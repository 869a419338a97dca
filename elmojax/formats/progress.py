"""A progress bar on stderr for long jobs: downloads (formats.remote) and dumps (infer.dumps).

It is tqdm's, shown only where stderr is a terminal: in a log file or a pipe (a batch job, a
test) nothing is written, so the output holds no carriage returns and no half-drawn lines.
"""

from __future__ import annotations

import sys
from typing import Optional

from tqdm import tqdm


def is_terminal(stream) -> bool:
    """Whether `stream` is a terminal (something without isatty, or closed, is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


_PREFIXES = {1e3: "k", 1e6: "M", 1e9: "G"}


class Progress:
    """A bar on stderr of how much of `total` (None: not known) is done, how fast and how long
    the rest will take; closed (its last state left on screen) when all is done. `unit`: what is
    counted, `scale` its size (1e6 and " MB" for bytes: amounts shown with SI prefixes, here
    "12.3M/45.6MB"). Silent unless `enabled` and stderr is a terminal."""

    def __init__(self, what: str, total: Optional[int], enabled: bool = True, scale: float = 1.0, unit: str = ""):
        self._bar: Optional[tqdm] = None
        if enabled and is_terminal(sys.stderr):
            name, prefix = unit.strip(), _PREFIXES.get(scale, "")
            if prefix and name.startswith(prefix):
                name = name[len(prefix):]  # tqdm chooses the prefix itself (k, M, G)
            self._bar = tqdm(total=total, desc=what, unit=name or "it", unit_scale=True, unit_divisor=1000,
                             file=sys.stderr, dynamic_ncols=True, leave=True)

    def update(self, done: int, last: bool = False) -> None:
        """`done` of the total so far; `last`: nothing more comes."""
        if self._bar is None:
            return
        self._bar.update(done - self._bar.n)
        if last or (self._bar.total is not None and done >= self._bar.total):
            self._bar.close()
            self._bar = None  # the bar is ended

    def done(self, done: int) -> None:
        """The bar's final state (if it is shown and not yet ended), and its end."""
        self.update(done, last=True)
