"""ELMo under a downstream model: AllenNLP's `Elmo`, as a Flax module.

    module, variables = load_elmo(options_file, weight_file, num_output_representations=1)
    out = module.apply(variables, char_ids)   # Batcher ids: (batch, T + 2, 50), with <S> and </S>
    out["elmo_representations"][0]            # (batch, T, 2 * projection_dim)
    out["mask"]                               # (batch, T)

It computes what AllenNLP 2.10.1's `Elmo` computes (allennlp/modules/elmo.py, scalar_mix.py):

- the biLM's layers over the whole sequence, <S> and </S> included, from a zero LSTM state on
  every call: layer 0 the token embedding twice ([x, x], zero past each sentence), then each
  LSTM layer as [forward, backward];
- each output representation its own scalar mix, gamma * sum_k softmax(s)_k * f(layer_k), with
  f the identity or, with do_layer_norm, (x - mean) / sqrt(variance + 1e-13) whose mean and
  variance are taken over the mask's positions of the whole batch, <S> and </S> included;
  `scalar_mix_parameters` fix s (not trained; gamma then stays 1);
- then <S> and </S> removed (unless keep_sentence_boundaries), then dropout on each
  representation (`deterministic=False` with a 'dropout' rng).

Where bilm-tf's `weight_layers` (elmojax.elmo) differs: it mixes layers with <S> and </S>
already removed, so its layer-norm statistics leave them out; its epsilon is 1e-12; it adds
1/L to the weights before the softmax (no change to the result) and returns an l2 penalty; it
applies no dropout. (AllenNLP's own `Elmo` also carries the LSTM state from call to call unless
reset; this module, like `BidirectionalLanguageModel`'s default, does not.)

With `requires_grad=False` gradients stop at the biLM's outputs: only the mixes train.
`vocab_to_cache` runs the char CNN once for those tokens (AllenNLP's fast path); the module then
also takes `word_inputs`, (batch, T) indices into that list with 0 for padding (so the list's
first entry stands for padding), with <S> and </S> added by the module; `word_ids` makes them
from tokens, naming any token outside the cache.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from elmojax.dropout import Dropout
from elmojax.embed import embed_tokens, load_bilm_params
from elmojax.model import BiLM, zero_state
from elmojax.options import BiLMOptions, load_options
from elmojax.vocab import BOS, EOS, spell

LAYER_NORM_EPSILON = 1e-13  # allennlp.nn.util.tiny_value_of_dtype(torch.float32)


def scalar_mix(layers: Sequence[jax.Array], mask: jax.Array, weights: jax.Array, gamma: jax.Array,
               do_layer_norm: bool = False) -> jax.Array:
    """AllenNLP's ScalarMix: gamma * sum_k softmax(weights)_k * f(layers[k]), each layer
    (batch, time, dim); f the identity, or layer normalization over mask's positions."""
    normed = jax.nn.softmax(jnp.asarray(weights, jnp.float32))
    if do_layer_norm:
        m = mask[..., None].astype(layers[0].dtype)
        n = jnp.sum(m) * layers[0].shape[-1]

        def f(x):
            mean = jnp.sum(x * m) / n
            variance = jnp.sum(((x * m - mean) * m) ** 2) / n
            return (x - mean) / jnp.sqrt(variance + LAYER_NORM_EPSILON)
    else:
        def f(x):
            return x
    return jnp.reshape(gamma, ()) * sum(normed[k] * f(x) for k, x in enumerate(layers))


