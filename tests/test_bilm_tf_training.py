"""Training steps pinned to bilm-tf's own: replays (elmojax.train.replay) of runs bilm-tf recorded
(tests/fixtures/bilm_tf_training/, made by its make_fixtures.sh with benchmarks/bilm_tf_training.py).

Each record holds bilm-tf's initial variables, 20 batches of the bundled KJV sample and what its
training graph computed: the loss and global gradient norm at every step, the first step's
gradients, and every variable (with Adagrad's accumulators) and the LSTM carry after steps 1
and 20. elmojax starts
from the same variables and trains on the same batches with its own jitted train step, fed the
negatives bilm-tf's sampler drew and the dropout masks bilm-tf applied where the record has
them. Four records: character inputs with skip connections and word inputs, each with the full
softmax and no dropout (bilm-tf's `sample_softmax: false`) and with the sampled softmax and
dropout (tanh CNN; word inputs sharing the softmax with the embedding).
"""

import os

import numpy as np
import pytest

from conftest import FIXTURES
from elmojax.train import replay

RECORDS = os.path.join(FIXTURES, "bilm_tf_training")
NAMES = ["chars", "words", "chars_sampled", "words_sampled"]
ONE_STEP = 1e-5     # float32 agreement, relative to each variable's largest entry
TWENTY_STEPS = 5e-5


@pytest.fixture(scope="module", params=NAMES)
def replayed(request):
    record = replay.Record(os.path.join(RECORDS, request.param + ".npz"))
    trainer = replay.trainer_for(record)
    losses, norms, snapshots = replay.replay(record, trainer=trainer)
    grads = replay.first_step_gradients(trainer, record)
    return record, losses, norms, snapshots, grads


def _assert_variables_close(got: dict, want: dict, tolerance: float, what: str):
    assert set(got) == set(want), what
    for name in sorted(want):
        difference = replay.relative_difference(got[name], want[name])
        assert difference < tolerance, f"{what}: {name} differs by {difference:.2e} (relative)"


def test_record_is_what_it_says(replayed):
    record = replayed[0]
    assert record.steps == 20 and record.snapshots() == [1, 20]
    assert len([k for k in record.snapshot(20) if k.startswith("lstm_state/")]) == 8  # (c, h) x 2 layers x 2
    assert record.sampled == record.dropout == record.path.endswith("_sampled.npz")
    assert record.char_inputs == os.path.basename(record.path).startswith("chars")
    clip = record.options["all_clip_norm_val"]  # the global-norm clip is in play on some steps, not all
    assert (record.arrays["grad_norm"] > clip).any() and (record.arrays["grad_norm"] < clip).any()


def test_first_step_loss_gradients_and_update(replayed):
    record, losses, norms, snapshots, grads = replayed
    np.testing.assert_allclose(losses[0], record.arrays["loss"][0], rtol=ONE_STEP)
    np.testing.assert_allclose(norms[0], record.arrays["grad_norm"][0], rtol=ONE_STEP)
    _assert_variables_close(grads, record.variables("grad"), ONE_STEP, "first step's gradients")
    _assert_variables_close(snapshots[1], record.snapshot(1), ONE_STEP, "variables and LSTM carry after step 1")


def test_twenty_steps(replayed):
    record, losses, norms, snapshots, _ = replayed
    np.testing.assert_allclose(losses, record.arrays["loss"], rtol=TWENTY_STEPS)
    np.testing.assert_allclose(norms, record.arrays["grad_norm"], rtol=TWENTY_STEPS)
    _assert_variables_close(snapshots[20], record.snapshot(20), TWENTY_STEPS, "variables and LSTM carry after step 20")


@pytest.mark.parametrize("name,change", [("chars", "cell_clip"), ("chars", "proj_clip"), ("chars", "forget_bias"),
                                         ("chars_sampled", "all_clip_norm_val")])
def test_the_records_tell_a_changed_recipe_apart(name, change, monkeypatch):
    """The comparison has teeth: with one detail of the recipe left out, the first step's update
    no longer matches (so the records have the clips in play, and so on)."""
    from elmojax.model import lstm

    record = replay.Record(os.path.join(RECORDS, name + ".npz"))
    if change in ("cell_clip", "proj_clip"):
        record.options = {**record.options, "lstm": {**record.options["lstm"], change: None}}
    elif change == "all_clip_norm_val":
        record.options = {**record.options, change: 1e9}
    else:
        monkeypatch.setattr(lstm, "FORGET_BIAS", 0.0)
    _, _, snapshots = replay.replay(record, steps=1)
    want = record.variables("after_1")
    worst = max(replay.relative_difference(snapshots[1][k], want[k]) for k in want)
    assert worst > 100 * ONE_STEP, worst


def test_sampler_expected_counts_are_tensorflows():
    """The negatives' expected counts elmojax computes from the number of draws it recovers
    equal those TensorFlow's sampler reported."""
    record = replay.Record(os.path.join(RECORDS, "chars_sampled.npz"))
    assert replay.expected_count_difference(record) < 1e-5


def test_tf_variable_names_and_errors():
    from elmojax.formats import tf_variables
    from elmojax.formats.options import BiLMOptions

    record = replay.Record(os.path.join(RECORDS, "chars.npz"))
    trainer = replay.trainer_for(record)
    variables = record.variables("init")
    names = {name for name, _, _ in tf_variables.tf_layout(trainer.options)}
    assert names == {k for k in variables if not k.endswith("/Adagrad")}  # every variable bilm-tf made
    del variables["lm/CNN/W_cnn_1"]
    with pytest.raises(ValueError, match=r"^run: no variable 'lm/CNN/W_cnn_1' \(expected shape \(1, 2, 4, 8\)"):
        tf_variables.params_from_tf(variables, trainer.options, source="run")
    variables["lm/CNN/W_cnn_1"] = np.zeros((1, 3, 4, 8))
    with pytest.raises(ValueError, match=r"variable 'lm/CNN/W_cnn_1' has shape \(1, 3, 4, 8\)"):
        tf_variables.params_from_tf(variables, trainer.options)
    one_layer = BiLMOptions.from_dict({"lstm": {"dim": 8, "projection_dim": 4}, "n_tokens_vocab": 10})
    assert [n for n, _, _ in tf_variables.tf_layout(one_layer)][:3] == [  # no MultiRNNCell for one layer
        "lm/embedding", "lm/RNN_0/rnn/lstm_cell/kernel", "lm/RNN_0/rnn/lstm_cell/bias"]
