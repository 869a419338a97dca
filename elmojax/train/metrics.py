"""Where a run's numbers go: TensorBoard event files and metrics.jsonl, side by side in the workdir.

metrics.jsonl has one JSON object a line, {"step": N, "time": UNIX_SECONDS, "train/loss": ...,
...}; a value that is not finite is written as null (JSON has no NaN), so any JSON reader can
take the file; a yes-or-no value (heldout/blown_up) is a JSON boolean there and 0 or 1 in
TensorBoard. TensorBoard's events carry their own wall time.
"""

from __future__ import annotations

import json
import math
import os
import time

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


def heldout_scalars(result, health) -> dict:
    """A heldout evaluation's metrics: perplexity overall and by direction, the training data's
    unigram perplexity (the baseline; where known) and whether the model blew up, from an
    evaluation.HeldoutResult and its evaluation.Health."""
    values = {"perplexity": result.perplexity, "forward_perplexity": result.forward_perplexity,
              "backward_perplexity": result.backward_perplexity, "unigram_perplexity": result.unigram_perplexity}
    out = {f"heldout/{name}": value for name, value in values.items() if value is not None}
    if health is not None:
        out["heldout/blown_up"] = health.verdict == "broken"
    return out


class MetricsWriter:
    """Appends scalars to the workdir's TensorBoard events and to its metrics.jsonl."""

    def __init__(self, workdir: str):
        self._events = SummaryWriter(workdir)
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")

    def scalars(self, step: int, values: dict) -> None:
        """One line of `values` ({name: number or bool}) at `step`, stamped with the time now."""
        now = time.time()
        self._events.scalars(step, {k: float(v) for k, v in values.items()}, wall_time=now)
        line = {"step": int(step), "time": now, **{k: v if isinstance(v, bool) else float(v) for k, v in values.items()}}
        self._jsonl.write(dumps(line) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        self._events.close()
        self._jsonl.close()
