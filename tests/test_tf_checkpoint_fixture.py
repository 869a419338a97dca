"""bilm-tf's own training checkpoint (tests/fixtures/bilm_tf_checkpoint/, written by TensorFlow
through bilm-tf's train() Saver, by tests/fixtures/bilm_tf_training/make_fixtures.sh), read
without TensorFlow: every variable against TensorFlow's own reading of it, the export against
bilm-tf's dump_weights, embeddings and perplexity against the export's, and fine-tuning's first
step against Adagrad by hand from the checkpoint's accumulators."""

import json
import os
import shutil
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest
import tf_bundle
from jax.sharding import Mesh

from elmojax import data
from elmojax.train import config as config_lib
from elmojax.formats import tf_variables
from elmojax.formats.tf_checkpoint import TFCheckpoint
from elmojax.infer.bidirectional_lm import BidirectionalLanguageModel
from elmojax.train import trained_models
from elmojax.train.evaluation import evaluate
from elmojax.train.step import training_loss
from elmojax.train.trainer import Trainer
from conftest import ROOT

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "bilm_tf_checkpoint")
SAMPLE = os.path.join(ROOT, "elmojax", "resources", "kjv_sample")
SENTENCES = [["In", "the", "beginning", "God", "created", "the", "heaven"], ["And", "the", "earth"], ["Amen", "."]]


@pytest.fixture
def checkpoint_dir(tmp_path):
    """A copy of the fixture: its `checkpoint` file names the path of the machine that wrote it."""
    directory = tmp_path / "released"
    shutil.copytree(FIXTURE, directory, ignore=shutil.ignore_patterns("reference.npz", "dump_weights.hdf5"))
    return str(directory)


def _reference() -> dict:
    with np.load(os.path.join(FIXTURE, "reference.npz")) as f:
        return {k: f[k] for k in f.files}


def test_every_variable_is_what_tensorflow_reads(checkpoint_dir):
    with open(os.path.join(checkpoint_dir, "checkpoint")) as f:
        written = f.read()
    assert os.path.isabs(written.split('"')[1]) and checkpoint_dir not in written  # a path from elsewhere
    ckpt = TFCheckpoint(checkpoint_dir)
    assert ckpt.prefix == os.path.join(checkpoint_dir, "model.ckpt-3")
    reference = _reference()
    assert ckpt.names() == sorted(reference)
    assert any(name.endswith("/Adagrad") for name in reference) and "global_step" in reference
    for name, value in reference.items():
        got = ckpt.read(name)
        assert got.dtype == value.dtype and got.shape == value.shape, name
        np.testing.assert_array_equal(got, value, err_msg=name)


def test_params_accumulators_and_step_of_the_training_checkpoint(checkpoint_dir):
    trained = tf_variables.read_training_checkpoint(checkpoint_dir)
    reference = _reference()
    assert trained.global_step == 3 == int(reference["global_step"])
    assert trained.vocab_file == os.path.join(checkpoint_dir, "vocab.txt")
    lstm = trained.params["bilm"]["lstm"]["layer_1"]
    for d in range(2):  # the directions stacked on the params' first axis
        kernel = reference[f"lm/RNN_{d}/rnn/multi_rnn_cell/cell_1/lstm_cell/kernel"]
        np.testing.assert_array_equal(np.concatenate([lstm["W_x"][d], lstm["W_h"][d]]), kernel)
    np.testing.assert_array_equal(trained.params["softmax"]["W"], reference["lm/softmax/W"])
    np.testing.assert_array_equal(trained.accumulators["softmax"]["W"], reference["lm/softmax/W/Adagrad"])
    np.testing.assert_array_equal(trained.accumulators["bilm"]["embedder"]["char_embed"],
                                  reference["lm/char_embed/Adagrad"])
    assert not np.all(trained.accumulators["softmax"]["W"] == 1.0)  # three steps moved them from their start


