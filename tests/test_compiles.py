"""A run builds one trainer and compiles each of its steps once: the train step (for character
inputs, in the one or two char layouts it will meet, before the first step), and the eval step
that the periodic heldout evaluations and the one after training share (JAX's compile log counts
them)."""

import json
import logging
import os
import re

import jax
import numpy as np
import pytest

from elmojax.after_training import after_training
from elmojax.model.char_ids import distinct_tokens, trim_char_ids
from elmojax.train import checkpoint, loop
from elmojax.train.batch import stacked_char_ids
from elmojax.train.trainer import Trainer
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


def _corpus_with_long_words(directory) -> tuple[str, str]:
    """A corpus whose batches' longest words vary from 3 to 40 characters, and its vocabulary."""
    rng = np.random.default_rng(3)
    short = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    lines = []
    for i in range(60):
        words = list(rng.choice(short, size=rng.integers(3, 9)))
        if i % 5 == 0:  # a long word every few sentences, of a length that varies
            words.insert(1, "x" * int(rng.integers(8, 41)) + str(i))
        if i % 20 == 7:  # and a few sentences of long words only
            words = ["y" * int(rng.integers(20, 41)) + str(k) for k in range(12)]
        lines.append(" ".join(words))
    corpus, vocab = directory / "train.txt", directory / "vocab.txt"
    corpus.write_text("\n".join(lines) + "\n")
    vocab.write_text("\n".join(["<S>", "</S>", "<UNK>"] + sorted({w for line in lines for w in line.split()})) + "\n")
    return str(corpus), str(vocab)


@pytest.mark.slow  # two training runs
def test_char_steps_compile_before_the_first_step_across_widths_and_a_resume(tmp_path, monkeypatch):
    """Character batches whose longest word moves the cut width (which used to compile the step
    again) take one layout chosen at the start: the train step compiles only before the first
    step, and a resumed run compiles the same layout (its checkpoint's), so nothing more."""
    corpus, vocab = _corpus_with_long_words(tmp_path)
    config = tiny.get_config("chars")
    config.model.char_cnn.max_characters_per_token = 50
    config.data.update(train_prefix=corpus, heldout_prefix="", vocab_file=vocab)
    config.train.update(batch_size=4, max_steps=10, checkpoint_every=5, log_every=5)
    workdir = str(tmp_path / "work")
    cut_widths, layouts, compiles_at_steps = set(), set(), []
    compiles = _Compiles()

    def host_arrays(self, host_batch, shapes=None):  # the width the old layout cut each batch to
        distinct, _ = distinct_tokens(stacked_char_ids(host_batch))
        cut_widths.add(trim_char_ids(distinct, self.max_width)[0].shape[1])
        arrays = real_host_arrays(self, host_batch, shapes)
        if shapes is not None:
            layouts.add(arrays["distinct_char_ids"].shape)
        return arrays

    def put_arrays(self, arrays):  # called once before each step (and by compile_train_step)
        compiles_at_steps.append(compiles.names.count("train_step"))
        return real_put_arrays(self, arrays)

    real_host_arrays, real_put_arrays = Trainer.host_arrays, Trainer.put_arrays
    monkeypatch.setattr(Trainer, "host_arrays", host_arrays)
    monkeypatch.setattr(Trainer, "put_arrays", put_arrays)
    monkeypatch.setattr(loop, "SHAPE_SAMPLES", 1)  # a layout chosen from less than the run will see
    jax_log, logged = logging.getLogger("jax"), jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    jax_log.addHandler(compiles)
    try:
        loop.train(config, workdir)
        first_run = compiles.names.count("train_step")
        shapes = checkpoint.read_meta(workdir).char_shapes
        config.train.max_steps = 20
        loop.train(config, workdir)
    finally:
        jax_log.removeHandler(compiles)
        jax.config.update("jax_log_compiles", logged)
    assert len(cut_widths) >= 3, cut_widths  # the batches cross widths
    assert len(layouts) == 2, layouts  # some batches fit the chosen layout, some only the full one
    assert shapes is not None and checkpoint.read_meta(workdir).char_shapes == shapes
    assert 1 <= first_run <= 2 and compiles.names.count("train_step") == 2 * first_run, compiles.names
    # each run: a batch put for each layout compiled, then one before each of its 10 steps
    each_run = lambda before: list(range(before, before + first_run)) + [before + first_run] * 10  # noqa: E731
    assert compiles_at_steps == each_run(0) + each_run(first_run)


def test_a_checkpoints_char_layout_is_used_only_where_it_fits():
    """The layout a checkpoint's meta holds is taken back as it is, unless this run's batches
    cannot take it (a hand-edited or foreign meta): then a new one is chosen (None here)."""
    trainer = Trainer(tiny.get_config("chars"), 30)  # 10 characters a token, filters up to 5 wide
    assert trainer.stored_shapes([24, 8, 8]) == (24, 8, 8) and trainer.stored_shapes((16, 10, 0)) == (16, 10, 0)
    for stored in [None, "24,8,8", [24, 8], [24, 12, 8], [24, 4, 8], [0, 8, 8], [24, 8, -1], [24.0, 8, 8],
                   [True, 8, 8], {"n_short": 24}]:
        assert trainer.stored_shapes(stored) is None, stored
    assert Trainer(tiny.get_config("words"), 30).stored_shapes([24, 8, 8]) is None
