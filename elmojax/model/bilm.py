"""The biLM as Flax linen modules: pure functions of (params, inputs, state).

The same modules serve inference (`elmojax.infer.bidirectional_lm`) and training. Parameter shapes are those
of bilm-tf's hdf5 weight file, but for W_0, and names follow it (see `elmojax.formats.hdf5` for the
mapping):

  embedder/      char_embed (261, d), W_cnn_i (1, width, d, n), b_cnn_i, W_carry_i, b_carry_i,
                 W_transform_i, b_transform_i, W_proj, b_proj   (character inputs)
                 embedding (vocab, projection_dim)              (token inputs)
  lstm/layer_i/  W_x (directions, in, 4 * dim) and W_h (directions, out, 4 * dim), the two row
                 blocks of each direction's W_0 (in + out, 4 * dim); B (directions, 4 * dim),
                 W_P_0 (directions, dim, projection_dim): the forward LM's at 0, the backward
                 LM's at 1 (both run in one recurrence, see elmojax.model.lstm)

Input ids use the prediction layout of bilm-tf's Batcher / TokenBatcher: ids + 1, with 0 for
padding, which embeds to a zero vector (a zero row in front of the trained table).

LSTM state is a pytree {'forward': ((c, h), ...), 'backward': ((c, h), ...)}, one (c, h) pair
per layer, each of shape (batch, dim) and (batch, output_dim).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from elmojax.formats import directions as directions_lib
from elmojax.formats.directions import BACKWARD, FORWARD
from elmojax.formats.options import BiLMOptions, CharCNNOptions, N_CHARACTERS_TRAIN
from elmojax.model.lstm import LSTMStack, uniform
from elmojax.model.numerics import PARITY, Numerics

Array = jax.Array



def _normal(stddev: float):
    return nn.initializers.normal(stddev)


def _with_padding_row(table: Array) -> Array:
    """id 0 is padding: prepend a zero row so that ids + 1 index the trained table."""
    return jnp.concatenate([jnp.zeros((1, table.shape[1]), table.dtype), table], axis=0)


@jax.custom_vjp
def max_over_positions(conv: Array) -> Array:
    """Max-pooling over the positions (axis 1) of (tokens, positions, filters).

    Its gradient goes to one maximal position. jnp.max's (and TensorFlow's) splits it among
    tied positions instead, which costs a mask and a count over the whole input; ties here are
    windows of identical characters (the padding after a word), whose equal shares add up to the
    same parameter gradients as one whole share.
    """
    return jnp.max(conv, axis=1)


def _max_over_positions_fwd(conv):
    pooled = jnp.max(conv, axis=1)
    # the first maximal position, as a plain min-reduction (XLA's argmax is a slower pair reduction)
    positions = jnp.arange(conv.shape[1], dtype=jnp.int32)[None, :, None]
    position = jnp.min(jnp.where(conv == pooled[:, None, :], positions, conv.shape[1]), axis=1)
    return pooled, (position, conv.shape[1])


def _max_over_positions_bwd(residuals, grad):
    position, n_positions = residuals
    at_max = jnp.arange(n_positions, dtype=jnp.int32)[None, :, None] == position[:, None, :]
    return (jnp.where(at_max, grad[:, None, :], 0.0),)


max_over_positions.defvjp(_max_over_positions_fwd, _max_over_positions_bwd)


class CharCNNEmbedder(nn.Module):
    """Token embeddings from characters: char embedding, CNN + max-pool, highway, projection.

    `chunk_size` runs the convolutions over that many tokens at a time (lax.map), which bounds
    the memory of their outputs (tokens x positions x filters) for large models.

    `tail_ids`, when given, says that the char ids were cut short (elmojax.model.char_ids.trim_char_ids):
    row r stood for its ids followed by tail_ids[r] up to max_characters_per_token, and every
    window left out lay wholly in that tail. Those windows all have the value of one window of
    the tail character, which takes the place of all of them in the max-pooling: the same result
    without convolving the padding after each word.
    """

    options: CharCNNOptions
    projection_dim: int
    numerics: Numerics = PARITY
    chunk_size: Optional[int] = None

    @nn.compact
    def __call__(self, char_ids: Array, tail_ids: Optional[Array] = None) -> Array:
        o = self.options
        dim, n_filters = o.embedding_dim, o.n_filters
        table = self.param("char_embed", uniform(-1.0, 1.0), (N_CHARACTERS_TRAIN, dim))
        convolutions = []
        for i, (width, num) in enumerate(o.filters):
            # bilm-tf: uniform +-0.05 for relu (Kim et al.), Glorot-like normal for tanh.
            w_init = uniform(-0.05, 0.05) if o.activation == "relu" else _normal(np.sqrt(1.0 / (width * dim)))
            convolutions.append((self.param(f"W_cnn_{i}", w_init, (1, width, dim, num)),
                                 self.param(f"b_cnn_{i}", nn.initializers.zeros, (num,))))
        highways = []
        for i in range(o.n_highway):
            highways.append((
                self.param(f"W_carry_{i}", _normal(np.sqrt(1.0 / n_filters)), (n_filters, n_filters)),
                self.param(f"b_carry_{i}", nn.initializers.constant(-2.0), (n_filters,)),
                self.param(f"W_transform_{i}", _normal(np.sqrt(1.0 / n_filters)), (n_filters, n_filters)),
                self.param(f"b_transform_{i}", nn.initializers.zeros, (n_filters,))))
        projection = None
        if n_filters != self.projection_dim:
            projection = (self.param("W_proj", _normal(np.sqrt(1.0 / n_filters)), (n_filters, self.projection_dim)),
                          self.param("b_proj", nn.initializers.zeros, (self.projection_dim,)))
        activation = jax.nn.relu if o.activation == "relu" else jnp.tanh
        padded_table = _with_padding_row(table)
        numerics = self.numerics

        def pool(ids: Array, tails: Optional[Array]) -> Array:  # (tokens, chars) -> (tokens, n_filters)
            chars = jnp.take(padded_table, ids, axis=0)
            tail_chars = None if tails is None else jnp.take(padded_table, tails, axis=0)
            pooled = []
            for kernel, bias in convolutions:
                pooled_conv = max_over_positions(numerics.conv1d(chars, kernel[0]))
                if tail_chars is not None:  # one window of the tail character, for all those left out
                    tail_window = numerics.einsum("nd,dk->nk", tail_chars, jnp.sum(kernel[0], axis=0))
                    pooled_conv = jnp.maximum(pooled_conv, tail_window)
                # max(conv + b) == max(conv) + b exactly, so the bias is added after pooling.
                pooled.append(activation(pooled_conv + bias))
            return jnp.concatenate(pooled, axis=-1)

        batch_shape, n_chars = char_ids.shape[:-1], char_ids.shape[-1]
        flat = char_ids.reshape(-1, n_chars)
        tails = None if tail_ids is None else tail_ids.reshape(-1)
        n = flat.shape[0]
        chunk = self.chunk_size
        if chunk and n > chunk:
            # Only the convolutions go in chunks: their outputs (tokens x positions x filters) are
            # what is large; the highway products are more efficient over all tokens at once.
            n_chunks = -(-n // chunk)
            flat = jnp.pad(flat, ((0, n_chunks * chunk - n), (0, 0))).reshape(n_chunks, chunk, n_chars)
            if tails is not None:
                tails = jnp.pad(tails, (0, n_chunks * chunk - n)).reshape(n_chunks, chunk)
            x = lax.map(lambda xs: pool(*xs), (flat, tails)).reshape(n_chunks * chunk, -1)[:n]
        else:
            x = pool(flat, tails)
        for w_carry, b_carry, w_transform, b_transform in highways:
            carry = jax.nn.sigmoid(numerics.einsum("nk,kd->nd", x, w_carry) + b_carry)
            transform = jax.nn.relu(numerics.einsum("nk,kd->nd", x, w_transform) + b_transform)
            x = carry * transform + (1.0 - carry) * x
        if projection is not None:
            x = numerics.einsum("nk,kd->nd", x, projection[0]) + projection[1]
        return x.reshape(batch_shape + (x.shape[-1],))


def lookup_tokens(table: Array, token_ids: Array) -> Array:
    """The table's rows for ids + 1; id 0 (padding) gives a zero vector."""
    return jnp.take(_with_padding_row(table), token_ids, axis=0)


