"""Training: bilm-tf's training tests on its toy corpus, restart, export, fine-tuning."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from elmojax import Batcher, BidirectionalLanguageModel, data
from elmojax.formats import hdf5
from elmojax.formats.options import BiLMOptions
from elmojax.infer.bidirectional_lm import make_embed_fn
from elmojax.model import softmax
from elmojax.model.bilm import BiLM, zero_state
from elmojax.train import config as config_lib, evaluation, loop, step, trained_models
from elmojax.train import trainer as trainer_lib

import tiny
from conftest import ROOT, padded_vocab_file, run_python


def _config(inputs="chars", **train_overrides):
    config = tiny.get_config(inputs)
    config.train.update(train_overrides)
    return config


@pytest.mark.slow  # 50 epochs each
@pytest.mark.parametrize("case", ["words_unidirectional", "chars_bidirectional", "shared_softmax", "skip_connections"])
def test_heldout_perplexity_below_20(case, tmp_path):
    """bilm-tf's tests: 50 epochs on the toy corpus, then perplexity < 20 on it."""
    config = _config("chars" if case == "chars_bidirectional" else "words")
    if case == "words_unidirectional":
        config.model.bidirectional = False
    if case == "shared_softmax":
        config.model.share_embedding_softmax = True
    if case == "skip_connections":
        config.model.lstm.use_skip_connections = True
    loop.train(config, str(tmp_path))
    result = evaluation.evaluate(config, str(tmp_path))
    assert result.heldout.tokens == 139  # 134 words + one </S> target per sentence, each counted once
    assert result.heldout.perplexity < 20.0, result
    if case == "words_unidirectional":
        assert result.heldout.backward_perplexity is None
        assert result.heldout.perplexity == result.heldout.forward_perplexity


def test_char_inputs_with_shared_softmax_raise(tmp_path):
    config = _config("chars")
    config.model.share_embedding_softmax = True
    with pytest.raises(ValueError, match="share_embedding_softmax needs word inputs"):
        loop.train(config, str(tmp_path))


@pytest.mark.slow  # a whole training run
def test_restart_equals_straight_run(tmp_path):
    """N steps, stop, resume for N more == 2N steps straight: params, carry and data position."""
    n = 7
    straight = loop.train(_config(max_steps=2 * n), str(tmp_path / "straight"))
    loop.train(_config(max_steps=n), str(tmp_path / "resumed"))
    resumed = loop.train(_config(max_steps=2 * n), str(tmp_path / "resumed"))
    assert int(resumed.step) == int(straight.step) == 2 * n
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(straight.lstm_state), jax.tree.leaves(resumed.lstm_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(straight.rng), np.asarray(resumed.rng))
    # and the model did move away from its initialization
    fresh = trainer_lib.Trainer(_config(), 32).init_params(jax.random.split(jax.random.PRNGKey(0))[0])
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
               for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(straight.params)))


@pytest.mark.slow  # a whole training run
def test_export_embeds_like_the_training_params(tmp_path):
    config = _config(max_steps=20)
    state = loop.train(config, str(tmp_path / "work"))
    output = str(tmp_path / "export" / "elmo.hdf5")
    exported = trained_models.export(str(tmp_path / "work"), output)
    with open(exported.options, encoding="utf-8") as f:
        assert json.load(f)["char_cnn"]["n_characters"] == 262

    sentences = [["neural", "language", "models", "use", "continuous", "representations"], ["these", "models"]]
    ids = Batcher(exported.vocab, 10).batch_sentences(sentences)
    from_file = BidirectionalLanguageModel(exported.options, output)(ids)

    options = BiLMOptions.from_dict(json.load(open(exported.options, encoding="utf-8")))
    embed_fn = make_embed_fn(BiLM(options))
    direct, _ = embed_fn(jax.device_get(state.params["bilm"]), ids.astype(np.int32), zero_state(options, 2))
    assert np.max(np.abs(from_file["lm_embeddings"] - np.asarray(direct["lm_embeddings"]))) <= 1e-6
    assert np.abs(from_file["lm_embeddings"]).max() > 0.01

    # the softmax file holds the trained softmax and the vocabulary it indexes
    softmax_w, softmax_b, vocab = hdf5.load_softmax(exported.softmax)
    np.testing.assert_array_equal(softmax_w, np.asarray(state.params["softmax"]["W"]))
    assert vocab[:3] == ["<S>", "</S>", "<UNK>"] and len(vocab) == softmax_w.shape[0] == 32

    # an export can be evaluated, and gives the workdir's perplexity
    by_export = evaluation.evaluate(config, output)
    by_workdir = evaluation.evaluate(config, str(tmp_path / "work"))
    assert by_export.heldout.perplexity == pytest.approx(by_workdir.heldout.perplexity, rel=1e-5)


