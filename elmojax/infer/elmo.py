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

Where bilm-tf's `weight_layers` (elmojax.infer.mix) differs: it mixes layers with <S> and </S>
already removed, so its layer-norm statistics leave them out; its epsilon is 1e-12; it adds
1/L to the weights before the softmax (no change to the result) and returns an l2 penalty; it
applies no dropout. (AllenNLP's own `Elmo` also carries the LSTM state from call to call unless
reset; this module, like `BidirectionalLanguageModel`'s default, does not.)

With `requires_grad=False` (the default) the biLM's weights (and a cached vocabulary's table) are
no params: they live in the FROZEN ("frozen") collection, Flax's place for non-trainable state,
so an optimizer over variables["params"] (weight decay included) neither moves them nor keeps
state for them, and gradients stop at the biLM's outputs: only the mixes train. With
`requires_grad=True` they are params like the mixes. The cached <S> and </S> embeddings never
train: they are always in FROZEN.
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

from elmojax.model.dropout import Dropout
from elmojax.formats.checks import (check_array, check_bool, check_int, check_mask_values, check_path, check_real,
                                    concrete)
from elmojax.formats import remote
from elmojax.formats.options import BiLMOptions, N_CHARACTERS_TRAIN
from elmojax.formats.vocab import BOS, EOS, _check_sentences, check_tokens, spell
from elmojax.infer.bidirectional_lm import embed_tokens, load_bilm_params, read_options
from elmojax.infer.mix import masked_layer_norm
from elmojax.model.bilm import BiLM, zero_state

LAYER_NORM_EPSILON = 1e-13  # allennlp.nn.util.tiny_value_of_dtype(torch.float32)
FROZEN = "frozen"  # the collection of the weights no optimizer over "params" sees


