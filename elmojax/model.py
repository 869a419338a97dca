"""The biLM as Flax linen modules: pure functions of (params, inputs, state).

The same modules serve inference (`elmojax.embed`) and training. Parameter shapes are those
of bilm-tf's hdf5 weight file, and names follow it (see `elmojax.hdf5` for the mapping):

  embedder/      char_embed (261, d), W_cnn_i (1, width, d, n), b_cnn_i, W_carry_i, b_carry_i,
                 W_transform_i, b_transform_i, W_proj, b_proj   (character inputs)
                 embedding (vocab, projection_dim)              (token inputs)
  forward_lstm/layer_i/   W_0 (in + out, 4 * dim), B (4 * dim,), W_P_0 (dim, projection_dim)
  backward_lstm/layer_i/  the same

Input ids use the prediction layout of bilm-tf's Batcher / TokenBatcher: ids + 1, with 0 for
padding, which embeds to a zero vector (a zero row in front of the trained table).

LSTM state is a pytree {'forward': ((c, h), ...), 'backward': ((c, h), ...)}, one (c, h) pair
per layer, each of shape (batch, dim) and (batch, output_dim).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from elmojax.options import N_CHARACTERS_TRAIN, BiLMOptions, CharCNNOptions, LSTMOptions

Array = jax.Array
# Inference defaults to full float32 matmuls (TF32 on GPUs would break parity with bilm-tf).
DEFAULT_PRECISION = "highest"

# TensorFlow's LSTMCell adds this to the forget gate's pre-activation.
FORGET_BIAS = 1.0


def _uniform(low: float, high: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, low, high)
    return init


def _normal(stddev: float):
    return nn.initializers.normal(stddev)


def _with_padding_row(table: Array) -> Array:
    """id 0 is padding: prepend a zero row so that ids + 1 index the trained table."""
    return jnp.concatenate([jnp.zeros((1, table.shape[1]), table.dtype), table], axis=0)


class CharCNNEmbedder(nn.Module):
    """Token embeddings from characters: char embedding, CNN + max-pool, highway, projection."""

    options: CharCNNOptions
    projection_dim: int
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, char_ids: Array) -> Array:
        o = self.options
        dim = o.embedding_dim
        table = self.param("char_embed", _uniform(-1.0, 1.0), (N_CHARACTERS_TRAIN, dim))
        batch_shape, n_chars = char_ids.shape[:-1], char_ids.shape[-1]
        chars = jnp.take(_with_padding_row(table), char_ids.reshape(-1, n_chars), axis=0)

        activation = jax.nn.relu if o.activation == "relu" else jnp.tanh
        pooled = []
        for i, (width, num) in enumerate(o.filters):
            # bilm-tf: uniform +-0.05 for relu (Kim et al.), Glorot-like normal for tanh.
            w_init = _uniform(-0.05, 0.05) if o.activation == "relu" else _normal(np.sqrt(1.0 / (width * dim)))
            kernel = self.param(f"W_cnn_{i}", w_init, (1, width, dim, num))
            bias = self.param(f"b_cnn_{i}", nn.initializers.zeros, (num,))
            conv = lax.conv_general_dilated(chars, kernel[0], window_strides=(1,), padding="VALID",
                                            dimension_numbers=("NWC", "WIO", "NWC"), precision=self.precision)
            # max(conv + b) == max(conv) + b exactly, so the bias is added after pooling.
            pooled.append(activation(jnp.max(conv, axis=1) + bias))
        x = jnp.concatenate(pooled, axis=-1)

        n_filters = o.n_filters
        for i in range(o.n_highway):
            w_carry = self.param(f"W_carry_{i}", _normal(np.sqrt(1.0 / n_filters)), (n_filters, n_filters))
            b_carry = self.param(f"b_carry_{i}", nn.initializers.constant(-2.0), (n_filters,))
            w_transform = self.param(f"W_transform_{i}", _normal(np.sqrt(1.0 / n_filters)), (n_filters, n_filters))
            b_transform = self.param(f"b_transform_{i}", nn.initializers.zeros, (n_filters,))
            carry = jax.nn.sigmoid(jnp.dot(x, w_carry, precision=self.precision) + b_carry)
            transform = jax.nn.relu(jnp.dot(x, w_transform, precision=self.precision) + b_transform)
            x = carry * transform + (1.0 - carry) * x

        if n_filters != self.projection_dim:
            w_proj = self.param("W_proj", _normal(np.sqrt(1.0 / n_filters)), (n_filters, self.projection_dim))
            b_proj = self.param("b_proj", nn.initializers.zeros, (self.projection_dim,))
            x = jnp.dot(x, w_proj, precision=self.precision) + b_proj
        return x.reshape(batch_shape + (x.shape[-1],))


class TokenEmbedder(nn.Module):
    """Token embeddings looked up in a table (a dumped token-embedding file, or word-input training)."""

    n_tokens: int
    dim: int

    @nn.compact
    def __call__(self, token_ids: Array) -> Array:
        table = self.param("embedding", nn.initializers.glorot_uniform(), (self.n_tokens, self.dim))
        return jnp.take(_with_padding_row(table), token_ids, axis=0)


class LSTMLayer(nn.Module):
    """One LSTM layer with TensorFlow LSTMCell semantics, run over time by `lax.scan`.

    Gates are ordered i, j, f, o; forget bias 1.0; the cell is clipped to +-cell_clip, the
    output projected by W_P_0 (when projecting) and clipped to +-proj_clip. Steps where `mask`
    is False neither change the state nor emit output (dynamic_rnn with sequence_length).
    `residual` adds the layer input to its output (ResidualWrapper). Dropout, when training,
    drops the layer input (DropoutWrapper's input_keep_prob).
    """

    dim: int
    projection_dim: Optional[int] = None
    cell_clip: Optional[float] = None
    proj_clip: Optional[float] = None
    residual: bool = False
    dropout_rate: float = 0.0
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, inputs: Array, mask: Array, state: tuple[Array, Array],
                 deterministic: bool = True) -> tuple[Array, tuple[Array, Array]]:
        in_dim = inputs.shape[-1]
        out_dim = self.projection_dim or self.dim
        kernel = self.param("W_0", nn.initializers.glorot_uniform(), (in_dim + out_dim, 4 * self.dim))
        bias = self.param("B", nn.initializers.zeros, (4 * self.dim,))
        w_proj = None
        if self.projection_dim is not None:
            w_proj = self.param("W_P_0", nn.initializers.glorot_uniform(), (self.dim, self.projection_dim))

        if self.dropout_rate > 0.0:
            inputs = nn.Dropout(self.dropout_rate)(inputs, deterministic=deterministic)

        # The input-to-hidden products of all steps in one matrix product, before the scan.
        input_gates = jnp.einsum("btd,dg->btg", inputs, kernel[:in_dim], precision=self.precision) + bias
        w_hidden = kernel[in_dim:]

        def step(carry, xs):
            c_prev, h_prev = carry
            x_gates, m = xs
            gates = x_gates + jnp.dot(h_prev, w_hidden, precision=self.precision)
            i, j, f, o = jnp.split(gates, 4, axis=-1)
            c = jax.nn.sigmoid(f + FORGET_BIAS) * c_prev + jax.nn.sigmoid(i) * jnp.tanh(j)
            if self.cell_clip is not None:
                c = jnp.clip(c, -self.cell_clip, self.cell_clip)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            if w_proj is not None:
                h = jnp.dot(h, w_proj, precision=self.precision)
                if self.proj_clip is not None:
                    h = jnp.clip(h, -self.proj_clip, self.proj_clip)
            m = m[:, None]
            return (jnp.where(m, c, c_prev), jnp.where(m, h, h_prev)), jnp.where(m, h, 0.0)

        time_major = (jnp.swapaxes(input_gates, 0, 1), jnp.swapaxes(mask, 0, 1))
        new_state, outputs = lax.scan(step, state, time_major)
        outputs = jnp.swapaxes(outputs, 0, 1)
        if self.residual:
            outputs = jnp.where(mask[..., None], outputs + inputs, 0.0)
        return outputs, new_state


class LSTMStack(nn.Module):
    """Stacked LSTM layers (one direction); skip connections from the second layer on."""

    options: LSTMOptions
    dropout_rate: float = 0.0
    precision: Any = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, inputs: Array, mask: Array, state: Sequence[tuple[Array, Array]],
                 deterministic: bool = True) -> tuple[list[Array], tuple]:
        o = self.options
        outputs, new_state = [], []
        x = inputs
        for i in range(o.n_layers):
            x, layer_state = LSTMLayer(
                dim=o.dim,
                projection_dim=o.projection_dim if o.use_projection else None,
                cell_clip=o.cell_clip,
                # TensorFlow's LSTMCell only clips a projected output.
                proj_clip=o.proj_clip if o.use_projection else None,
                residual=o.use_skip_connections and i > 0,
                dropout_rate=self.dropout_rate,
                precision=self.precision,
                name=f"layer_{i}",
            )(x, mask, state[i], deterministic)
            outputs.append(x)
            new_state.append(layer_state)
        return outputs, tuple(new_state)


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


def zero_state(options: BiLMOptions, batch_size: int, dtype=jnp.float32) -> dict:
    """The initial LSTM state: zeros for every direction and layer."""
    lstm = options.lstm

    def direction():  # fresh arrays for each: donated buffers must not be shared
        return tuple((jnp.zeros((batch_size, lstm.dim), dtype), jnp.zeros((batch_size, lstm.output_dim), dtype))
                     for _ in range(lstm.n_layers))

    return {"forward": direction(), "backward": direction()} if options.bidirectional else {"forward": direction()}


class BiLM(nn.Module):
    """The bidirectional language model: token embedder and forward / backward LSTM stacks.

    The backward LM reads each row's real tokens reversed; its outputs are returned realigned
    to forward order. Besides `__call__`, `embed` and `run_lstm` expose the parts for training,
    where the backward LM reads its own stream.
    """

    options: BiLMOptions
    use_character_inputs: bool = True
    dropout_rate: float = 0.0
    precision: Any = DEFAULT_PRECISION

    def setup(self):
        o = self.options
        if self.use_character_inputs:
            if o.char_cnn is None:
                raise ValueError("character inputs need the char_cnn section of the options")
            self.embedder = CharCNNEmbedder(o.char_cnn, o.projection_dim, precision=self.precision)
        else:
            if o.n_tokens_vocab is None:
                raise ValueError("token inputs need n_tokens_vocab (the token embedding table's rows)")
            self.embedder = TokenEmbedder(o.n_tokens_vocab, o.projection_dim)
        self.forward_lstm = LSTMStack(o.lstm, self.dropout_rate, self.precision)
        if o.bidirectional:
            self.backward_lstm = LSTMStack(o.lstm, self.dropout_rate, self.precision)

    def embed(self, ids: Array) -> Array:
        return self.embedder(ids)

    def run_lstm(self, direction: str, inputs: Array, mask: Array, state, deterministic: bool = True):
        stack = self.forward_lstm if direction == "forward" else self.backward_lstm
        return stack(inputs, mask, state, deterministic)

    def __call__(self, ids: Array, state: dict, deterministic: bool = True) -> tuple[BiLMOutput, dict]:
        lengths = sequence_lengths(ids, self.use_character_inputs)
        mask = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
        embedding = jnp.where(mask[..., None], self.embed(ids), 0.0)
        forward, forward_state = self.run_lstm("forward", embedding, mask, state["forward"], deterministic)
        new_state = {"forward": forward_state}
        backward = []
        if self.options.bidirectional:
            reversed_outputs, new_state["backward"] = self.run_lstm(
                "backward", reverse_sequence(embedding, lengths), mask, state["backward"], deterministic)
            backward = [reverse_sequence(x, lengths) for x in reversed_outputs]
        return BiLMOutput(embedding, mask, lengths, forward, backward), new_state
