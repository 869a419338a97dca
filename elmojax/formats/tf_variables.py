"""bilm-tf's TensorFlow variable names for the training params, and Adagrad's slots.

bilm-tf's training graph (bilm/training.py) names its variables

  lm/char_embed, lm/CNN/W_cnn_{i}, lm/CNN/b_cnn_{i}, lm/CNN_high_{i}/..., lm/CNN_proj/...   (chars)
  lm/embedding                                                                           (words)
  lm/RNN_{d}/rnn/multi_rnn_cell/cell_{l}/lstm_cell/{kernel, bias, projection/kernel}
      (lm/RNN_{d}/rnn/lstm_cell/... with one layer; d = 0 forward, 1 backward)
  lm/softmax/W (unless shared with lm/embedding), lm/softmax/b

and Adagrad keeps each one's accumulator in `<name>/Adagrad`. These are the names of its
checkpoints, and bin/dump_weights.py maps them to the hdf5 schema (`elmojax.formats.hdf5`) by the
rules `_tf_name` inverts; `tf_layout` is that schema under TensorFlow's names, plus the softmax.
Older TensorFlow releases named the LSTM's variables `weights`, `biases`, `projection/weights`,
or (before 1.0) `RNN/MultiRNNCell/Cell{l}/LSTMCell/{W_0, B, W_P_0}` as in the hdf5 schema; a
checkpoint in any of these layouts is read (`read_training_checkpoint`).
The params are the trainer's: {'bilm': BiLM params, 'softmax': {'W', 'b'}} ('b' alone when the
softmax is shared with the word embedding).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Mapping, Optional

import numpy as np

from elmojax.formats import files, hdf5
from elmojax.formats.options import BiLMOptions
from elmojax.formats.tf_checkpoint import TFCheckpoint

ADAGRAD_SLOT = "Adagrad"

_LSTM_NAMES = {"W_0": "kernel", "B": "bias", "W_P_0": "projection/kernel"}
_OLDER_LSTM_NAMES = {"kernel": "weights", "bias": "biases", "projection/kernel": "projection/weights"}
_LSTM_VARIABLE = re.compile(r"lm/RNN_(\d)/rnn/(?:multi_rnn_cell/cell_(\d+)/)?lstm_cell/(kernel|bias|projection/kernel)")


def _tf_name(hdf5_dataset: str, n_layers: int) -> str:
    """A weight-file dataset's training variable name (the inverse of dump_weights' renaming)."""
    m = re.fullmatch(r"RNN_(\d)/RNN/MultiRNNCell/Cell(\d+)/LSTMCell/(\w+)", hdf5_dataset)
    if m is None:
        return "lm/" + hdf5_dataset
    direction, layer, name = m.groups()
    cell = f"multi_rnn_cell/cell_{layer}/lstm_cell" if n_layers > 1 else "lstm_cell"
    return f"lm/RNN_{direction}/rnn/{cell}/{_LSTM_NAMES[name]}"


def tf_layout(options: BiLMOptions, share_embedding_softmax: bool = False, softmax: bool = True) -> list[hdf5.Entry]:
    """(TensorFlow name, params path, shape) of every trainable variable of bilm-tf's training
    graph for these options (with n_tokens_vocab, the softmax's rows); softmax=False: the biLM's alone."""
    entries = [(_tf_name(name, options.lstm.n_layers), ("bilm",) + path, shape)
               for name, path, shape in hdf5.embedder_layout(options) + hdf5.lstm_layout(options)]
    if not softmax:
        return entries
    if options.n_tokens_vocab is None:
        raise ValueError("the training variables need n_tokens_vocab (the softmax's rows)")
    if not share_embedding_softmax:
        entries.append(("lm/softmax/W", ("softmax", "W"), (options.n_tokens_vocab, options.projection_dim)))
    entries.append(("lm/softmax/b", ("softmax", "b"), (options.n_tokens_vocab,)))
    return entries


def params_from_tf(variables: Mapping[str, np.ndarray], options: BiLMOptions, share_embedding_softmax: bool = False,
                   slot: str = "", source: str = "variables", softmax: bool = True) -> dict:
    """The trainer's params from TensorFlow variables by name (a checkpoint's, or a recorded
    run's); with `slot` (ADAGRAD_SLOT), the same tree from each variable's slot instead, i.e.
    Adagrad's accumulators. Every variable must be there with its shape, finite; an error names
    the one that is not."""
    params: dict = {}
    for name, path, shape in tf_layout(options, share_embedding_softmax, softmax):
        key = f"{name}/{slot}" if slot else name
        if key not in variables:
            raise ValueError(f"{source}: no variable '{key}' (expected shape {shape} for these options)")
        value = np.asarray(variables[key], np.float32)
        if value.shape != tuple(shape):
            raise ValueError(f"{source}: variable '{key}' has shape {value.shape}, but the options need {tuple(shape)}")
        hdf5.check_finite(value, source, key, what="variable")
        hdf5.place(params, path, value, options)
    return params


def name_variants(name: str) -> list[str]:
    """A training variable's name as the TensorFlow releases bilm-tf ran on wrote it, newest first."""
    m = _LSTM_VARIABLE.fullmatch(name)
    if m is None:
        return [name]
    direction, layer, what = m.groups()
    cell = f"multi_rnn_cell/cell_{layer}/lstm_cell" if layer is not None else "lstm_cell"
    old_cell = f"MultiRNNCell/Cell{layer}/LSTMCell" if layer is not None else "LSTMCell"
    hdf5_name = {v: k for k, v in _LSTM_NAMES.items()}[what]
    return [name, f"lm/RNN_{direction}/rnn/{cell}/{_OLDER_LSTM_NAMES[what]}",
            f"lm/RNN_{direction}/RNN/{old_cell}/{hdf5_name}"]


@dataclasses.dataclass
class TrainingCheckpoint:
    """What a bilm-tf training checkpoint holds, in the trainer's terms."""

    prefix: str
    options: dict                  # the options.json beside it, as bilm-tf wrote it
    params: dict                   # the trainer's params
    accumulators: Optional[dict]   # Adagrad's, the same tree (None: the checkpoint has no slots)
    global_step: Optional[int]
    vocab_file: Optional[str]      # the vocabulary beside it, if there is one


def vocab_beside(directory: str) -> Optional[str]:
    """The vocabulary file in a checkpoint's directory: vocab.txt, or its only vocab*.txt."""
    if os.path.isfile(os.path.join(directory, "vocab.txt")):
        return os.path.join(directory, "vocab.txt")
    found = sorted(glob.glob(os.path.join(glob.escape(directory), "vocab*.txt")))
    return found[0] if len(found) == 1 else None


def read_training_checkpoint(path: str, options_file: Optional[str] = None, softmax: bool = True) -> TrainingCheckpoint:
    """A bilm-tf training checkpoint (a prefix, one of its files, or its directory) with the
    options.json bilm-tf writes beside it (or `options_file`); its variables must be those of
    the options' model (in any of the layouts of `name_variants`), with their shapes.
    softmax=False reads the biLM alone (no softmax, no accumulators)."""
    checkpoint = TFCheckpoint(path)
    directory = os.path.dirname(checkpoint.prefix) or "."
    options_file = options_file or os.path.join(directory, "options.json")
    if not os.path.isfile(options_file):
        raise ValueError(f"{checkpoint.prefix}: no options.json beside the checkpoint ({options_file}); bilm-tf "
                         f"writes the model's options there")
    options_d = files.read_json(options_file)
    options = BiLMOptions.from_dict(options_d, source=options_file)
    share = bool(options_d.get("share_embedding_softmax", False))
    layout = tf_layout(options, share, softmax)
    found = {}
    for name, _, _ in layout:
        present = [v for v in name_variants(name) if v in checkpoint]
        if not present:
            raise ValueError(f"{checkpoint.prefix}: no variable '{name}' (nor an older name of it) for the model of "
                             f"{options_file}; the checkpoint holds:\n{checkpoint.describe()}")
        found[name] = present[0]
    source = checkpoint.prefix
    params = params_from_tf({name: checkpoint.read(v) for name, v in found.items()}, options, share, source=source,
                            softmax=softmax)
    slots = {name: f"{v}/{ADAGRAD_SLOT}" for name, v in found.items()}
    accumulators = None
    if softmax and any(slot in checkpoint for slot in slots.values()):
        missing = [slot for slot in slots.values() if slot not in checkpoint]
        if missing:
            raise ValueError(f"{source}: Adagrad's accumulator '{missing[0]}' is missing ({len(missing)} of "
                             f"{len(slots)}), though others are there")
        accumulators = params_from_tf({name: checkpoint.read(slot) for name, slot in slots.items()}, options, share,
                                      source=source)
    step = int(checkpoint.read("global_step")) if "global_step" in checkpoint else None
    return TrainingCheckpoint(checkpoint.prefix, options_d, params, accumulators, step, vocab_beside(directory))