class TokenEmbedder(nn.Module):
    """Token embeddings looked up in a table (a dumped token-embedding file, or word-input training)."""

    n_tokens: int
    dim: int

    @nn.compact
    def __call__(self, token_ids: Array) -> Array:
        return lookup_tokens(self.param("embedding", nn.initializers.glorot_uniform(), (self.n_tokens, self.dim)),
                             token_ids)


def reverse_sequence(x: Array, lengths: Array) -> Array:
    """Reverses the first lengths[b] steps of each row b of x (batch, time, ...); the rest stay."""
    t = jnp.arange(x.shape[1])[None, :]
    index = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def sequence_lengths(ids: Array, use_character_inputs: bool) -> Array:
    """Real tokens per row: a token is real when any of its ids is nonzero."""
    real = jnp.any(ids > 0, axis=-1) if use_character_inputs else ids > 0
    return jnp.sum(real, axis=1, dtype=jnp.int32)


class BiLMOutput(NamedTuple):
    embedding: Array          # (batch, time, projection_dim), zero past each row's length
    mask: Array               # (batch, time) bool
    lengths: Array            # (batch,) int32
    forward: list[Array]      # per layer (batch, time, output_dim)
    backward: list[Array]     # per layer, realigned to forward time order; [] if unidirectional


def directions(options: BiLMOptions) -> tuple[str, ...]:
    """The LM directions of the model, in the order of the params' direction axis."""
    return directions_lib.directions(options.bidirectional)