@pytest.mark.parametrize("layout", ["weights/biases", "hdf5-style"])
def test_older_tensorflow_names_read_the_same(checkpoint_dir, tmp_path, layout):
    def rename(name):
        if layout == "weights/biases":
            return (name.replace("lstm_cell/projection/kernel", "lstm_cell/projection/weights")
                    .replace("lstm_cell/kernel", "lstm_cell/weights").replace("lstm_cell/bias", "lstm_cell/biases"))
        for new, old in (("/rnn/", "/RNN/"), ("multi_rnn_cell/cell_", "MultiRNNCell/Cell"), ("lstm_cell/", "LSTMCell/"),
                         ("LSTMCell/projection/kernel", "LSTMCell/W_P_0"), ("LSTMCell/kernel", "LSTMCell/W_0"),
                         ("LSTMCell/bias", "LSTMCell/B")):
            name = name.replace(new, old)
        return name

    old_dir = tmp_path / "old"
    old_dir.mkdir()
    tf_bundle.write_checkpoint(str(old_dir / "model.ckpt-3"), {rename(k): v for k, v in _reference().items()})
    shutil.copy(os.path.join(checkpoint_dir, "options.json"), old_dir)
    old = tf_variables.read_training_checkpoint(str(old_dir))
    new = tf_variables.read_training_checkpoint(checkpoint_dir)
    jax.tree.map(np.testing.assert_array_equal, old.params, new.params)
    jax.tree.map(np.testing.assert_array_equal, old.accumulators, new.accumulators)


def test_an_unknown_layout_lists_what_the_checkpoint_holds(checkpoint_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    tf_bundle.write_checkpoint(str(other / "model.ckpt-1"), {"model/dense/kernel": np.zeros((2, 2), np.float32)})
    shutil.copy(os.path.join(checkpoint_dir, "options.json"), other)
    with pytest.raises(ValueError, match=r"no variable 'lm/char_embed' \(nor an older name of it\).*\n"
                                         r"  model/dense/kernel  float32  \[2, 2\]"):
        tf_variables.read_training_checkpoint(str(other))
    os.remove(other / "options.json")
    with pytest.raises(ValueError, match="no options.json beside the checkpoint"):
        tf_variables.read_training_checkpoint(str(other))


def test_export_is_what_dump_weights_writes(checkpoint_dir, tmp_path):
    output = str(tmp_path / "export" / "weights.hdf5")
    os.makedirs(os.path.dirname(output))
    written = trained_models.export(os.path.join(checkpoint_dir, "model.ckpt-3"), output)
    with h5py.File(os.path.join(FIXTURE, "dump_weights.hdf5"), "r") as want, h5py.File(output, "r") as got:
        names = []
        want.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
        got_names = []
        got.visititems(lambda name, item: got_names.append(name) if isinstance(item, h5py.Dataset) else None)
        assert sorted(got_names) == sorted(names)
        for name in names:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
            assert got[name][...].tobytes() == want[name][...].tobytes(), name
    with open(written.options) as f:
        options = json.load(f)
    assert options["char_cnn"]["n_characters"] == 262
    reference = _reference()
    with h5py.File(written.softmax, "r") as f:
        np.testing.assert_array_equal(f["softmax/W"][...], reference["lm/softmax/W"])
        np.testing.assert_array_equal(f["softmax/b"][...], reference["lm/softmax/b"])
    with open(written.vocab) as f, open(os.path.join(FIXTURE, "vocab.txt")) as g:
        assert f.read() == g.read()


@pytest.mark.slow
def test_export_on_the_command_line(checkpoint_dir, tmp_path):
    output = tmp_path / "cli.hdf5"
    result = subprocess.run([sys.executable, "-m", "elmojax.main", "--mode=export", f"--model={checkpoint_dir}",
                             f"--output={output}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["weights"] == str(output)


def test_embeddings_and_perplexity_equal_the_exports(checkpoint_dir, tmp_path):
    output = str(tmp_path / "weights.hdf5")
    written = trained_models.export(checkpoint_dir, output)
    from elmojax.formats.vocab import Batcher
    ids = Batcher(os.path.join(checkpoint_dir, "vocab.txt"), 50).batch_sentences(SENTENCES)
    from_export = BidirectionalLanguageModel(written.options, output)(ids)
    from_checkpoint = BidirectionalLanguageModel(written.options, checkpoint_dir)(ids)
    np.testing.assert_array_equal(from_checkpoint["lm_embeddings"], from_export["lm_embeddings"])
    # the training options beside the checkpoint (n_characters 261) work as well
    training_options = BidirectionalLanguageModel(os.path.join(checkpoint_dir, "options.json"), checkpoint_dir)(ids)
    np.testing.assert_array_equal(training_options["lm_embeddings"], from_export["lm_embeddings"])

    heldout = tmp_path / "heldout.txt"
    with open(os.path.join(SAMPLE, "heldout", os.listdir(os.path.join(SAMPLE, "heldout"))[0])) as f:
        heldout.write_text("".join(f.readlines()[:20]))
    config = config_lib.base_config()
    config.data.heldout_prefix = str(heldout)
    config.eval.batch_size = 8
    config.eval.unroll_steps = 10
    got, want = evaluate(config, checkpoint_dir), evaluate(config, output)
    assert got.heldout.perplexity == want.heldout.perplexity and np.isfinite(got.heldout.perplexity)


def _fine_tuning(checkpoint_dir, vocab_file):
    with open(os.path.join(checkpoint_dir, "options.json")) as f:
        config = config_lib.config_from_options_json(json.load(f), source="options.json")
    config.data.vocab_file = vocab_file
    vocab = trained_models.load_vocab(config)
    trainer = Trainer(config, vocab.size, Mesh(np.array(jax.devices()[:1]), ("data",)))
    rng = jax.random.PRNGKey(0)
    params, accumulators = trained_models.init_from(trainer, trainer.init_params(rng), checkpoint_dir, "",
                                                 trained_models.vocab_tokens(vocab))
    return config, vocab, trainer, params, accumulators


def test_fine_tuning_with_its_own_vocabulary_takes_the_first_step_from_its_accumulators(checkpoint_dir):
    config, vocab, trainer, params, accumulators = _fine_tuning(checkpoint_dir, os.path.join(checkpoint_dir, "vocab.txt"))
    reference = _reference()
    np.testing.assert_array_equal(accumulators["softmax"]["b"], reference["lm/softmax/b/Adagrad"])
    dataset = data.BidirectionalLMDataset(os.path.join(SAMPLE, "train", "shard-*.txt"), vocab, config.train.batch_size,
                                          config.train.unroll_steps, max_characters_per_token=50)
    batch = trainer.put_batch(dataset.next_batch())
    state = trainer.create_state(jax.random.PRNGKey(1), params, accumulators=accumulators)
    assert not config.train.sample_softmax and config.train.dropout == 0.0  # the step is deterministic

    # Adagrad by hand (TensorFlow's: accumulator += g^2, p -= lr g / sqrt(accumulator)) after
    # clipping by the global norm, in float64 from the gradient at the checkpoint's params
    grads = jax.grad(lambda p: training_loss(p, batch, state.lstm_state, jax.random.PRNGKey(2), None,
                                             model=trainer.model, settings=trainer.settings)[0])(state.params)
    grads = jax.tree.map(lambda g: np.asarray(g, np.float64), grads)
    norm = np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads)))
    scale = min(1.0, config.train.all_clip_norm_val / norm)
    lr = config.train.learning_rate

    def adagrad(p, g, a):
        g = g * scale
        return np.asarray(p, np.float64) - lr * g / np.sqrt(np.asarray(a, np.float64) + g * g)

    want = jax.tree.map(adagrad, params, grads, accumulators)
    fresh = jax.tree.map(lambda p, g: adagrad(p, g, np.ones_like(p)), params, grads)
    new_state, _ = trainer.train_step(state, batch)
    got = jax.device_get(new_state.params)
    for (path, g), w, f in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), jax.tree.leaves(fresh)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    moved = [np.max(np.abs(w - f)) for w, f in zip(jax.tree.leaves(want), jax.tree.leaves(fresh))]
    assert max(moved) > 1e-4  # fresh accumulators would have given another step