def remove_sentence_boundaries(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(batch, T + 2, ...) with <S> first and </S> after each row's last token -> (batch, T, ...),
    zero past each row's end, and the new mask (batch, T)."""
    lengths = jnp.sum(mask, axis=1) - 2
    inner = jnp.arange(x.shape[1] - 2)[None, :] < lengths[:, None]
    shape = inner.shape + (1,) * (x.ndim - 2)
    return jnp.where(inner.reshape(shape), x[:, 1:-1], 0), inner


class Elmo(nn.Module):
    """AllenNLP's Elmo (see the module docstring); make one with `load_elmo`."""

    options: BiLMOptions
    num_output_representations: int
    requires_grad: bool = False
    do_layer_norm: bool = False
    dropout: float = 0.5
    keep_sentence_boundaries: bool = False
    scalar_mix_parameters: Optional[tuple[float, ...]] = None
    n_cached_tokens: int = 0  # vocab_to_cache's length: params['word_embedding'] has its rows

    @nn.compact
    def __call__(self, char_ids: Optional[jax.Array] = None, word_inputs: Optional[jax.Array] = None,
                 deterministic: bool = True) -> dict:
        bilm = BiLM(self.options, use_character_inputs=True, name="bilm")
        embedding = None
        if word_inputs is not None:
            if not self.n_cached_tokens:
                raise ValueError("word_inputs need a module made with vocab_to_cache")
            table = self.param("word_embedding", nn.initializers.zeros,
                               (self.n_cached_tokens, self.options.projection_dim))
            # <S> and </S>'s embeddings: fixed, as AllenNLP's (its cached table trains if requires_grad)
            boundaries = jax.lax.stop_gradient(
                self.param("boundary_embedding", nn.initializers.zeros, (2, self.options.projection_dim)))
            word_inputs = jnp.asarray(word_inputs)
            lengths = jnp.sum(word_inputs > 0, axis=1)
            positions = jnp.arange(word_inputs.shape[1] + 2)[None, :]
            inner = jnp.take(table, jnp.pad(word_inputs, ((0, 0), (1, 1))), axis=0)
            embedding = jnp.where((positions == 0)[..., None], boundaries[0],
                                  jnp.where((positions == lengths[:, None] + 1)[..., None], boundaries[1], inner))
            mask = positions < lengths[:, None] + 2
            char_ids = mask[..., None].astype(jnp.int32)  # stands for the char ids: BiLM reads its mask from them
        elif char_ids is None:
            raise ValueError("Elmo needs char_ids (Batcher ids) or word_inputs")
        char_ids = jnp.asarray(char_ids)
        output, _ = bilm(char_ids, zero_state(self.options, char_ids.shape[0]), True, embedding)
        mask = output.mask
        layers = [jnp.concatenate([output.embedding, output.embedding], axis=-1)]
        layers += [jnp.concatenate([f, b], axis=-1) for f, b in zip(output.forward, output.backward)]
        if not self.requires_grad:
            layers = [jax.lax.stop_gradient(x) for x in layers]
        representations = []
        for k in range(self.num_output_representations):
            if self.scalar_mix_parameters is None:
                weights = self.param(f"scalar_mix_{k}_weights", nn.initializers.zeros, (len(layers),))
                gamma = self.param(f"scalar_mix_{k}_gamma", nn.initializers.ones, (1,))
            else:
                weights, gamma = jnp.asarray(self.scalar_mix_parameters, jnp.float32), jnp.ones((1,), jnp.float32)
            mixed = scalar_mix(layers, mask, weights, gamma, self.do_layer_norm)
            out_mask = mask
            if not self.keep_sentence_boundaries:
                mixed, out_mask = remove_sentence_boundaries(mixed, mask)
            representations.append(Dropout(self.dropout, name=f"dropout_{k}")(mixed, deterministic))
        return {"elmo_representations": representations, "mask": out_mask}


def word_ids(sentences: Sequence[Sequence[str]], vocab_to_cache: Sequence[str]) -> np.ndarray:
    """(n, max_len) indices into vocab_to_cache, 0 for padding: the `word_inputs` of a module
    made with that cache. A token outside the cache is an error naming it."""
    index = {token: i for i, token in enumerate(vocab_to_cache)}
    out = np.zeros((len(sentences), max((len(s) for s in sentences), default=0)), np.int32)
    for row, sentence in enumerate(sentences):
        for t, token in enumerate(sentence):
            if token not in index:
                raise ValueError(f"sentence {row}: token {token!r} is not in vocab_to_cache")
            out[row, t] = index[token]
    return out


def load_elmo(options_file: str, weight_file: str, num_output_representations: int, requires_grad: bool = False,
              do_layer_norm: bool = False, dropout: float = 0.5, vocab_to_cache: Optional[Sequence[str]] = None,
              keep_sentence_boundaries: bool = False,
              scalar_mix_parameters: Optional[Sequence[float]] = None) -> tuple[Elmo, dict]:
    """AllenNLP's `Elmo(options_file, weight_file, ...)` arguments -> (module, variables), with
    the pretrained biLM in variables['params']['bilm'] (an hdf5 weight file or a bilm-tf
    training checkpoint) and the mixes' params beside it."""
    options = load_options(options_file)
    if not options.bidirectional or options.char_cnn is None:
        raise ValueError(f"{options_file}: Elmo needs a bidirectional biLM with character inputs")
    if num_output_representations < 1:
        raise ValueError(f"num_output_representations must be at least 1, got {num_output_representations}")
    n_layers = options.lstm.n_layers + 1
    if scalar_mix_parameters is not None:
        scalar_mix_parameters = tuple(float(w) for w in scalar_mix_parameters)
        if len(scalar_mix_parameters) != n_layers:
            raise ValueError(f"scalar_mix_parameters has {len(scalar_mix_parameters)} weights; the biLM has "
                             f"{n_layers} layers")
    params = {"bilm": load_bilm_params(options_file, options, weight_file)}
    module = Elmo(options, num_output_representations, requires_grad, do_layer_norm, dropout, keep_sentence_boundaries,
                  scalar_mix_parameters, len(vocab_to_cache) if vocab_to_cache is not None else 0)
    if scalar_mix_parameters is None:
        for k in range(num_output_representations):
            params[f"scalar_mix_{k}_weights"] = jnp.zeros((n_layers,), jnp.float32)
            params[f"scalar_mix_{k}_gamma"] = jnp.ones((1,), jnp.float32)
    if vocab_to_cache is not None:
        width = options.char_cnn.max_characters_per_token
        spelled = np.stack([spell(t, width) for t in [BOS, EOS, *vocab_to_cache]]) + 1
        table = jnp.asarray(embed_tokens(params["bilm"], options, spelled, batch_size=min(4096, len(spelled))))
        params["boundary_embedding"], params["word_embedding"] = table[:2], table[2:]
    return module, {"params": params}
