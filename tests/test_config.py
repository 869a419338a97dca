"""Configs: the bundled ones build, the reference recipe has bilm-tf's numbers, a bilm-tf
options.json is honoured field by field, and command-line overrides work."""

import json
import os

import pytest

from conftest import ROOT
from elmojax.train import config as config_lib
from elmojax.formats.options import BiLMOptions


def _load(name, arg=None):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


@pytest.mark.parametrize("name", ["billion_word", "small", "quickstart", "tiny"])
def test_configs_build_valid_models(name):
    config = _load(name)
    assert isinstance(config_lib.bilm_options(config, 1000), BiLMOptions)


def test_billion_word_is_the_reference_recipe():
    options = config_lib.options_json(_load("billion_word"))
    assert options["char_cnn"] == {
        "filters": [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]],
        "embedding": {"dim": 16}, "n_highway": 2, "activation": "relu", "n_characters": 261,
        "max_characters_per_token": 50}
    assert options["lstm"] == {"dim": 4096, "projection_dim": 512, "n_layers": 2, "cell_clip": 3.0,
                               "proj_clip": 3.0, "use_skip_connections": True}
    assert {k: options[k] for k in config_lib.TRAIN_FIELDS} == {
        "n_epochs": 10, "n_train_tokens": 768648884, "batch_size": 128, "unroll_steps": 20,
        "n_negative_samples_batch": 8192, "sample_softmax": True, "dropout": 0.1, "all_clip_norm_val": 10.0,
        "learning_rate": 0.2}
    assert options["bidirectional"] is True
    # elmojax's one departure from the recipe, its remedy for the zero-state blow-up (README)
    assert _load("billion_word").train.state_reset_probability == 0.05


def test_bilm_options_file_is_honoured(tmp_path):
    d = {"bidirectional": True, "share_embedding_softmax": True, "n_epochs": 3, "n_train_tokens": 12345,
         "batch_size": 7, "unroll_steps": 9, "n_negative_samples_batch": 11, "sample_softmax": False, "dropout": 0.25,
         "all_clip_norm_val": 2.5, "learning_rate": 0.05, "n_tokens_vocab": 100,
         "lstm": {"dim": 24, "projection_dim": 12, "n_layers": 3, "cell_clip": 2.0, "proj_clip": 1.5,
                  "use_skip_connections": True}}
    path = tmp_path / "options.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    config = _load("bilm_options", str(path))
    assert config.model.char_cnn is None and config.model.share_embedding_softmax
    got = config_lib.options_json(config, 100)
    assert got == d
    assert _load("bilm_options", str(path)).train.sample_softmax is False  # bilm-tf's full-softmax training
    assert config.train.state_reset_probability == 0.0  # bilm-tf's recipe exactly: no state resets


@pytest.mark.parametrize("change,error", [
    ({"unknown_field": 1}, "unknown options field 'unknown_field'"),
    ({"n_epoch": 3}, r"unknown options field 'n_epoch' \(did you mean 'n_epochs'\?\)"),
    ({"lstm": {"dim": 24, "projection_dim": 12, "use_skip_connection": True}},
     "unknown field 'lstm.use_skip_connection'"),
    ({"char_cnn": {"filters": [[1, 4]], "embedding": {"dim": 4, "size": 3}, "max_characters_per_token": 5,
                   "n_characters": 261}}, "unknown field 'char_cnn.embedding.size'"),
    ({"char_cnn": {"filters": [[1, 4]], "embedding": {"dim": 4}, "max_characters_per_token": 5,
                   "n_characters": 261, "highway": 1}}, "unknown field 'char_cnn.highway'"),
    ({"lstm": {"dim": 24, "projection_dim": 12, "use_skip_connections": "false"}},
     "field 'lstm.use_skip_connections' must be true or false, got 'false'"),
    ({"sample_softmax": "false"}, "field 'sample_softmax' must be true or false"),
    ({"bidirectional": 1}, "field 'bidirectional' must be true or false"),
])
def test_bilm_options_file_fields_are_checked(tmp_path, change, error):
    """No field of a bilm-tf options.json is silently dropped or misread."""
    d = {"lstm": {"dim": 24, "projection_dim": 12}, "n_tokens_vocab": 100, **change}
    path = tmp_path / "options.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(ValueError, match=f"options.json: {error}"):
        _load("bilm_options", str(path))


def test_n_train_tokens_unset_is_counted_from_the_data():
    assert _load("quickstart").train.n_train_tokens is None
    assert _load("small").train.n_train_tokens is None


def test_command_line_overrides():
    from absl import flags
    from ml_collections import config_flags

    argv = ["main", f"--config={ROOT}/configs/quickstart.py", "--config.train.batch_size=64",
            "--config.model.lstm.dim=128", "--config.data.vocab_file=v.txt"]
    flag_values = flags.FlagValues()  # of its own: the process's flags stay as they are
    c = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    assert [c.value.train.batch_size, c.value.model.lstm.dim, c.value.data.vocab_file] == [64, 128, "v.txt"]