@pytest.mark.slow  # a whole training run
def test_fine_tune_on_a_new_vocabulary(tmp_path):
    """init_from an export: shared tokens keep their softmax rows, new ones start fresh."""
    state = loop.train(_config(max_steps=10), str(tmp_path / "base"))
    output = str(tmp_path / "export" / "elmo.hdf5")
    trained_models.export(str(tmp_path / "base"), output)
    old_vocab = open(os.path.join(tmp_path, "export", "vocab.txt"), encoding="utf-8").read().split()

    new_vocab_file = tmp_path / "vocab.txt"
    new_vocab = ["<S>", "</S>", "<UNK>", "zebra", "the", "models", "of"]
    new_vocab_file.write_text("\n".join(new_vocab) + "\n", encoding="utf-8")
    config = _config(max_steps=1, n_negative_samples_batch=4)
    config.train.learning_rate = 0.0  # look at the initialization itself
    config.data.vocab_file = str(new_vocab_file)
    config.init_from = output
    tuned = loop.train(config, str(tmp_path / "tuned"))

    trained_w = np.asarray(state.params["softmax"]["W"])
    tuned_w = np.asarray(tuned.params["softmax"]["W"])
    assert tuned_w.shape == (len(new_vocab), trained_w.shape[1])
    for j, token in enumerate(new_vocab):
        if token in old_vocab:
            np.testing.assert_array_equal(tuned_w[j], trained_w[old_vocab.index(token)])
        else:
            assert not np.any(np.all(np.isclose(trained_w, tuned_w[j]), axis=1))
    for a, b in zip(jax.tree.leaves(state.params["bilm"]), jax.tree.leaves(tuned.params["bilm"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


MULTI_DEVICE = r"""
import json, sys, tempfile
import jax, numpy as np
from jax.sharding import Mesh
import tiny
from conftest import padded_vocab_file
from elmojax import data
from elmojax.train import config as config_lib, trained_models, trainer as trainer_lib
assert jax.device_count() == 4
results = []
for n_devices in (4, 1):
    config = tiny.get_config("chars")
    config.train.batch_size = 4 // n_devices  # the same global batch of 4
    # a softmax over 8x the ids per step (2 x 4 samples + 2 x 4 x 2 targets): the row update
    config.train.update(n_negative_samples_batch=4, unroll_steps=2)
    config.data.vocab_file = padded_vocab_file(tempfile.mkdtemp(), 256)
    vocab = trained_models.load_vocab(config)
    trainer = trainer_lib.Trainer(config, vocab.size, Mesh(np.array(jax.devices()[:n_devices]), ("data",)))
    state = trainer.create_state(jax.random.PRNGKey(0))
    dataset = data.make_dataset(config_lib.streams(config), vocab, config.data.train_prefix, 4, config.train.unroll_steps, test=False)
    batches = dataset.iter_batches()
    for _ in range(2):
        state, metrics = trainer.train_step(state, trainer.put_batch(next(batches)))
    results.append(jax.device_get(state))
diffs = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]))]
moved = max(float(np.abs(a - b).max()) for a, b in zip(
    jax.tree.leaves(results[0].params), jax.tree.leaves(jax.device_get(trainer.create_state(jax.random.PRNGKey(0)).params))))
print(json.dumps({"max_diff": max(diffs), "moved": moved}))
"""


@pytest.mark.slow
def test_four_devices_equal_one():
    result = run_python(MULTI_DEVICE, devices=4)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["moved"] > 1e-3
    assert out["max_diff"] < 1e-5, out


@pytest.mark.slow
def test_quickstart_command_end_to_end(tmp_path):
    """The main command wires training, evaluation, export and embedding (a few steps here;
    the full quickstart runs the same code for longer)."""
    workdir = str(tmp_path / "work")
    command = [sys.executable, "-m", "elmojax.main", "--config=configs/quickstart.py", f"--workdir={workdir}",
               "--config.train.max_steps=3", "--config.train.batch_size=4", "--config.eval.batch_size=64"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "heldout perplexity" in result.stdout and "embedded 3 example sentences" in result.stdout
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    # the resolved config in one block, once; the final evaluation among the metrics, every line timed
    assert result.stderr.count("config:\n") == 1 and "  train.max_steps = 3\n" in result.stderr
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    assert all(isinstance(line["time"], float) for line in lines)
    [final] = [line for line in lines if "heldout/perplexity" in line]
    assert final["step"] == 3 and final["heldout/blown_up"] in (True, False)
    assert final["heldout/unigram_perplexity"] > 1 and final["heldout/backward_perplexity"] > 1
    evaluate = subprocess.run([sys.executable, "-m", "elmojax.main", "--mode=evaluate",
                               f"--model={workdir}/export/elmo.hdf5", "--config=configs/quickstart.py"],
                              cwd=ROOT, capture_output=True, text=True)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    metrics = json.loads(evaluate.stdout.strip().splitlines()[-1])
    assert {"perplexity", "forward_perplexity", "backward_perplexity", "tokens"} <= set(metrics)
    assert metrics["tokens"] == 4651


@pytest.mark.slow  # a whole training run
def test_fine_tune_from_a_workdir(tmp_path):
    """init_from another workdir's checkpoint with the same vocabulary keeps every trained row."""
    base = loop.train(_config(max_steps=5), str(tmp_path / "base"))
    config = _config(max_steps=1, learning_rate=0.0)
    config.init_from = str(tmp_path / "base")
    tuned = loop.train(config, str(tmp_path / "tuned"))
    for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(tuned.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(tuned.step) == 1


@pytest.mark.slow  # a whole training run
def test_word_input_export_is_its_own_embedding_file(tmp_path):
    from elmojax import TokenBatcher

    state = loop.train(_config("words", max_steps=5), str(tmp_path / "work"))
    output = str(tmp_path / "export" / "elmo.hdf5")
    exported = trained_models.export(str(tmp_path / "work"), output)
    bilm = BidirectionalLanguageModel(exported.options, output, use_character_inputs=False,
                                      embedding_weight_file=output)
    ids = TokenBatcher(exported.vocab).batch_sentences([["these", "models", "use", "words"], ["the"]])
    from_file = bilm(ids)
    options = BiLMOptions.from_dict(json.load(open(exported.options, encoding="utf-8")))
    direct, _ = make_embed_fn(BiLM(options, use_character_inputs=False))(
        jax.device_get(state.params["bilm"]), ids.astype(np.int32), zero_state(options, 2))
    assert np.max(np.abs(from_file["lm_embeddings"] - np.asarray(direct["lm_embeddings"]))) <= 1e-6
    assert np.abs(from_file["lm_embeddings"]).max() > 0.01


@pytest.mark.parametrize("inputs,shared", [("chars", False), ("words", False), ("words", True)])
def test_vocabulary_row_update_equals_the_dense_update(inputs, shared, tmp_path):
    """train_step updates only the rows of the softmax (and word embedding) a step reads, and
    their Adagrad accumulators. It must give what a dense step gives: the gradient of the same
    loss with respect to the whole tables, clipped by the global norm and applied by the
    optimizer to every row."""
    # 2 x 4 samples + 2 x 3 targets (+ 2 x 3 input words), in a table over 8x as large
    config = _config(inputs, n_negative_samples_batch=4, batch_size=1, unroll_steps=3)
    config.model.share_embedding_softmax = shared
    config.data.vocab_file = padded_vocab_file(tmp_path, 256)
    n_ids = 14 if inputs == "chars" else 20
    assert 256 >= softmax.ROW_UPDATE_MIN_RATIO * n_ids  # the step does take rows
    vocab = trained_models.load_vocab(config)
    trainer = trainer_lib.Trainer(config, vocab.size)
    dataset = data.make_dataset(config_lib.streams(config), vocab, config.data.train_prefix, 1, 3, test=False)
    batch = trainer.put_batch(next(dataset.iter_batches()))
    before = jax.device_get(trainer.create_state(jax.random.PRNGKey(1)))
    settings = trainer.settings

    # the dense step, written out
    _, loss_rng, sample_rng = jax.random.split(before.rng, 3)
    samples = step.draw_samples(sample_rng, settings)

    def loss_fn(params):
        sums, _ = step.direction_losses(params, batch, before.lstm_state, model=trainer.model, settings=settings,
                                        draw=step.TrainingDraw(loss_rng, samples))
        return sum(total / count for total, count in sums.values()) / len(sums) * settings.unroll_steps

    grads = jax.jit(jax.grad(loss_fn))(before.params)  # (jitted: op by op, the char CNN's grad takes a minute)
    updates, want_opt_state = trainer.tx.update(grads, before.opt_state, before.params)
    want_params = jax.device_get(optax.apply_updates(before.params, updates))
    want_opt_state = jax.device_get(want_opt_state)

    after, metrics = trainer.train_step(trainer.create_state(jax.random.PRNGKey(1)), batch)
    after = jax.device_get(after)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree_utils.tree_norm(grads)), rtol=1e-6)
    assert float(optax.tree_utils.tree_norm(grads)) > config.train.all_clip_norm_val  # the clip is in play
    got_leaves = jax.tree_util.tree_leaves_with_path((after.params, after.opt_state))
    for (path, got), want in zip(got_leaves, jax.tree.leaves((want_params, want_opt_state))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    # some rows moved, and the untouched ones kept their values exactly
    table = (lambda p: p["bilm"]["embedder"]["embedding"]) if shared else (lambda p: p["softmax"]["W"])
    moved = np.abs(table(after.params) - table(before.params)).max(axis=1) > 0
    assert 0 < moved.sum() <= n_ids


def test_bfloat16_compute_trains_like_float32():
    """train.compute_dtype="bfloat16" (a GPU speed option): the first step's loss and gradient
    norm match float32's to bfloat16 rounding, and the compiled step does use bfloat16."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        config = _config(compute_dtype=dtype)
        vocab = trained_models.load_vocab(config)
        trainer = trainer_lib.Trainer(config, vocab.size)
        dataset = data.make_dataset(config_lib.streams(config), vocab, config.data.train_prefix, trainer.batch_size,
                                     config.train.unroll_steps, test=True)
        batch = trainer.put_batch(next(dataset.iter_batches()))
        state = trainer.create_state(jax.random.PRNGKey(0))
        assert ("bf16" in trainer.train_step.lower(state, batch).as_text()) == (dtype == "bfloat16")
        _, metrics = trainer.train_step(state, batch)
        results[dtype] = {k: float(v) for k, v in metrics.items()}
    for key in ("loss", "grad_norm"):
        exact, rounded = results["float32"][key], results["bfloat16"][key]
        assert exact != rounded and abs(rounded - exact) < 0.02 * abs(exact), (key, results)


SEED_RUNS = os.path.join(ROOT, "benchmarks", "training_seeds.jsonl")


def test_every_blown_up_seed_run_is_called_broken_and_no_healthy_one():
    """The 160 runs of benchmarks/TRAINING.md (bilm-tf's and elmojax's, four settings), each
    scored from zero state and from its training carry: the 47 that blew up (a direction
    1.24 times the other or more, up to 1e8; section 2) are broken, the 113 others are not.
    Without the carry, the ones orders of magnitude off are still broken and the rest of the
    blown-up ones get a note, the healthy ones nothing."""
    with open(SEED_RUNS, encoding="utf-8") as f:
        runs = [json.loads(line) for line in f]
    assert len(runs) == 160 and sum(r["blown_up"] for r in runs) == 47
    for run in runs:
        vocab_size = 5000 if run["corpus"] == "kjv5k" else 13657
        result = _heldout(run["forward_perplexity"], run["backward_perplexity"], vocab_size=vocab_size)
        carry = _heldout(run["carry_forward_perplexity"], run["carry_backward_perplexity"], vocab_size=vocab_size)
        health = evaluation.diagnose(result, carry, state_resets=0.0)
        assert health.verdict == ("broken" if run["blown_up"] else "healthy"), run
        alone = evaluation.diagnose(result)
        far = max(run["forward_perplexity"], run["backward_perplexity"]) > 10 * min(run["forward_perplexity"],
                                                                                  run["backward_perplexity"])
        assert alone.verdict == ("broken" if far else "suspect" if run["blown_up"] else "healthy"), run


def _heldout(forward_perplexity, backward_perplexity=None, unigram_perplexity=None, vocab_size=5000):
    """A HeldoutResult with these perplexities (what diagnose reads)."""
    directions = [p for p in (forward_perplexity, backward_perplexity) if p is not None]
    return evaluation.HeldoutResult(float(np.exp(np.mean(np.log(directions)))), forward_perplexity,
                                    backward_perplexity, tokens=0, heldout_files=(), vocab_size=vocab_size,
                                    unigram_perplexity=unigram_perplexity)


def test_health_lines_say_what_is_true():
    healthy = {"forward_perplexity": 110.0, "backward_perplexity": 112.0, "unigram_perplexity": 250.0,
               "vocab_size": 5000}
    assert evaluation.diagnose(_heldout(**healthy)) == evaluation.Health("healthy")
    forward_only = _heldout(**{**healthy, "backward_perplexity": None})
    assert evaluation.diagnose(forward_only).verdict == "healthy"
    # young: not yet better than the training data's unigram model, both directions alike, from the carry too
    young = {**healthy, "forward_perplexity": 265.0, "backward_perplexity": 273.0}
    young = _heldout(**young)
    for health in (evaluation.diagnose(young), evaluation.diagnose(young, young, 0.05)):
        assert health.verdict == "undertrained" and not health.line.startswith("warning")
        assert "train it longer" in health.line and "broken" not in health.line
    # the zero-state trap, proven by the carry; the advice fits the run's resets
    trapped = {**healthy, "forward_perplexity": 178.6}
    carry = {**healthy, "forward_perplexity": 105.5}
    line = evaluation.diagnose(_heldout(**trapped), _heldout(**carry), state_resets=0.0).line
    assert line.startswith("warning: the forward LM is broken: heldout perplexity 178.6 from the zero LSTM state")
    assert "but 105.5 from the state training ended in" in line and "state_reset_probability=0.05" in line
    line = evaluation.diagnose(_heldout(**trapped), _heldout(**carry), state_resets=0.05).line
    assert "reset the state with probability 0.05" in line and "state_reset_probability=0.05" not in line
    # without a carry: orders of magnitude off is broken, a gap of 1.6 only a note
    assert evaluation.diagnose(_heldout(**{**healthy, "forward_perplexity": 5e7})).verdict == "broken"
    worse = _heldout(**{**healthy, "backward_perplexity": 10_001.0, "forward_perplexity": 10_500.0})
    assert evaluation.diagnose(worse).verdict == "broken"  # worse than twice a uniform guess over 5,000 tokens
    note = evaluation.diagnose(_heldout(**{**healthy, "backward_perplexity": 1.6 * 110.0}))
    assert note.verdict == "suspect" and note.line.startswith("note:") and note.needs_carry
    # a carry as broken as the zero state: not the trap, a model that did not learn
    far = {**healthy, "forward_perplexity": 5e7}
    assert "it has not learnt" in evaluation.diagnose(_heldout(**far), _heldout(**far), 0.0).line


@pytest.mark.slow
def test_a_broken_model_is_reported_by_evaluate(tmp_path):
    """--mode=evaluate on a model that puts its mass on one token prints a warning line with the
    perplexity (stderr) and says so in its JSON."""
    import h5py

    loop.train(_config(max_steps=5), str(tmp_path / "work"))
    output = str(tmp_path / "export" / "elmo.hdf5")
    exported = trained_models.export(str(tmp_path / "work"), output)
    with h5py.File(exported.softmax, "r+") as f:
        f["softmax/b"][5] = 60.0  # every position's mass on one token
    command = [sys.executable, "-m", "elmojax.main", "--mode=evaluate", f"--model={output}",
               "--config=configs/tiny.py"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["blown_up"] is True and metrics["perplexity"] > metrics["unigram_perplexity"]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{max(metrics['forward_perplexity'], metrics['backward_perplexity']):.6g}" in warnings[0]


def test_state_reset_zeroes_whole_rows():
    state = {d: ((jnp.ones((2000, 4)), jnp.ones((2000, 2))), (jnp.ones((2000, 4)), jnp.ones((2000, 2))))
             for d in ("forward", "backward")}
    assert all(bool((x == 1).all()) for x in jax.tree.leaves(step.reset_rows(state, jax.random.PRNGKey(0), 0.0)))
    reset = [np.asarray(x) for x in jax.tree.leaves(step.reset_rows(state, jax.random.PRNGKey(0), 0.3))]
    zeroed = reset[0][:, 0] == 0
    for x in reset:  # a row is zeroed in every direction and layer, or kept whole
        np.testing.assert_array_equal(x, np.where(zeroed[:, None], 0.0, 1.0) * np.ones_like(x))
    assert 0.25 < zeroed.mean() < 0.35


def test_state_reset_probability_one_trains_from_the_zero_state():
    config = _config()
    dataset = data.make_dataset(config_lib.streams(config), trained_models.load_vocab(config), config.data.train_prefix, 2, 10, test=False)
    batch = next(dataset.iter_batches())
    losses = []
    for probability, carry in ((1.0, 0.5), (0.0, 0.0)):  # a carried state reset == no state at all
        config.train.state_reset_probability = probability
        trainer = trainer_lib.Trainer(config, 32)
        state = trainer.create_state(jax.random.PRNGKey(0))
        state = state.replace(lstm_state=jax.tree.map(lambda x: x + carry, state.lstm_state))
        losses.append(float(trainer.train_step(state, trainer.put_batch(batch))[1]["loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
