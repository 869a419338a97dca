"""Model files in and out: the vocabulary, a trained model from a workdir or an exported weight
file (load_trained), the start of a fine-tuning run (init_from), and export in bilm-tf's format.

A workdir holds checkpoints (elmojax.checkpoint), options.json and a copy of the vocabulary
(VOCAB_FILE). An export is bilm-tf's hdf5 weight file with options.json, the softmax
(FILE_softmax.hdf5) and the vocabulary beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from elmojax import checkpoint, config as config_lib, files, hdf5
from elmojax.options import N_CHARACTERS_PREDICT, BiLMOptions
from elmojax.trainer import Trainer
from elmojax.vocab import UnicodeCharsVocabulary, Vocabulary

log = logging.getLogger(__name__)

VOCAB_FILE = "vocab.txt"  # the vocabulary, copied into the workdir


def load_vocab(config: ml_collections.ConfigDict, vocab_file: Optional[str] = None) -> Vocabulary:
    vocab_file = vocab_file or config.data.vocab_file
    if not vocab_file:
        raise ValueError("no vocabulary: set --config.data.vocab_file=FILE")
    if config_lib.use_character_inputs(config):
        return UnicodeCharsVocabulary(vocab_file, config.model.char_cnn.max_characters_per_token, validate_file=True)
    return Vocabulary(vocab_file, validate_file=True)


def vocab_tokens(vocab: Vocabulary) -> list[str]:
    return [vocab.id_to_word(i) for i in range(vocab.size)]


def remap_rows(old: np.ndarray, old_vocab: list[str], new: np.ndarray, new_vocab: list[str]) -> tuple[np.ndarray, int]:
    """Rows of `new` (fresh init) overwritten by `old`'s rows for tokens both vocabularies have."""
    index = {token: i for i, token in enumerate(old_vocab)}
    out = np.array(new, copy=True)
    shared = [(j, index[t]) for j, t in enumerate(new_vocab) if t in index]
    if shared:
        new_ids, old_ids = map(np.array, zip(*shared))
        out[new_ids] = np.asarray(old)[old_ids]
    return out, len(shared)


def exported_files(weight_file: str, softmax_file: str = "") -> dict:
    stem, _ = os.path.splitext(weight_file)
    directory = os.path.dirname(os.path.abspath(weight_file))
    return {"weights": weight_file, "options": os.path.join(directory, "options.json"),
            "softmax": softmax_file or f"{stem}_softmax.hdf5", "vocab": os.path.join(directory, VOCAB_FILE)}


def trained_vocab_file(path: str) -> str:
    """The vocabulary of a workdir (copied into it) or of an exported weight file (beside it)."""
    return os.path.join(path, VOCAB_FILE) if os.path.isdir(path) else exported_files(path)["vocab"]


def load_trained(path: str, softmax_file: str = "") -> tuple[dict, dict, list[str]]:
    """(params, options.json dict, vocabulary tokens) of a workdir's latest checkpoint or an export."""
    if os.path.isdir(path):
        vocab = Vocabulary(trained_vocab_file(path))

        def abstract_state(meta: dict):
            config = ml_collections.ConfigDict(json.loads(meta["config"]))
            trainer = Trainer(config, vocab.size, Mesh(np.array(jax.local_devices()[:1]), ("data",)))
            return trainer.abstract_state(meta["global_batch_size"])  # the carry as saved; only params are used

        _, state, meta, _ = checkpoint.restore(path, abstract_state)
        return jax.device_get(state.params), meta["options"], vocab_tokens(vocab)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: neither a workdir with checkpoints nor an exported weight file")
    exported = exported_files(path, softmax_file)
    if not os.path.isfile(exported["options"]):
        raise ValueError(f"{path}: no options.json beside it ({exported['options']})")
    options_d = files.read_json(exported["options"])
    options = BiLMOptions.from_dict(options_d, source=exported["options"])
    if not os.path.isfile(exported["softmax"]):
        raise ValueError(f"{path}: no softmax file {exported['softmax']} (give --config.init_softmax_from=FILE)")
    softmax_w, softmax_b, vocab = hdf5.load_softmax(exported["softmax"])
    if vocab is None:
        vocab = vocab_tokens(Vocabulary(exported["vocab"]))
    if options.char_cnn is None:
        options = dataclasses.replace(options, n_tokens_vocab=softmax_w.shape[0])
    params = {"bilm": hdf5.load_weights(path, options), "softmax": {"W": softmax_w, "b": softmax_b}}
    if options_d.get("share_embedding_softmax"):
        del params["softmax"]["W"]
    return params, options_d, vocab