def scalar_mix(layers: Sequence[jax.Array], mask: jax.Array, weights: jax.Array, gamma: jax.Array,
               do_layer_norm: bool = False) -> jax.Array:
    """AllenNLP's ScalarMix: gamma * sum_k softmax(weights)_k * f(layers[k]), each layer
    (batch, time, dim); f the identity, or layer normalization over mask's positions."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__len__") or len(layers) == 0:
        raise TypeError(f"layers must be a non-empty list of (batch, time, dim) arrays, got {type(layers).__name__}")
    layers = [check_array(f"layers[{k}]", x, 3, "float", " (batch, time, dim)") for k, x in enumerate(layers)]
    if any(tuple(x.shape) != tuple(layers[0].shape) for x in layers):
        raise ValueError(f"layers must all have one shape, got {[tuple(x.shape) for x in layers]}")
    mask = check_array("mask", mask, 2, "mask", " (batch, time)")
    if tuple(mask.shape) != tuple(layers[0].shape[:2]):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; layers of shape {tuple(layers[0].shape)} need "
                         f"(batch, time) = {tuple(layers[0].shape[:2])}")
    check_mask_values("mask", mask)
    weights = check_array("weights", weights, kind="real")
    if tuple(weights.shape) != (len(layers),):
        raise ValueError(f"weights must have shape ({len(layers)},), one per layer; got {tuple(weights.shape)}")
    gamma = check_array("gamma", gamma, kind="real")
    if gamma.size != 1:
        raise ValueError(f"gamma must be a scalar or of shape (1,), got shape {tuple(gamma.shape)}")
    do_layer_norm = check_bool("do_layer_norm", do_layer_norm)
    normed = jax.nn.softmax(jnp.asarray(weights, jnp.float32))
    if do_layer_norm:
        layers = [masked_layer_norm(x, mask, LAYER_NORM_EPSILON) for x in layers]
    return jnp.reshape(gamma, ()) * sum(normed[k] * x for k, x in enumerate(layers))


def remove_sentence_boundaries(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(batch, T + 2, ...) with <S> first and </S> after each row's last token -> (batch, T, ...),
    zero past each row's end, and the new mask (batch, T)."""
    x = check_array("x", x, kind="real")
    mask = check_array("mask", mask, 2, "mask", " (batch, T + 2)")
    if x.ndim < 2 or tuple(x.shape[:2]) != tuple(mask.shape) or mask.shape[1] < 2:
        raise ValueError(f"x {tuple(x.shape)} and mask {tuple(mask.shape)} must both start (batch, T + 2), "
                         f"with <S> and </S> in T + 2")
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
    n_cached_tokens: int = 0  # vocab_to_cache's length: the 'word_embedding' variable has its rows

    def __post_init__(self):
        if not isinstance(self.options, BiLMOptions):
            raise TypeError(f"options must be a BiLMOptions (elmojax.infer.bidirectional_lm.read_options), got "
                            f"{type(self.options).__name__}")
        if not self.options.bidirectional or self.options.char_cnn is None:
            raise ValueError("Elmo needs a bidirectional biLM with character inputs")
        check_int("num_output_representations", self.num_output_representations, 1)
        check_bool("requires_grad", self.requires_grad)
        check_bool("do_layer_norm", self.do_layer_norm)
        check_real("dropout", self.dropout, 0.0, 1.0, high_open=True, what=" (the probability of dropping a value)")
        check_bool("keep_sentence_boundaries", self.keep_sentence_boundaries)
        if self.scalar_mix_parameters is not None:
            _check_mix_parameters(self.scalar_mix_parameters, self.options.lstm.n_layers + 1)
        check_int("n_cached_tokens", self.n_cached_tokens, 0)
        super().__post_init__()

    def _weights(self, name: str, init_fn, always_frozen: bool = False):
        """The variable `name`: a param if requires_grad (and not always_frozen), else in FROZEN;
        init_fn(rng) makes it where variables do not hold it (init)."""
        if self.requires_grad and not always_frozen:
            return self.param(name, init_fn)
        return self.variable(FROZEN, name, lambda: init_fn(self.make_rng("params"))).value

    def _fresh_bilm(self, rng: jax.Array) -> dict:
        """A randomly initialized biLM's params (what init makes; load_elmo's are pretrained)."""
        ids = jnp.ones((1, 2, self.options.char_cnn.max_characters_per_token), jnp.int32)
        return BiLM(self.options, use_character_inputs=True, parent=None).init(
            rng, ids, zero_state(self.options, 1))["params"]

    @nn.compact
    def __call__(self, char_ids: Optional[jax.Array] = None, word_inputs: Optional[jax.Array] = None,
                 deterministic: bool = True) -> dict:
        embedding = None
        check_bool("deterministic", deterministic)
        if char_ids is not None and word_inputs is not None:
            raise ValueError("give Elmo char_ids or word_inputs, not both")
        if word_inputs is not None:
            word_inputs = _check_word_inputs(word_inputs, self.n_cached_tokens)
            zeros = lambda rows: lambda rng: jnp.zeros((rows, self.options.projection_dim), jnp.float32)  # noqa: E731
            table = self._weights("word_embedding", zeros(self.n_cached_tokens))
            # <S> and </S>'s embeddings: fixed, as AllenNLP's (its cached table trains if requires_grad)
            boundaries = jax.lax.stop_gradient(self._weights("boundary_embedding", zeros(2), always_frozen=True))
            embedding, char_ids = _cached_embedding(jnp.asarray(word_inputs), table, boundaries)
        elif char_ids is None:
            raise ValueError("Elmo needs char_ids (Batcher ids) or word_inputs")
        else:
            char_ids = _check_char_ids(char_ids, self.options.char_cnn.max_characters_per_token)
        char_ids = jnp.asarray(char_ids)
        bilm = BiLM(self.options, use_character_inputs=True, parent=None)  # applied to params held here
        output, _ = bilm.apply({"params": self._weights("bilm", self._fresh_bilm)}, char_ids,
                               zero_state(self.options, char_ids.shape[0]), True, embedding)
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