def test_fine_tuning_a_checkpoint_without_a_vocabulary_takes_the_config_s_as_its_own(checkpoint_dir, tmp_path,
                                                                                         caplog):
    vocab_file = str(tmp_path / "vocab.txt")
    os.replace(os.path.join(checkpoint_dir, "vocab.txt"), vocab_file)
    with caplog.at_level("INFO", logger="elmojax.train.trained_models"):
        _, _, _, params, accumulators = _fine_tuning(checkpoint_dir, vocab_file)
    assert f"no vocabulary beside the checkpoint; using {vocab_file} (--config.data.vocab_file)" in caplog.text
    assert "its own vocabulary (300 tokens)" in caplog.text
    np.testing.assert_array_equal(accumulators["softmax"]["b"], _reference()["lm/softmax/b/Adagrad"])
    short = tmp_path / "short.txt"  # not the checkpoint's: its softmax has 300 rows
    short.write_text("".join(t + "\n" for t in open(vocab_file).read().split()[:100]))
    with pytest.raises(ValueError, match=r"short\.txt: 100 tokens, but the checkpoint's softmax has 300 rows"):
        _fine_tuning(checkpoint_dir, str(short))


def test_fine_tuning_with_a_new_vocabulary_remaps_rows_and_their_accumulators(checkpoint_dir, tmp_path, caplog):
    tokens = open(os.path.join(checkpoint_dir, "vocab.txt")).read().split("\n")[:-1]
    new_tokens = tokens[:3] + ["Zerubbabel", "Nebuchadnezzar"] + tokens[3:200][::-1]
    new_vocab = tmp_path / "new_vocab.txt"
    new_vocab.write_text("".join(t + "\n" for t in new_tokens))
    with caplog.at_level("INFO", logger="elmojax.train.trained_models"):
        _, _, _, params, accumulators = _fine_tuning(checkpoint_dir, str(new_vocab))
    assert "a new vocabulary; params and Adagrad's accumulators carried over" in caplog.text
    assert "rows of 200 of its 202 tokens re-mapped" in caplog.text
    reference = _reference()
    old_row = {t: i for i, t in enumerate(tokens)}
    for j, token in enumerate(new_tokens):
        if token in old_row:
            np.testing.assert_array_equal(params["softmax"]["W"][j], reference["lm/softmax/W"][old_row[token]])
            np.testing.assert_array_equal(accumulators["softmax"]["W"][j], reference["lm/softmax/W/Adagrad"][old_row[token]])
        else:
            assert np.all(accumulators["softmax"]["W"][j] == 1.0) and accumulators["softmax"]["b"][j] == 1.0
    np.testing.assert_array_equal(accumulators["bilm"]["embedder"]["char_embed"], reference["lm/char_embed/Adagrad"])


