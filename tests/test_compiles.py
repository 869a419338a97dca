"""A run builds one trainer and compiles each of its steps once: the train step, and the eval
step that the periodic heldout evaluations and the one after training share (JAX's compile log
counts them)."""

import json
import logging
import os
import re

import jax
import pytest

from elmojax.after_training import after_training
from elmojax.train import loop
from elmojax.train.metrics import METRICS_FILE

import tiny


class _Compiles(logging.Handler):
    """The names of the functions JAX compiles while it is attached (jax_log_compiles on)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.match(r"Compiling jit\((\w+)\)", record.getMessage())
        if found:
            self.names.append(found.group(1))


@pytest.mark.slow  # a whole training run
def test_a_run_compiles_its_train_step_and_its_eval_step_once(tmp_path):
    # word inputs: every batch has one shape (character inputs' distinct tokens vary in number)
    config = tiny.get_config("words")
    config.train.update(max_steps=4, eval_every=2, checkpoint_every=4, log_every=2)
    workdir = str(tmp_path / "work")
    compiles, jax_log = _Compiles(), logging.getLogger("jax")
    logged = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    jax_log.addHandler(compiles)
    try:
        run = loop.run_training(config, workdir)
        lines = after_training(run)
    finally:
        jax_log.removeHandler(compiles)
        jax.config.update("jax_log_compiles", logged)
    with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
        evaluated = [record["step"] for record in map(json.loads, f) if "heldout/perplexity" in record]
    assert evaluated == [2, 4] and lines[0].startswith("heldout perplexity"), (evaluated, lines)
    assert compiles.names.count("train_step") == 1, compiles.names
    assert compiles.names.count("eval_step") == 1, compiles.names
