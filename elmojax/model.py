"""The biLM as Flax linen modules: pure functions of (params, inputs, state).

The same modules serve inference (`elmojax.embed`) and training. Parameter shapes are those
of bilm-tf's hdf5 weight file, but for W_0, and names follow it (see `elmojax.hdf5` for the
mapping):

  embedder/      char_embed (261, d), W_cnn_i (1, width, d, n), b_cnn_i, W_carry_i, b_carry_i,
                 W_transform_i, b_transform_i, W_proj, b_proj   (character inputs)
                 embedding (vocab, projection_dim)              (token inputs)
  forward_lstm/layer_i/   W_x (in, 4 * dim) and W_h (out, 4 * dim), the two row blocks of the
                          file's W_0 (in + out, 4 * dim); B (4 * dim,), W_P_0 (dim, projection_dim)
  backward_lstm/layer_i/  the same

Input ids use the prediction layout of bilm-tf's Batcher / TokenBatcher: ids + 1, with 0 for
padding, which embeds to a zero vector (a zero row in front of the trained table).

LSTM state is a pytree {'forward': ((c, h), ...), 'backward': ((c, h), ...)}, one (c, h) pair
per layer, each of shape (batch, dim) and (batch, output_dim).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from elmojax.dropout import Dropout
from elmojax.numerics import conv1d, einsum
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

    `tail_ids`, when given, says that the char ids were cut short (elmojax.embed.trim_char_ids):
    row r stood for its ids followed by tail_ids[r] up to max_characters_per_token, and every
    window left out lay wholly in that tail. Those windows all have the value of one window of
    the tail character, which takes the place of all of them in the max-pooling: the same result
    without convolving the padding after each word.
    """

    options: CharCNNOptions
    projection_dim: int
    precision: Any = DEFAULT_PRECISION
    chunk_size: Optional[int] = None
    compute_dtype: Any = None  # see elmojax.numerics

    @nn.compact
    def __call__(self, char_ids: Array, tail_ids: Optional[Array] = None) -> Array:
        o = self.options
        dim, n_filters = o.embedding_dim, o.n_filters
        table = self.param("char_embed", _uniform(-1.0, 1.0), (N_CHARACTERS_TRAIN, dim))
        convolutions = []
        for i, (width, num) in enumerate(o.filters):
            # bilm-tf: uniform +-0.05 for relu (Kim et al.), Glorot-like normal for tanh.
            w_init = _uniform(-0.05, 0.05) if o.activation == "relu" else _normal(np.sqrt(1.0 / (width * dim)))
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
        numerics = dict(precision=self.precision, compute_dtype=self.compute_dtype)

        def pool(ids: Array, tails: Optional[Array]) -> Array:  # (tokens, chars) -> (tokens, n_filters)
            chars = jnp.take(padded_table, ids, axis=0)
            tail_chars = None if tails is None else jnp.take(padded_table, tails, axis=0)
            pooled = []
            for kernel, bias in convolutions:
                pooled_conv = max_over_positions(conv1d(chars, kernel[0], **numerics))
                if tail_chars is not None:  # one window of the tail character, for all those left out
                    tail_window = einsum("nd,dk->nk", tail_chars, jnp.sum(kernel[0], axis=0), **numerics)
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
            carry = jax.nn.sigmoid(einsum("nk,kd->nd", x, w_carry, **numerics) + b_carry)
            transform = jax.nn.relu(einsum("nk,kd->nd", x, w_transform, **numerics) + b_transform)
            x = carry * transform + (1.0 - carry) * x
        if projection is not None:
            x = einsum("nk,kd->nd", x, projection[0], **numerics) + projection[1]
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


@dataclasses.dataclass(frozen=True)
class RecurrenceSettings:
    """The static settings of `lstm_recurrence`."""
    cell_clip: Optional[float] = None
    proj_clip: Optional[float] = None
    precision: Any = DEFAULT_PRECISION
    unroll: int = 1  # time steps per iteration of the scan's loop
    compute_dtype: Any = None  # see elmojax.numerics

    def einsum(self, subscripts: str, x: Array, y: Array) -> Array:
        return einsum(subscripts, x, y, precision=self.precision, compute_dtype=self.compute_dtype)