def _architecture(options_d: dict) -> dict:
    d = BiLMOptions.from_dict(options_d).to_dict()
    d.pop("n_tokens_vocab", None)
    if "char_cnn" in d:
        d["char_cnn"].pop("n_characters")
    return d


def architecture_difference(trained: dict, ours: dict) -> Optional[str]:
    """The first field in which two options.json dicts' architectures differ, as
    "lstm.dim: 16 in the trained model, 32 in the config"; None if they are the same model."""
    def flat(d, prefix=""):
        out = {}
        for key, value in d.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    a, b = flat(_architecture(trained)), flat(_architecture(ours))
    for field in sorted(set(a) | set(b)):
        if a.get(field) != b.get(field):
            return f"{field}: {a.get(field)} in the trained model, {b.get(field)} in the config"
    return None


def init_from(trainer: Trainer, fresh: dict, path: str, softmax_file: str, vocab: list[str]) -> dict:
    """Params for fine-tuning: the trained model's, with softmax (and word embedding) rows
    re-mapped by token onto the new vocabulary; tokens it did not have keep their fresh init."""
    params, options_d, old_vocab = load_trained(path, softmax_file)
    difference = architecture_difference(options_d, config_lib.options_json(trainer.config))
    if difference:
        raise ValueError(f"{path}: its architecture differs from the config's model ({difference})")
    fresh = jax.device_get(fresh)
    out = {"bilm": params["bilm"], "softmax": dict(fresh["softmax"])}
    if trainer.options.char_cnn is None:
        out["bilm"]["embedder"]["embedding"], _ = remap_rows(
            params["bilm"]["embedder"]["embedding"], old_vocab, fresh["bilm"]["embedder"]["embedding"], vocab)
    for name in out["softmax"]:
        if name in params["softmax"]:
            out["softmax"][name], n_shared = remap_rows(params["softmax"][name], old_vocab, fresh["softmax"][name], vocab)
    log.info("init from %s: %d of %d vocabulary tokens re-mapped from the trained softmax, %d initialized fresh",
             path, n_shared, len(vocab), len(vocab) - n_shared)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), out)


def export(path: str, output: str, trained: Optional[tuple] = None) -> dict:
    """Writes a trained model as bilm-tf files: weights (hdf5), options.json (n_characters 262)
    beside them, the softmax (softmax/W, softmax/b, and the vocabulary) and vocab.txt.
    All four are written together or not at all (a full disk leaves nothing behind)."""
    if os.path.isdir(output):
        raise ValueError(f"--output={output}: a directory; give the weight file to write (FILE.hdf5)")
    params, options_d, tokens = trained or load_trained(path)
    options = BiLMOptions.from_dict(options_d, source=path)
    exported = exported_files(output)
    prediction_options = dict(options_d)
    if "char_cnn" in prediction_options:
        prediction_options["char_cnn"] = {**prediction_options["char_cnn"], "n_characters": N_CHARACTERS_PREDICT}
    softmax_w = params["softmax"].get("W")
    if softmax_w is None:  # shared with the word embedding
        softmax_w = params["bilm"]["embedder"]["embedding"]
    files.write_bytes({
        output: hdf5.weights_image(params["bilm"], options, output),
        exported["options"]: (json.dumps(prediction_options, indent=2) + "\n").encode("utf-8"),
        exported["softmax"]: hdf5.softmax_image(softmax_w, params["softmax"]["b"], exported["softmax"], tokens),
        exported["vocab"]: "".join(t + "\n" for t in tokens).encode("utf-8"),
    })
    return exported
