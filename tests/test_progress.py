"""What a user sees while elmojax works: progress bars on a terminal only (dumps, downloads),
training's tokens/s and time left from steady steps only (StepTimer), metrics lines with their
wall-clock time and the heldout evaluation's verdict and baseline, and the config in one block."""

import io
import json
import sys
import time

import pytest

from conftest import OPTIONS_FILE, VOCAB_FILE, WEIGHT_FILE
from elmojax import dump_bilm_embeddings
from elmojax.formats.progress import Progress
from elmojax.train import evaluation, metrics
from elmojax.train.config import base_config
from elmojax.train.loop import StepTimer, config_block


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_bar_on_a_terminal_and_nothing_elsewhere(monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = Progress("weights.hdf5", 30_000_000, True, 1e6, " MB")
    for done in range(0, 30_000_001, 5_000_000):
        bar.update(done)
    bar.done(30_000_000)
    shown = terminal.getvalue()
    assert "weights.hdf5: 100%" in shown and "30.0M/30.0M" in shown and "B/s" in shown and shown.endswith("\n")
    monkeypatch.undo()
    for enabled in (True, False):
        quiet = Progress("weights.hdf5", 30_000_000, enabled, 1e6, " MB")
        quiet.update(10_000_000)
        quiet.done(30_000_000)
    assert capsys.readouterr().err == ""


def test_a_bar_that_is_told_nothing_more_comes_ends(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = Progress("sentences", None)  # total not known
    bar.update(5)
    bar.done(7)
    bar.update(9)  # after the end: nothing
    assert terminal.getvalue().count("\n") == 1 and "7" in terminal.getvalue().rsplit("\r", 1)[-1]


def test_a_dump_draws_its_bar_on_a_terminal_only(tmp_path, monkeypatch, capfd, fixture_sentences):
    sentences, _ = fixture_sentences
    dataset = tmp_path / "data.txt"
    dataset.write_text("".join(" ".join(s) + "\n" for s in (sentences[0] * 100)), encoding="utf-8")  # 1000 lines
    dump_bilm_embeddings(VOCAB_FILE, str(dataset), OPTIONS_FILE, WEIGHT_FILE, str(tmp_path / "a.hdf5"), batch_size=500)
    assert capfd.readouterr().err == ""  # stderr is not a terminal here
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    dump_bilm_embeddings(VOCAB_FILE, str(dataset), OPTIONS_FILE, WEIGHT_FILE, str(tmp_path / "b.hdf5"), batch_size=500)
    assert "sentences: 100%" in terminal.getvalue() and "1.00k/1.00k" in terminal.getvalue()


class Clock:
    """A clock that moves only when told; compiles counted by hand."""

    def __init__(self):
        self.now, self.compiles = 100.0, 0

    def step(self, seconds: float, compiled: bool = False) -> None:
        self.now += seconds
        self.compiles += compiled


def test_tokens_per_second_and_time_left_count_steady_steps_only():
    clock = Clock()
    timer = StepTimer(lambda: clock.now, lambda: clock.compiles)
    clock.step(30.0, compiled=True)  # the first step after a resume: compiled
    timer.step_ended()
    clock.step(7.0, compiled=True)  # a second compile (the restored state's layout)
    timer.step_ended()
    for _ in range(4):  # steady: 0.5 s a step
        clock.step(0.5)
        timer.step_ended()
    assert timer.interval(tokens_per_step=100) == pytest.approx(200.0)
    assert timer.seconds_left(10) == pytest.approx(5.0)
    clock.step(60.0, compiled=True)  # an evaluation compiles its step, then training goes on
    timer.pause_ended()
    clock.step(1.5)
    timer.step_ended()
    assert timer.interval(tokens_per_step=100) == pytest.approx(100 / 1.5)
    assert timer.seconds_left(10) == pytest.approx(10 * 3.5 / 5)
    assert timer.interval(tokens_per_step=100) is None  # no steady step since


def test_no_steady_step_yet_no_numbers():
    clock = Clock()
    timer = StepTimer(lambda: clock.now, lambda: clock.compiles)
    timer.step_ended()  # the first step seen: nothing to time it from
    clock.step(3.0, compiled=True)
    timer.step_ended()
    assert timer.interval(100) is None and timer.seconds_left(5) is None


def test_every_metrics_line_has_its_time_and_tensorboard_the_same(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    before = time.time()
    writer = metrics.MetricsWriter(str(tmp_path))
    writer.scalars(1, {"train/loss": 2.5})
    writer.scalars(2, {"heldout/perplexity": 12.0, "heldout/blown_up": False})
    writer.close()
    lines = [json.loads(line) for line in open(tmp_path / metrics.METRICS_FILE)]
    assert all(before <= line["time"] <= time.time() for line in lines)
    assert lines[1]["heldout/blown_up"] is False and lines[1]["step"] == 2
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    [blown_up] = events.Scalars("heldout/blown_up")
    assert blown_up.value == 0.0 and blown_up.wall_time == pytest.approx(lines[1]["time"])


def test_heldout_metrics_carry_the_baseline_and_the_verdict():
    result = evaluation.HeldoutResult(40.0, 35.0, 45.0, 1000, ("heldout.txt",), 500, unigram_perplexity=300.0)
    values = metrics.heldout_scalars(result, evaluation.diagnose(result))
    assert values == {"heldout/perplexity": 40.0, "heldout/forward_perplexity": 35.0,
                      "heldout/backward_perplexity": 45.0, "heldout/unigram_perplexity": 300.0,
                      "heldout/blown_up": False}
    broken = evaluation.HeldoutResult(5000.0, 5000.0, None, 1000, ("heldout.txt",), 500)
    assert metrics.heldout_scalars(broken, evaluation.diagnose(broken)) == {
        "heldout/perplexity": 5000.0, "heldout/forward_perplexity": 5000.0, "heldout/blown_up": True}


def test_the_config_block_has_every_field_once():
    config = base_config()
    block = config_block(config)
    lines = block.splitlines()
    assert lines[0] == "config:" and "  train.learning_rate = 0.2" in lines
    fields = [line.split(" = ")[0].strip() for line in lines[1:]]
    assert len(fields) == len(set(fields)) and "model.lstm.dim" in fields and "data.train_prefix" in fields