def _lstm_step(weights, settings: RecurrenceSettings, c_prev, h_prev, x_gates, m):
    """One LSTMCell step: (c, h, gate activations); rows where m is False keep (c, h)."""
    w_hidden, bias, w_proj = weights
    # the bias is added here, fused with the step, not to the whole input product in memory
    gates = x_gates + settings.einsum("bk,kn->bn", h_prev, w_hidden) + bias
    i, j, f, o = jnp.split(gates, 4, axis=-1)
    i, j, f, o = jax.nn.sigmoid(i), jnp.tanh(j), jax.nn.sigmoid(f + FORGET_BIAS), jax.nn.sigmoid(o)
    c = f * c_prev + i * j
    if settings.cell_clip is not None:
        c = jnp.clip(c, -settings.cell_clip, settings.cell_clip)
    h = o * jnp.tanh(c)
    if w_proj is not None:
        h = settings.einsum("bk,kn->bn", h, w_proj)
        if settings.proj_clip is not None:
            h = jnp.clip(h, -settings.proj_clip, settings.proj_clip)
    m = m[:, None]
    return jnp.where(m, c, c_prev), jnp.where(m, h, h_prev), (i, j, f, o)


def _scan_steps(input_gates, mask, state, weights, settings: RecurrenceSettings, save_residuals: bool):
    """The steps over time (a lax.scan). With save_residuals, it returns what the backward pass
    needs instead of the outputs: every step's gate activations and carry (c, h) (the outputs
    are the carry's h where the mask is set)."""

    if not save_residuals:
        def step(carry, xs):
            x_gates, m = xs
            c, h, _ = _lstm_step(weights, settings, *carry, x_gates, m)
            return (c, h), jnp.where(m[:, None], h, 0.0)  # no output where the mask is not set

        return lax.scan(step, state, (input_gates, mask), unroll=settings.unroll)

    # The activations overwrite the input products step by step, in their buffer (a scan output
    # would be a new buffer, zero-filled first, at every call).
    def residual_step(carry, xs):
        c_prev, h_prev, buffer = carry
        t, m = xs
        c, h, gates = _lstm_step(weights, settings, c_prev, h_prev,
                                 lax.dynamic_index_in_dim(buffer, t, keepdims=False), m)
        buffer = lax.dynamic_update_index_in_dim(buffer, jnp.concatenate(gates, axis=-1), t, 0)
        return (c, h, buffer), (c, h)

    steps = jnp.arange(input_gates.shape[0])
    (c, h, activations), (c_seq, h_seq) = lax.scan(
        residual_step, (*state, input_gates), (steps, mask), unroll=settings.unroll)
    return (c, h), (activations, c_seq, h_seq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lstm_recurrence(input_gates: Array, mask: Array, state: tuple[Array, Array], weights: tuple,
                    settings: RecurrenceSettings) -> tuple[Array, tuple[Array, Array]]:
    """TensorFlow LSTMCell steps over time-major `input_gates` (time, batch, 4 * dim), the input
    products x_t @ W_x; weights = (W_h, B, W_P_0 or None). Returns the outputs (time, batch,
    out), zero where `mask` (time, batch) is False, and the final (c, h).

    Its gradient is written by hand (backpropagation through time): reverse-mode autodiff of the
    scan would accumulate the weight gradients step by step in small (batch-row) products and
    keep every intermediate of the step; here the backward scan runs only the (dc, dh)
    recurrence and writes the gates' gradients, and the weight gradients are each one large
    product after it.
    """
    final, outputs = _scan_steps(input_gates, mask, state, weights, settings, save_residuals=False)
    return outputs, final


def _recurrence_fwd(input_gates, mask, state, weights, settings):
    final, (activations, c_seq, h_seq) = _scan_steps(input_gates, mask, state, weights, settings,
                                                     save_residuals=True)
    outputs = jnp.where(mask[..., None], h_seq, 0.0)
    return (outputs, final), (mask, state, weights, activations, c_seq, h_seq)


def _recurrence_bwd(settings: RecurrenceSettings, residuals, cotangents):
    mask, (c0, h0), (w_hidden, _, w_proj), activations, c_seq, h_seq = residuals
    d_outputs, (dc_final, dh_final) = cotangents
    c_prev_seq = jnp.concatenate([c0[None], c_seq[:-1]], axis=0)
    h_prev_seq = jnp.concatenate([h0[None], h_seq[:-1]], axis=0)
    m = mask[..., None]
    # All that does not depend on the carried gradients is computed for all steps at once, which
    # leaves the loop few and small operations per step; its products take the weights transposed
    # once here (a transposed operand in the loop would be slower at every step).
    i, j, f, o = jnp.split(activations, 4, axis=-1)
    tanh_c = jnp.tanh(c_seq)
    per_step = dict(
        t=jnp.arange(mask.shape[0]), d_out=d_outputs, m=m, f=f,
        dc_dh=o * (1.0 - tanh_c * tanh_c),  # d c / d (unprojected output), through o * tanh(c)
        # where the clips pass gradient (None: everywhere)
        keep_c=None if settings.cell_clip is None else jnp.abs(c_seq) < settings.cell_clip,
        keep_h=None if w_proj is None else (
            m if settings.proj_clip is None else m & (jnp.abs(h_seq) < settings.proj_clip)))
    # d (gate pre-activations) / d (c, c, c, unprojected output), zero on masked steps; the
    # loop overwrites each step's factors with its gate gradients (no new zero-filled buffer)
    # (one elementwise pass over (time, batch, gate, dim): the activations' derivatives, sigmoid's
    # a (1 - a) and tanh's (j) 1 - a^2, times what each gate multiplies: j, i, c_prev, tanh(c))
    gates = activations.reshape(activations.shape[:2] + (4, -1))
    derivatives = jnp.where(jnp.arange(4)[:, None] == 1, 1.0 - gates * gates, gates * (1.0 - gates))
    multipliers = jnp.stack([j, i, c_prev_seq, tanh_c], axis=2)
    gate_factors = jnp.where(m[..., None], derivatives * multipliers, 0.0).reshape(activations.shape)
    w_hidden_t = w_hidden.T
    w_proj_t = None if w_proj is None else w_proj.T

    def step(carry, xs):
        dc, dh, buffer = carry  # gradients of the carry leaving this step; factors / d_gates
        dh_out = dh + xs["d_out"]
        d_projected = None
        if w_proj is not None:
            d_projected = jnp.where(xs["keep_h"], dh_out, 0.0)
            dh_out = settings.einsum("bp,pk->bk", d_projected, w_proj_t)
        dc_cell = dc + dh_out * xs["dc_dh"]
        if xs["keep_c"] is not None:
            dc_cell = jnp.where(xs["keep_c"], dc_cell, 0.0)
        factors = lax.dynamic_index_in_dim(buffer, xs["t"], keepdims=False)
        d_gates = jnp.concatenate([dc_cell, dc_cell, dc_cell, dh_out], axis=-1) * factors
        # masked rows pass the carry's gradient through unchanged
        dh_prev = jnp.where(xs["m"], settings.einsum("bn,nk->bk", d_gates, w_hidden_t), dh)
        dc_prev = jnp.where(xs["m"], dc_cell * xs["f"], dc)
        return (dc_prev, dh_prev, lax.dynamic_update_index_in_dim(buffer, d_gates, xs["t"], 0)), d_projected

    (dc0, dh0, d_gates), d_projected = lax.scan(step, (dc_final, dh_final, gate_factors), per_step, reverse=True,
                                                unroll=settings.unroll)
    d_w_hidden = settings.einsum("tbk,tbn->kn", h_prev_seq, d_gates)
    d_bias = jnp.sum(d_gates, axis=(0, 1))
    d_w_proj = None
    if w_proj is not None:
        # the outputs before the projection, o * tanh(c), recomputed rather than saved by the
        # forward scan (a saved sequence costs a zero-filled buffer and a write per step); on
        # masked steps c_seq holds the carried c, but d_projected is zero there
        # (the small d_projected is the operand transposed for the product, not this one; as 2-D
        # operands, which XLA:CPU also multiplies in bfloat16)
        d_w_proj = settings.einsum("np,nk->pk", d_projected.reshape(-1, w_proj.shape[1]),
                                   (o * tanh_c).reshape(-1, w_proj.shape[0])).T
    return d_gates, None, (dc0, dh0), (d_w_hidden, d_bias, d_w_proj)


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


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
    unroll: int = 1  # time steps per iteration of the scan's loop
    compute_dtype: Any = None  # see elmojax.numerics

    @nn.compact
    def __call__(self, inputs: Array, mask: Array, state: tuple[Array, Array],
                 deterministic: bool = True) -> tuple[Array, tuple[Array, Array]]:
        in_dim = inputs.shape[-1]
        out_dim = self.projection_dim or self.dim
        # W_0 = [W_x; W_h], kept as two params so that neither is ever sliced (copied) out of it;
        # both initialized as the rows of one Glorot-uniform W_0, as TensorFlow does.
        limit = np.sqrt(6.0 / (in_dim + out_dim + 4 * self.dim))
        w_input = self.param("W_x", _uniform(-limit, limit), (in_dim, 4 * self.dim))
        w_hidden = self.param("W_h", _uniform(-limit, limit), (out_dim, 4 * self.dim))
        bias = self.param("B", nn.initializers.zeros, (4 * self.dim,))
        w_proj = None
        if self.projection_dim is not None:
            w_proj = self.param("W_P_0", nn.initializers.glorot_uniform(), (self.dim, self.projection_dim))

        if self.dropout_rate > 0.0:
            inputs = Dropout(self.dropout_rate)(inputs, deterministic=deterministic)

        # The input-to-hidden products of all steps in one matrix product, before the scan, laid
        # out time-major for it: a plain 2-D product, transposing the small input rather than the
        # 4 * dim wide result.
        batch, time = inputs.shape[:2]
        time_major = jnp.swapaxes(inputs, 0, 1).reshape(time * batch, in_dim)
        settings = RecurrenceSettings(self.cell_clip, self.proj_clip if w_proj is not None else None,
                                      self.precision, self.unroll, self.compute_dtype)
        input_gates = settings.einsum("nk,kd->nd", time_major, w_input).reshape(time, batch, 4 * self.dim)
        outputs, new_state = lstm_recurrence(input_gates, jnp.swapaxes(mask, 0, 1), tuple(state),
                                             (w_hidden, bias, w_proj), settings)
        outputs = jnp.swapaxes(outputs, 0, 1)
        if self.residual:
            outputs = jnp.where(mask[..., None], outputs + inputs, 0.0)
        return outputs, new_state


class LSTMStack(nn.Module):
    """Stacked LSTM layers (one direction); skip connections from the second layer on.

    `drop_output` (training) also drops the top layer's output, which bilm-tf's training graph
    does before its softmax."""

    options: LSTMOptions
    dropout_rate: float = 0.0
    precision: Any = DEFAULT_PRECISION
    unroll: int = 1
    compute_dtype: Any = None

    @nn.compact
    def __call__(self, inputs: Array, mask: Array, state: Sequence[tuple[Array, Array]],
                 deterministic: bool = True, drop_output: bool = False) -> tuple[list[Array], tuple]:
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
                unroll=self.unroll,
                compute_dtype=self.compute_dtype,
                name=f"layer_{i}",
            )(x, mask, state[i], deterministic)
            outputs.append(x)
            new_state.append(layer_state)
        if drop_output and self.dropout_rate > 0.0:
            outputs[-1] = Dropout(self.dropout_rate, name="output_dropout")(outputs[-1], deterministic)
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
    cnn_chunk_size: Optional[int] = None
    scan_unroll: int = 1
    compute_dtype: Any = None  # None: float32; jnp.bfloat16 for GPUs (see elmojax.numerics)

    def setup(self):
        o = self.options
        if self.use_character_inputs:
            if o.char_cnn is None:
                raise ValueError("character inputs need the char_cnn section of the options")
            self.embedder = CharCNNEmbedder(o.char_cnn, o.projection_dim, precision=self.precision,
                                            chunk_size=self.cnn_chunk_size, compute_dtype=self.compute_dtype)
        else:
            if o.n_tokens_vocab is None:
                raise ValueError("token inputs need n_tokens_vocab (the token embedding table's rows)")
            self.embedder = TokenEmbedder(o.n_tokens_vocab, o.projection_dim)
        self.forward_lstm = LSTMStack(o.lstm, self.dropout_rate, self.precision, self.scan_unroll, self.compute_dtype)
        if o.bidirectional:
            self.backward_lstm = LSTMStack(o.lstm, self.dropout_rate, self.precision, self.scan_unroll, self.compute_dtype)

    def embed(self, ids: Array, tail_ids: Optional[Array] = None) -> Array:
        """Token embeddings; `tail_ids` for char ids cut short (see CharCNNEmbedder)."""
        if tail_ids is not None:
            return self.embedder(ids, tail_ids)
        return self.embedder(ids)

    def run_lstm(self, direction: str, inputs: Array, mask: Array, state, deterministic: bool = True,
                 drop_output: bool = False):
        stack = self.forward_lstm if direction == "forward" else self.backward_lstm
        return stack(inputs, mask, state, deterministic, drop_output)

    def __call__(self, ids: Array, state: dict, deterministic: bool = True,
                 embedding: Optional[Array] = None) -> tuple[BiLMOutput, dict]:
        """`embedding`, when given, stands for self.embed(ids) (computed elsewhere, e.g. once per
        distinct token)."""
        lengths = sequence_lengths(ids, self.use_character_inputs)
        mask = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
        embedding = self.embed(ids) if embedding is None else embedding
        embedding = jnp.where(mask[..., None], embedding, 0.0)
        forward, forward_state = self.run_lstm("forward", embedding, mask, state["forward"], deterministic)
        new_state = {"forward": forward_state}
        backward = []
        if self.options.bidirectional:
            # Adding an exact zero computed from the forward LM's output makes the backward LM
            # wait for it, so XLA cannot hold both directions' (time, batch, 4 * dim) input
            # products in memory at once.
            after_forward = 0.0 * forward[-1][:1, :1, :1]
            reversed_outputs, new_state["backward"] = self.run_lstm(
                "backward", reverse_sequence(embedding, lengths) + after_forward, mask, state["backward"],
                deterministic)
            backward = [reverse_sequence(x, lengths) for x in reversed_outputs]
        return BiLMOutput(embedding, mask, lengths, forward, backward), new_state