def _check_word_inputs(word_inputs, n_cached_tokens: int):
    """word_inputs, (batch, time) indices into vocab_to_cache with 0 for padding, checked."""
    if not n_cached_tokens:
        raise ValueError("word_inputs need a module made with vocab_to_cache")
    word_inputs = check_array("word_inputs", word_inputs, 2, "int", " (batch, time)")
    if concrete(word_inputs) and word_inputs.size:
        low, high = int(np.min(word_inputs)), int(np.max(word_inputs))
        if low < 0 or high >= n_cached_tokens:
            raise ValueError(f"word_inputs must lie in [0, {n_cached_tokens - 1}] (indices into "
                             f"vocab_to_cache, 0 = padding); got [{low}, {high}]")
    return word_inputs


def _cached_embedding(word_inputs: jax.Array, table: jax.Array, boundaries: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The token embeddings of word_inputs from the cached table, <S> and </S> (`boundaries`)
    added around each row, and what stands for the char ids: ones where a position is real
    (BiLM reads its mask from them)."""
    lengths = jnp.sum(word_inputs > 0, axis=1)
    positions = jnp.arange(word_inputs.shape[1] + 2)[None, :]
    inner = jnp.take(table, jnp.pad(word_inputs, ((0, 0), (1, 1))), axis=0)
    embedding = jnp.where((positions == 0)[..., None], boundaries[0],
                          jnp.where((positions == lengths[:, None] + 1)[..., None], boundaries[1], inner))
    mask = positions < lengths[:, None] + 2
    return embedding, mask[..., None].astype(jnp.int32)


def _check_char_ids(char_ids, width: int):
    """char_ids, Batcher's ids (batch, time, width) with <S> and </S>, checked."""
    char_ids = check_array("char_ids", char_ids, 3, "int", f" (batch, time, {width}): Batcher's ids")
    if char_ids.shape[2] != width or char_ids.shape[1] < 2:
        raise ValueError(f"char_ids must have shape (batch, time, {width}), time >= 2 (Batcher's ids, <S> and "
                         f"</S> included), got {tuple(char_ids.shape)}")
    if concrete(char_ids) and char_ids.size:
        low, high = int(np.min(char_ids)), int(np.max(char_ids))
        if low < 0 or high > N_CHARACTERS_TRAIN:
            raise ValueError(f"char_ids must lie in [0, {N_CHARACTERS_TRAIN}] (character ids + 1, 0 = "
                             f"padding); got [{low}, {high}]")
    return char_ids


def _check_mix_parameters(parameters, n_layers: int) -> tuple[float, ...]:
    if isinstance(parameters, (str, bytes)) or not hasattr(parameters, "__len__"):
        raise TypeError(f"scalar_mix_parameters must be a list of {n_layers} numbers, got {parameters!r:.60}")
    weights = tuple(check_real(f"scalar_mix_parameters[{k}]", w) for k, w in enumerate(parameters))
    if len(weights) != n_layers:
        raise ValueError(f"scalar_mix_parameters has {len(weights)} weights; the biLM has {n_layers} layers")
    return weights


def _check_vocab_to_cache(vocab_to_cache) -> list[str]:
    tokens = check_tokens(vocab_to_cache, "vocab_to_cache")
    if not tokens:
        raise ValueError("vocab_to_cache must hold at least one token (its first entry stands for padding)")
    return tokens


def word_ids(sentences: Sequence[Sequence[str]], vocab_to_cache: Sequence[str]) -> np.ndarray:
    """(n, max_len) indices into vocab_to_cache, 0 for padding: the `word_inputs` of a module
    made with that cache. A token outside the cache is an error naming it."""
    sentences = _check_sentences(sentences)
    index = {token: i for i, token in enumerate(_check_vocab_to_cache(vocab_to_cache))}
    out = np.zeros((len(sentences), max((len(s) for s in sentences), default=0)), np.int32)
    for row, sentence in enumerate(sentences):
        for t, token in enumerate(sentence):
            if token not in index:
                raise ValueError(f"sentence {row}: token {token!r} is not in vocab_to_cache")
            out[row, t] = index[token]
    return out


def load_elmo(options_file: Optional[str], weight_file: Optional[str] = None, num_output_representations: int = 1,
              requires_grad: bool = False,
              do_layer_norm: bool = False, dropout: float = 0.5, vocab_to_cache: Optional[Sequence[str]] = None,
              keep_sentence_boundaries: bool = False,
              scalar_mix_parameters: Optional[Sequence[float]] = None) -> tuple[Elmo, dict]:
    """AllenNLP's `Elmo(options_file, weight_file, ...)` arguments -> (module, variables): the
    pretrained biLM (an hdf5 weight file or a bilm-tf training checkpoint) in
    variables[FROZEN]['bilm'], or in variables['params']['bilm'] with requires_grad, and the
    mixes' params in variables['params']. Use: module.apply(variables, char_ids).
    weight_file may be a published name or a URL too, and options_file None (found beside it);
    or one model alone, load_elmo("small"): a published name, a weight file or its URL."""
    if weight_file is None and isinstance(options_file, str) and not options_file.endswith(".json"):  # one model
        options_file, weight_file = None, options_file
    check_path("options_file", options_file, optional=True)
    check_path("weight_file", weight_file)
    options_file, weight_file, _ = remote.model_paths(options_file, weight_file)
    num_output_representations = check_int("num_output_representations", num_output_representations, 1)
    requires_grad = check_bool("requires_grad", requires_grad)
    do_layer_norm = check_bool("do_layer_norm", do_layer_norm)
    dropout = check_real("dropout", dropout, 0.0, 1.0, high_open=True, what=" (the probability of dropping a value)")
    keep_sentence_boundaries = check_bool("keep_sentence_boundaries", keep_sentence_boundaries)
    if vocab_to_cache is not None:
        vocab_to_cache = _check_vocab_to_cache(vocab_to_cache)
    if scalar_mix_parameters is not None and (isinstance(scalar_mix_parameters, (str, bytes))
                                              or not hasattr(scalar_mix_parameters, "__len__")):
        raise TypeError(f"scalar_mix_parameters must be a list of numbers, got {scalar_mix_parameters!r:.60}")
    options = read_options(options_file)
    if not options.bidirectional or options.char_cnn is None:
        raise ValueError(f"{options_file}: Elmo needs a bidirectional biLM with character inputs")
    n_layers = options.lstm.n_layers + 1
    if scalar_mix_parameters is not None:
        scalar_mix_parameters = _check_mix_parameters(scalar_mix_parameters, n_layers)
    bilm = load_bilm_params(options_file, options, weight_file)
    module = Elmo(options, num_output_representations, requires_grad, do_layer_norm, dropout, keep_sentence_boundaries,
                  scalar_mix_parameters, len(vocab_to_cache) if vocab_to_cache is not None else 0)
    params, frozen = {}, {}
    pretrained = params if requires_grad else frozen  # AllenNLP's requires_grad: whether the biLM trains
    pretrained["bilm"] = bilm
    if scalar_mix_parameters is None:
        for k in range(num_output_representations):
            params[f"scalar_mix_{k}_weights"] = jnp.zeros((n_layers,), jnp.float32)
            params[f"scalar_mix_{k}_gamma"] = jnp.ones((1,), jnp.float32)
    if vocab_to_cache is not None:
        width = options.char_cnn.max_characters_per_token
        spelled = np.stack([spell(t, width) for t in [BOS, EOS, *vocab_to_cache]]) + 1
        table = jnp.asarray(embed_tokens(bilm, options, spelled, batch_size=min(4096, len(spelled))))
        frozen["boundary_embedding"], pretrained["word_embedding"] = table[:2], table[2:]
    return module, {"params": params, FROZEN: frozen} if frozen else {"params": params}
