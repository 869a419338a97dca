"""The LSTM with projection and clipping, bilm-tf's LSTMCell(num_proj, cell_clip, proj_clip),
run over time by `lax.scan` with a hand-written backward pass (`lstm_recurrence`), one layer
(`LSTMLayer`) or a stack with skip connections and dropout (`LSTMStack`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from elmojax.dropout import Dropout
from elmojax.numerics import einsum
from elmojax.options import LSTMOptions

Array = jax.Array
# Inference defaults to full float32 matmuls (TF32 on GPUs would break parity with bilm-tf).
DEFAULT_PRECISION = "highest"
# TensorFlow's LSTMCell adds this to the forget gate's pre-activation.
FORGET_BIAS = 1.0


def uniform(low: float, high: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, low, high)
    return init


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
        w_input = self.param("W_x", uniform(-limit, limit), (in_dim, 4 * self.dim))
        w_hidden = self.param("W_h", uniform(-limit, limit), (out_dim, 4 * self.dim))
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
