"""AllenNLP's ELMo interface as AllenNLP code calls it, so that such code runs with only its
import line changed:

    from elmojax.allennlp import Elmo, batch_to_ids     # was: from allennlp.modules.elmo import ...
    elmo = Elmo(options_file, weight_file, 2, dropout=0)
    embeddings = elmo(batch_to_ids(sentences))           # {"elmo_representations": [...], "mask": ...}

`batch_to_ids` gives AllenNLP's ids exactly ((n, T, 50), no sentence boundaries) and this Elmo
adds <S> and </S> as AllenNLP's does. Like a torch module, it applies dropout until `.eval()`
(with its own PRNG key, split at each call; `seed` sets it). For JAX code (jit, grad, optax),
use `elmojax.load_elmo`'s Flax module and variables, which this holds as `.module` and
`.variables`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from elmojax.formats.vocab import batch_char_ids, batch_to_ids
from elmojax.infer.elmo import load_elmo

__all__ = ["Elmo", "batch_to_ids"]


def _with_boundaries(character_ids) -> np.ndarray:
    """AllenNLP's ids with each sentence's <S> row before it and </S> row after it (Batcher's ids)."""
    ids = np.asarray(character_ids)
    if ids.ndim != 3:
        raise ValueError(f"inputs must be batch_to_ids' (batch, time, characters) ids, got shape {ids.shape}")
    lengths = (ids > 0).any(axis=-1).sum(axis=1)
    bos, eos = batch_char_ids([[]], ids.shape[-1])[0]
    out = np.zeros((ids.shape[0], ids.shape[1] + 2, ids.shape[2]), ids.dtype)
    out[:, 1:-1] = ids
    out[:, 0] = bos
    out[np.arange(len(ids)), lengths + 1] = eos
    return out


class Elmo:
    """allennlp.modules.elmo.Elmo's arguments and call: elmo(character_ids) returns
    {"elmo_representations": num_output_representations arrays (batch, time, dim), "mask"}."""

    def __init__(self, options_file: str, weight_file: str, num_output_representations: int,
                 requires_grad: bool = False, do_layer_norm: bool = False, dropout: float = 0.5,
                 vocab_to_cache: Optional[Sequence[str]] = None, keep_sentence_boundaries: bool = False,
                 scalar_mix_parameters: Optional[Sequence[float]] = None, seed: int = 0):
        self.module, self.variables = load_elmo(options_file, weight_file, num_output_representations,
                                                requires_grad, do_layer_norm, dropout, vocab_to_cache,
                                                keep_sentence_boundaries, scalar_mix_parameters)
        self.training = True
        self._rng = jax.random.PRNGKey(seed)

    def eval(self) -> "Elmo":
        self.training = False
        return self

    def train(self, mode: bool = True) -> "Elmo":
        self.training = mode
        return self

    def __call__(self, inputs=None, word_inputs=None) -> dict:
        rngs = {}
        if self.training:
            self._rng, rngs["dropout"] = jax.random.split(self._rng)
        char_ids = None if inputs is None else _with_boundaries(inputs)
        return self.module.apply(self.variables, char_ids, word_inputs, deterministic=not self.training, rngs=rngs)
