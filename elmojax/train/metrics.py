"""Where a run's numbers go: TensorBoard event files and metrics.jsonl, side by side in the workdir.

metrics.jsonl has one JSON object a line, {"step": N, "train/loss": ..., ...}; a value that is
not finite is written as null (JSON has no NaN), so any JSON reader can take the file.
"""

from __future__ import annotations

import json
import math
import os

from elmojax.train.tensorboard import SummaryWriter

METRICS_FILE = "metrics.jsonl"


def json_value(value):
    """A float for JSON: None where it is NaN or infinite."""
    value = float(value)
    return value if math.isfinite(value) else None


def dumps(obj) -> str:
    """JSON text of `obj` with every non-finite float as null (json.dumps writes NaN, not JSON)."""
    def clean(x):
        if isinstance(x, float):
            return json_value(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), allow_nan=False)


class MetricsWriter:
    """Appends scalars to the workdir's TensorBoard events and to its metrics.jsonl."""

    def __init__(self, workdir: str):
        self._events = SummaryWriter(workdir)
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")

    def scalars(self, step: int, values: dict) -> None:
        self._events.scalars(step, values)
        self._jsonl.write(dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        self._events.close()
        self._jsonl.close()