def zero_state(options: BiLMOptions, batch_size: int, dtype=jnp.float32) -> dict:
    """The initial LSTM state: zeros for every direction and layer."""
    lstm = options.lstm

    def direction():  # fresh arrays for each: donated buffers must not be shared
        return tuple((jnp.zeros((batch_size, lstm.dim), dtype), jnp.zeros((batch_size, lstm.output_dim), dtype))
                     for _ in range(lstm.n_layers))

    return {name: direction() for name in directions(options)}


class BiLM(nn.Module):
    """The bidirectional language model: token embedder and forward / backward LSTM stacks.

    The backward LM reads each row's real tokens reversed; its outputs are returned realigned
    to forward order. Training calls the same parts, `embed` and `contextualize`, on its own
    streams (the backward LM's read reversed from the data).
    """

    options: BiLMOptions
    use_character_inputs: bool = True
    dropout_rate: float = 0.0
    numerics: Numerics = PARITY  # every product's precision and operand dtype (elmojax.model.numerics)
    cnn_chunk_size: Optional[int] = None
    scan_unroll: int = 1
    lstm_input_chunk_bytes: Optional[int] = None  # inference: see elmojax.model.lstm.chunked_recurrence

    def setup(self):
        o = self.options
        if self.use_character_inputs:
            if o.char_cnn is None:
                raise ValueError("character inputs need the char_cnn section of the options")
            self.embedder = CharCNNEmbedder(o.char_cnn, o.projection_dim, numerics=self.numerics,
                                            chunk_size=self.cnn_chunk_size)
        else:
            if o.n_tokens_vocab is None:
                raise ValueError("token inputs need n_tokens_vocab (the token embedding table's rows)")
            self.embedder = TokenEmbedder(o.n_tokens_vocab, o.projection_dim)
        self.lstm = LSTMStack(o.lstm, self.dropout_rate, numerics=self.numerics, unroll=self.scan_unroll,
                              input_chunk_bytes=self.lstm_input_chunk_bytes)

    def embed(self, ids: Array, tail_ids: Optional[Array] = None) -> Array:
        """Token embeddings; `tail_ids` for char ids cut short (see CharCNNEmbedder)."""
        if tail_ids is not None:
            return self.embedder(ids, tail_ids)
        return self.embedder(ids)

    def contextualize(self, inputs: dict, masks: dict, state: dict, deterministic: bool = True,
                      drop_output: bool = False) -> tuple[dict, dict]:
        """Each direction's LSTM stack over its own inputs, in its own reading order (the
        backward LM's: each row's tokens reversed): per direction, the layers' outputs and the
        new carry. Training, whose backward stream comes reversed from the data, and `__call__`,
        which reverses the embedding, both run the LSTMs here. `drop_output` applies dropout to
        the top layer too (training, before the softmax).

        The directions run in one recurrence, stacked on a leading axis (elmojax.model.lstm); inputs,
        state and outputs are stacked and split here, so callers see one entry per direction.
        """
        names = directions(self.options)
        stack = lambda tree: jax.tree.map(lambda *xs: jnp.stack(xs), *tree)  # noqa: E731
        layers, stacked_state = self.lstm(stack([inputs[d] for d in names]), stack([masks[d] for d in names]),
                                          stack([state[d] for d in names]), deterministic, drop_output)
        outputs = {d: [x[k] for x in layers] for k, d in enumerate(names)}
        new_state = {d: jax.tree.map(lambda x: x[k], stacked_state) for k, d in enumerate(names)}
        return outputs, new_state

    def __call__(self, ids: Array, state: dict, deterministic: bool = True,
                 embedding: Optional[Array] = None) -> tuple[BiLMOutput, dict]:
        """`embedding`, when given, stands for self.embed(ids) (computed elsewhere, e.g. once per
        distinct token)."""
        lengths = sequence_lengths(ids, self.use_character_inputs)
        mask = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
        embedding = self.embed(ids) if embedding is None else embedding
        embedding = jnp.where(mask[..., None], embedding, 0.0)
        inputs, masks = {FORWARD: embedding}, {FORWARD: mask}
        if self.options.bidirectional:
            inputs[BACKWARD], masks[BACKWARD] = reverse_sequence(embedding, lengths), mask
        outputs, new_state = self.contextualize(inputs, masks, state, deterministic)
        backward = [reverse_sequence(x, lengths) for x in outputs.get(BACKWARD, [])]
        return BiLMOutput(embedding, mask, lengths, outputs[FORWARD], backward), new_state
