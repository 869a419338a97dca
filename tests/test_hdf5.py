"""The converter between bilm-tf's hdf5 weight files and the Flax params pytree."""

import json
import logging
import shutil

import h5py
import jax
import numpy as np
import pytest

from conftest import OPTIONS_FILE, VOCAB_FILE, WEIGHT_FILE
from elmojax import Batcher, BidirectionalLanguageModel
from elmojax.formats import hdf5
from elmojax.formats.options import load_options
from elmojax.model.bilm import BiLM, zero_state


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_load_save_load_is_bit_identical(tmp_path):
    options = load_options(OPTIONS_FILE)
    params = hdf5.load_weights(WEIGHT_FILE, options)
    saved = str(tmp_path / "saved.hdf5")
    hdf5.save_weights(params, options, saved)
    original, written = _datasets(WEIGHT_FILE), _datasets(saved)
    assert sorted(original) == sorted(written)
    for name in original:
        assert original[name].dtype == written[name].dtype
        assert original[name].tobytes() == written[name].tobytes(), name
    again = hdf5.load_weights(saved, options)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, again)


def test_params_tree_is_the_models(tmp_path):
    """The converter's tree has exactly the structure and shapes BiLM.init creates."""
    options = load_options(OPTIONS_FILE)
    ids = np.ones((1, 3, 50), np.int32)
    init = BiLM(options).init(jax.random.PRNGKey(0), ids, zero_state(options, 1))["params"]
    loaded = hdf5.load_weights(WEIGHT_FILE, options)
    assert jax.tree.structure(jax.tree.map(np.shape, dict(init))) == jax.tree.structure(jax.tree.map(np.shape, loaded))
    jax.tree.map(lambda a, b: (a.shape == b.shape) or pytest.fail(f"{a.shape} != {b.shape}"), dict(init), loaded)
    # and a freshly initialized model saves and loads
    hdf5.save_weights(jax.tree.map(np.asarray, init), options, str(tmp_path / "fresh.hdf5"))
    hdf5.load_weights(str(tmp_path / "fresh.hdf5"), options)


def _edited_copy(tmp_path, edit):
    path = str(tmp_path / "edited.hdf5")
    shutil.copy(WEIGHT_FILE, path)
    with h5py.File(path, "a") as f:
        edit(f)
    return path


def test_missing_dataset_is_named(tmp_path):
    path = _edited_copy(tmp_path, lambda f: f.__delitem__("CNN_high_1/b_carry"))
    with pytest.raises(ValueError, match=r"edited.hdf5: dataset 'CNN_high_1/b_carry' is missing"):
        hdf5.load_weights(path, load_options(OPTIONS_FILE))


def test_wrong_shape_is_named(tmp_path):
    name = "RNN_1/RNN/MultiRNNCell/Cell0/LSTMCell/W_P_0"

    def edit(f):
        del f[name]
        f.create_dataset(name, data=np.zeros((64, 17), np.float32))

    path = _edited_copy(tmp_path, edit)
    with pytest.raises(ValueError, match=rf"edited.hdf5: dataset '{name}' has shape \(64, 17\).*\(64, 16\)"):
        hdf5.load_weights(path, load_options(OPTIONS_FILE))


def test_options_that_do_not_fit_the_weights(tmp_path):
    with open(OPTIONS_FILE, encoding="utf-8") as f:
        d = json.load(f)
    d["lstm"]["n_layers"] = 1
    one_layer = tmp_path / "options.json"
    one_layer.write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(ValueError, match="lm_weights.hdf5: dataset 'RNN_0/RNN/MultiRNNCell/Cell1/LSTMCell/B' is not part"):
        hdf5.load_weights(WEIGHT_FILE, load_options(str(one_layer)))


def test_save_checks_params(tmp_path):
    options = load_options(OPTIONS_FILE)
    params = hdf5.load_weights(WEIGHT_FILE, options)
    del params["lstm"]["layer_1"]["B"]
    out = tmp_path / "out.hdf5"
    with pytest.raises(ValueError, match="out.hdf5: params have no entry lstm/layer_1/B"):
        hdf5.save_weights(params, options, str(out))
    params = hdf5.load_weights(WEIGHT_FILE, options)
    params["lstm"]["layer_0"]["W_h"] = params["lstm"]["layer_0"]["W_h"][:1]  # one direction of two
    with pytest.raises(ValueError, match=r"lstm/layer_0/W_h has shape \(1, 16, 256\), but the options' 2 "
                                         r"direction\(s\) need it stacked"):
        hdf5.save_weights(params, options, str(out))
    params = hdf5.load_weights(WEIGHT_FILE, options)
    params["embedder"]["W_proj"] = params["embedder"]["W_proj"][:, :3]
    with pytest.raises(ValueError, match=r"embedder/W_proj \(dataset 'CNN_proj/W_proj'\) has shape \(124, 3\)"):
        hdf5.save_weights(params, options, str(out))
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written half


def test_options_errors_name_file_and_field(tmp_path):
    path = tmp_path / "options.json"
    path.write_text(json.dumps({"lstm": {"dim": 8}}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"options.json: missing field 'lstm.projection_dim'"):
        load_options(str(path))
    path.write_text(json.dumps({"lstm": {"dim": 8, "projection_dim": 4}, "char_cnn": {"n_characters": 300}}))
    with pytest.raises(ValueError, match=r"options.json: missing field 'char_cnn.filters'"):
        load_options(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="options.json: not a valid UTF-8 JSON file"):
        load_options(str(path))


def test_training_options_work_for_prediction(tmp_path, fixture_sentences, caplog):
    """n_characters 261 (as written for training) gives the same embeddings as 262, with a log note."""
    with open(OPTIONS_FILE, encoding="utf-8") as f:
        d = json.load(f)
    assert d["char_cnn"]["n_characters"] == 262
    d["char_cnn"]["n_characters"] = 261
    training_options = tmp_path / "options.json"
    training_options.write_text(json.dumps(d), encoding="utf-8")
    sentences, _ = fixture_sentences
    ids = Batcher(VOCAB_FILE, 50).batch_sentences([sentences[k][0] for k in range(3)])
    with caplog.at_level(logging.INFO):
        trained = BidirectionalLanguageModel(str(training_options), WEIGHT_FILE)(ids)
    assert "n_characters is 261" in caplog.text
    predicted = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE)(ids)
    np.testing.assert_array_equal(trained["lm_embeddings"], predicted["lm_embeddings"])


def test_bad_ids_are_refused():
    model = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE)
    with pytest.raises(ValueError, match=r"shape \(batch, time, 50\)"):
        model(np.ones((2, 5, 49), np.int64))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 261\]"):
        model(np.full((1, 3, 50), 262, np.int64))
