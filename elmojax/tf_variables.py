"""bilm-tf's TensorFlow variable names for the training params, and Adagrad's slots.

bilm-tf's training graph (bilm/training.py) names its variables

  lm/char_embed, lm/CNN/W_cnn_{i}, lm/CNN/b_cnn_{i}, lm/CNN_high_{i}/..., lm/CNN_proj/...   (chars)
  lm/embedding                                                                           (words)
  lm/RNN_{d}/rnn/multi_rnn_cell/cell_{l}/lstm_cell/{kernel, bias, projection/kernel}
      (lm/RNN_{d}/rnn/lstm_cell/... with one layer; d = 0 forward, 1 backward)
  lm/softmax/W (unless shared with lm/embedding), lm/softmax/b

and Adagrad keeps each one's accumulator in `<name>/Adagrad`. These are the names of its
checkpoints, and bin/dump_weights.py maps them to the hdf5 schema (`elmojax.hdf5`) by the
rules `hdf5_name` follows; `tf_layout` is that schema under TensorFlow's names, plus the softmax.
The params are the trainer's: {'bilm': BiLM params, 'softmax': {'W', 'b'}} ('b' alone when the
softmax is shared with the word embedding).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from elmojax import hdf5
from elmojax.options import BiLMOptions

ADAGRAD_SLOT = "Adagrad"

_LSTM_NAMES = {"W_0": "kernel", "B": "bias", "W_P_0": "projection/kernel"}


def _tf_name(hdf5_dataset: str, n_layers: int) -> str:
    """A weight-file dataset's training variable name (the inverse of dump_weights' renaming)."""
    m = re.fullmatch(r"RNN_(\d)/RNN/MultiRNNCell/Cell(\d+)/LSTMCell/(\w+)", hdf5_dataset)
    if m is None:
        return "lm/" + hdf5_dataset
    direction, layer, name = m.groups()
    cell = f"multi_rnn_cell/cell_{layer}/lstm_cell" if n_layers > 1 else "lstm_cell"
    return f"lm/RNN_{direction}/rnn/{cell}/{_LSTM_NAMES[name]}"


def tf_layout(options: BiLMOptions, share_embedding_softmax: bool = False) -> list[hdf5.Entry]:
    """(TensorFlow name, params path, shape) of every trainable variable of bilm-tf's training
    graph for these options (with n_tokens_vocab, the softmax's rows)."""
    if options.n_tokens_vocab is None:
        raise ValueError("the training variables need n_tokens_vocab (the softmax's rows)")
    entries = [(_tf_name(name, options.lstm.n_layers), ("bilm",) + path, shape)
               for name, path, shape in hdf5.embedder_layout(options) + hdf5.lstm_layout(options)]
    if not share_embedding_softmax:
        entries.append(("lm/softmax/W", ("softmax", "W"), (options.n_tokens_vocab, options.projection_dim)))
    entries.append(("lm/softmax/b", ("softmax", "b"), (options.n_tokens_vocab,)))
    return entries


def params_from_tf(variables: Mapping[str, np.ndarray], options: BiLMOptions, share_embedding_softmax: bool = False,
                   slot: str = "", source: str = "variables") -> dict:
    """The trainer's params from TensorFlow variables by name (a checkpoint's, or a recorded
    run's); with `slot` (ADAGRAD_SLOT), the same tree from each variable's slot instead, i.e.
    Adagrad's accumulators. Every variable must be there with its shape; an error names the one
    that is not."""
    params: dict = {}
    for name, path, shape in tf_layout(options, share_embedding_softmax):
        key = f"{name}/{slot}" if slot else name
        if key not in variables:
            raise ValueError(f"{source}: no variable '{key}' (expected shape {shape} for these options)")
        value = np.asarray(variables[key], np.float32)
        if value.shape != tuple(shape):
            raise ValueError(f"{source}: variable '{key}' has shape {value.shape}, but the options need {tuple(shape)}")
        node = params
        for k in path[:-2]:
            node = node.setdefault(k, {})
        if path[-1] == "W_0":  # the model keeps the kernel [W_x; W_h] as two params
            node.setdefault(path[-2], {}).update(zip(("W_x", "W_h"), hdf5.split_lstm_kernel(value, options)))
        else:
            node.setdefault(path[-2], {})[path[-1]] = value
    return params