def test_the_published_weights_and_softmax_files_fine_tune_with_adagrad_afresh(checkpoint_dir, tmp_path, caplog):
    """AllenNLP's published files (X_weights.hdf5, X_options.json, X_softmax_weights.hdf5 holding
    softmax/W and softmax/b alone) and bilm-tf's vocabulary file, as downloaded: the way to
    fine-tune without the TensorFlow checkpoint."""
    export = trained_models.export(checkpoint_dir, str(tmp_path / "export.hdf5"))
    published = tmp_path / "published"
    published.mkdir()
    shutil.copy(export.weights, published / "elmo_tiny_weights.hdf5")
    shutil.copy(export.options, published / "elmo_tiny_options.json")
    shutil.copy(export.vocab, published / "vocab-2016-09-10.txt")
    reference = _reference()
    with h5py.File(published / "elmo_tiny_softmax_weights.hdf5", "w") as f:
        f["softmax/W"], f["softmax/b"] = reference["lm/softmax/W"], reference["lm/softmax/b"]
    with caplog.at_level("INFO", logger="elmojax.train.trained_models"):
        _, _, _, params, accumulators = _fine_tuning(checkpoint_dir, str(published / "vocab-2016-09-10.txt"))
        weights = str(published / "elmo_tiny_weights.hdf5")
        with open(os.path.join(checkpoint_dir, "options.json")) as f:
            config = config_lib.config_from_options_json(json.load(f), source="options.json")
        config.data.vocab_file = str(published / "vocab-2016-09-10.txt")
        vocab = trained_models.load_vocab(config)
        trainer = Trainer(config, vocab.size, Mesh(np.array(jax.devices()[:1]), ("data",)))
        from_published, none = trained_models.init_from(trainer, trainer.init_params(jax.random.PRNGKey(0)), weights, "",
                                                     trained_models.vocab_tokens(vocab))
    assert none is None and "(Adagrad starts afresh)" in caplog.text
    jax.tree.map(np.testing.assert_array_equal, from_published, params)
    os.rename(published / "elmo_tiny_softmax_weights.hdf5", tmp_path / "softmax.hdf5")
    with pytest.raises(ValueError, match="no softmax file"):
        trained_models.init_from(trainer, trainer.init_params(jax.random.PRNGKey(0)), weights, "",
                              trained_models.vocab_tokens(vocab))
    given, _ = trained_models.init_from(trainer, trainer.init_params(jax.random.PRNGKey(0)), weights,
                                     str(tmp_path / "softmax.hdf5"), trained_models.vocab_tokens(vocab))
    jax.tree.map(np.testing.assert_array_equal, given, params)


def test_a_variable_with_nan_is_refused_by_name(checkpoint_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    variables = _reference()
    variables["lm/CNN_proj/W_proj"] = variables["lm/CNN_proj/W_proj"].copy()
    variables["lm/CNN_proj/W_proj"][0, 0] = np.nan
    tf_bundle.write_checkpoint(str(broken / "model.ckpt-3"), variables)
    shutil.copy(os.path.join(checkpoint_dir, "options.json"), broken)
    with pytest.raises(ValueError, match=r"model.ckpt-3: variable 'lm/CNN_proj/W_proj' holds 1 NaN or infinite"):
        tf_variables.read_training_checkpoint(str(broken))
