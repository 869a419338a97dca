"""The LSTM with projection and clipping, bilm-tf's LSTMCell(num_proj, cell_clip, proj_clip),
run over time by `lax.scan` with a hand-written backward pass (`lstm_recurrence`), one layer
(`LSTMLayer`) or a stack with skip connections and dropout (`LSTMStack`). Each runs the biLM's
directions together: their weights, inputs and state are stacked on a leading direction axis,
and every step is one batched product for all of them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from elmojax.formats.options import LSTMOptions
from elmojax.model.dropout import Dropout
from elmojax.model.numerics import PARITY, Numerics

Array = jax.Array
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
    numerics: Numerics = PARITY
    unroll: int = 1  # time steps per iteration of the scan's loop

    def einsum(self, subscripts: str, x: Array, y: Array) -> Array:
        return self.numerics.einsum(subscripts, x, y)


def _at(x: Array, t) -> Array:
    """Step t of a direction-major sequence (directions, time, ...)."""
    return lax.dynamic_index_in_dim(x, t, axis=1, keepdims=False)


def gate_activations_plain(gates: Array) -> Array:
    """The gates' activations i, j, f, o (concatenated on the last axis, as the pre-activations
    `gates` are): sigmoid, tanh, sigmoid with the forget bias, sigmoid. `gate_activations`'s
    plain twin, which the tests compare it with."""
    i, j, f, o = jnp.split(gates, 4, axis=-1)
    return jnp.concatenate([jax.nn.sigmoid(i), jnp.tanh(j), jax.nn.sigmoid(f + FORGET_BIAS), jax.nn.sigmoid(o)],
                           axis=-1)


def gate_activations(gates: Array) -> Array:
    """`gate_activations_plain` as one elementwise pass with one tanh per element, through
    sigmoid(z) = (1 + tanh(z / 2)) / 2: XLA:CPU runs each sigmoid as a loop of its own
    (exp, divide) and then concatenates, which costs the recurrence about 8% (RESULTS.md)."""
    z = gates.reshape(gates.shape[:-1] + (4, -1))
    gate = jnp.arange(4)[:, None]
    t = jnp.tanh(jnp.where(gate == 1, z, 0.5 * (z + jnp.where(gate == 2, FORGET_BIAS, 0.0))))
    return jnp.where(gate == 1, t, 0.5 + 0.5 * t).reshape(gates.shape)


def _lstm_step(weights, settings: RecurrenceSettings, c_prev, h_prev, x_gates, m):
    """One LSTMCell step of every direction at once, each a batched product over the leading
    direction axis: (c, h, gate activations i, j, f, o concatenated); rows where m (directions,
    batch) is False keep (c, h)."""
    w_hidden, bias, w_proj = weights
    # the bias is added here, fused with the step, not to the whole input product in memory
    activations = gate_activations(x_gates + settings.einsum("dbk,dkn->dbn", h_prev, w_hidden) + bias[:, None, :])
    i, j, f, o = jnp.split(activations, 4, axis=-1)
    c = f * c_prev + i * j
    if settings.cell_clip is not None:
        c = jnp.clip(c, -settings.cell_clip, settings.cell_clip)
    h = o * jnp.tanh(c)
    if w_proj is not None:
        h = settings.einsum("dbk,dkn->dbn", h, w_proj)
        if settings.proj_clip is not None:
            h = jnp.clip(h, -settings.proj_clip, settings.proj_clip)
    m = m[..., None]
    return jnp.where(m, c, c_prev), jnp.where(m, h, h_prev), activations


def _scan_steps(input_gates, mask, state, weights, settings: RecurrenceSettings, save_residuals: bool):
    """The steps over time (a lax.scan over t, reading step t of the direction-major inputs).
    With save_residuals, it returns what the backward pass needs instead of the outputs: every
    step's gate activations and carry (c, h) (the outputs are the carry's h where the mask is
    set), direction-major."""
    steps = jnp.arange(input_gates.shape[1])
    mask_t = jnp.swapaxes(mask, 0, 1)  # (time, directions, batch), small

    if not save_residuals:
        def step(carry, xs):
            t, m = xs
            c, h, _ = _lstm_step(weights, settings, *carry, _at(input_gates, t), m)
            return (c, h), jnp.where(m[..., None], h, 0.0)  # no output where the mask is not set

        final, outputs = lax.scan(step, state, (steps, mask_t), unroll=settings.unroll)
        return final, jnp.swapaxes(outputs, 0, 1)

    # The activations overwrite the input products step by step, in their buffer (a scan output
    # would be a new buffer, zero-filled first, at every call).
    def residual_step(carry, xs):
        c_prev, h_prev, buffer = carry
        t, m = xs
        c, h, activations = _lstm_step(weights, settings, c_prev, h_prev, _at(buffer, t), m)
        buffer = lax.dynamic_update_index_in_dim(buffer, activations, t, 1)
        return (c, h, buffer), (c, h)

    (c, h, activations), (c_seq, h_seq) = lax.scan(
        residual_step, (*state, input_gates), (steps, mask_t), unroll=settings.unroll)
    return (c, h), (activations, jnp.swapaxes(c_seq, 0, 1), jnp.swapaxes(h_seq, 0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lstm_recurrence(input_gates: Array, mask: Array, state: tuple[Array, Array], weights: tuple,
                    settings: RecurrenceSettings) -> tuple[Array, tuple[Array, Array]]:
    """TensorFlow LSTMCell steps over time for several independent LSTMs at once (the biLM's
    two directions), each array direction-major: `input_gates` (directions, time, batch, 4 * dim),
    the input products x_t @ W_x; mask (directions, time, batch); state (c, h), each (directions,
    batch, .); weights = (W_h, B, W_P_0 or None), each with the leading direction axis. Returns
    the outputs (directions, time, batch, out), zero where `mask` is False, and the final (c, h).

    One loop steps all directions: each step's products are one batched product over the
    directions, so a step's fixed costs are paid once for all of them (XLA:CPU runs independent
    loops one after the other, not side by side).

    Its gradient is written by hand (backpropagation through time): reverse-mode autodiff of the
    scan would accumulate the weight gradients step by step in small (batch-row) products and
    keep every intermediate of the step; here the backward scan runs only the (dc, dh)
    recurrence and writes the gates' gradients, and the weight gradients are each one large
    product after it.
    """
    final, outputs = _scan_steps(input_gates, mask, state, weights, settings, save_residuals=False)
    return outputs, final


class _Residuals(NamedTuple):
    """What the forward scan keeps for the backward pass, direction-major."""
    mask: Array                       # (directions, time, batch)
    state: tuple[Array, Array]        # the initial (c, h)
    weights: tuple                    # (W_h, B, W_P_0 or None)
    activations: Array                # each step's gate activations i, j, f, o
    c_seq: Array                      # each step's carry c
    h_seq: Array                      # each step's carry h


def _recurrence_fwd(input_gates, mask, state, weights, settings):
    final, (activations, c_seq, h_seq) = _scan_steps(input_gates, mask, state, weights, settings,
                                                     save_residuals=True)
    outputs = jnp.where(mask[..., None], h_seq, 0.0)
    return (outputs, final), _Residuals(mask, state, weights, activations, c_seq, h_seq)


def _previous(initial: Array, sequence: Array) -> Array:
    """Each step's incoming carry: the initial one, then the sequence's up to its last step."""
    return jnp.concatenate([initial[:, None], sequence[:, :-1]], axis=1)


def _per_step_factors(settings: RecurrenceSettings, r: _Residuals, d_outputs: Array) -> tuple[dict, Array]:
    """All of the backward pass that does not depend on the carried gradients, for all steps at
    once (which leaves the loop few and small operations per step): per step, the values the
    loop reads, and d (gate pre-activations) / d (c, c, c, unprojected output), zero on masked
    steps (the buffer the loop overwrites with its gate gradients)."""
    w_proj = r.weights[2]
    m = r.mask[..., None]
    i, j, f, o = jnp.split(r.activations, 4, axis=-1)
    tanh_c = jnp.tanh(r.c_seq)
    per_step = dict(
        d_out=d_outputs, m=m, f=f,
        dc_dh=o * (1.0 - tanh_c * tanh_c),  # d c / d (unprojected output), through o * tanh(c)
        # where the clips pass gradient (None: everywhere)
        keep_c=None if settings.cell_clip is None else jnp.abs(r.c_seq) < settings.cell_clip,
        keep_h=None if w_proj is None else (
            m if settings.proj_clip is None else m & (jnp.abs(r.h_seq) < settings.proj_clip)))
    # one elementwise pass over (directions, time, batch, gate, dim): the activations'
    # derivatives, sigmoid's a (1 - a) and tanh's (j) 1 - a^2, times what each gate multiplies:
    # j, i, c_prev, tanh(c)
    gates = r.activations.reshape(r.activations.shape[:3] + (4, -1))
    derivatives = jnp.where(jnp.arange(4)[:, None] == 1, 1.0 - gates * gates, gates * (1.0 - gates))
    multipliers = jnp.stack([j, i, _previous(r.state[0], r.c_seq), tanh_c], axis=3)
    gate_factors = jnp.where(m[..., None], derivatives * multipliers, 0.0).reshape(r.activations.shape)
    return per_step, gate_factors


def _backward_scan(settings: RecurrenceSettings, r: _Residuals, per_step: dict, gate_factors: Array,
                   final_gradients: tuple[Array, Array]):
    """The (dc, dh) recurrence backward over time: the initial carry's gradients, every step's
    gate gradients (in gate_factors' buffer) and the gradients of the projection's outputs."""
    w_hidden, _, w_proj = r.weights
    # the weights transposed once here (a transposed operand in the loop is slower at every step)
    w_hidden_t = jnp.swapaxes(w_hidden, 1, 2)
    w_proj_t = None if w_proj is None else jnp.swapaxes(w_proj, 1, 2)

    def step(carry, t):
        dc, dh, buffer = carry  # gradients of the carry leaving this step; factors / d_gates
        xs = {k: None if v is None else _at(v, t) for k, v in per_step.items()}
        dh_out = dh + xs["d_out"]
        d_projected = None
        if w_proj is not None:
            d_projected = jnp.where(xs["keep_h"], dh_out, 0.0)
            dh_out = settings.einsum("dbp,dpk->dbk", d_projected, w_proj_t)
        dc_cell = dc + dh_out * xs["dc_dh"]
        if xs["keep_c"] is not None:
            dc_cell = jnp.where(xs["keep_c"], dc_cell, 0.0)
        factors = _at(buffer, t)
        d_gates = jnp.concatenate([dc_cell, dc_cell, dc_cell, dh_out], axis=-1) * factors
        # masked rows pass the carry's gradient through unchanged
        dh_prev = jnp.where(xs["m"], settings.einsum("dbn,dnk->dbk", d_gates, w_hidden_t), dh)
        dc_prev = jnp.where(xs["m"], dc_cell * xs["f"], dc)
        return (dc_prev, dh_prev, lax.dynamic_update_index_in_dim(buffer, d_gates, t, 1)), d_projected

    return lax.scan(step, (*final_gradients, gate_factors), jnp.arange(r.mask.shape[1]),
                    reverse=True, unroll=settings.unroll)


def _weight_gradients(settings: RecurrenceSettings, r: _Residuals, d_gates: Array, d_projected) -> tuple:
    """(dW_h, dB, dW_P_0 or None): each one large product over all steps."""
    w_hidden, _, w_proj = r.weights
    n_directions, dim = w_hidden.shape[0], w_hidden.shape[-1]
    h_prev_seq = _previous(r.state[1], r.h_seq)
    d_w_hidden = settings.einsum("dmk,dmn->dkn", h_prev_seq.reshape(n_directions, -1, h_prev_seq.shape[-1]),
                                 d_gates.reshape(n_directions, -1, dim))
    d_bias = jnp.sum(d_gates, axis=(1, 2))
    d_w_proj = None
    if w_proj is not None:
        # the outputs before the projection, o * tanh(c), recomputed rather than saved by the
        # forward scan (a saved sequence costs a zero-filled buffer and a write per step); on
        # masked steps c_seq holds the carried c, but d_projected is zero there
        # (d_projected, time-major from the scan and small, is the operand transposed for the
        # product, not this one)
        o = jnp.split(r.activations, 4, axis=-1)[3]
        unprojected = (o * jnp.tanh(r.c_seq)).reshape(n_directions, -1, w_proj.shape[1])
        d_w_proj = jnp.swapaxes(settings.einsum(
            "dnp,dnk->dpk", jnp.swapaxes(d_projected, 0, 1).reshape(n_directions, -1, w_proj.shape[2]),
            unprojected), 1, 2)
    return d_w_hidden, d_bias, d_w_proj


def _recurrence_bwd(settings: RecurrenceSettings, residuals: _Residuals, cotangents):
    d_outputs, final_gradients = cotangents
    per_step, gate_factors = _per_step_factors(settings, residuals, d_outputs)
    (dc0, dh0, d_gates), d_projected = _backward_scan(settings, residuals, per_step, gate_factors,
                                                      tuple(final_gradients))
    return d_gates, None, (dc0, dh0), _weight_gradients(settings, residuals, d_gates, d_projected)


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def chunked_recurrence(inputs: Array, w_input: Array, mask: Array, state: tuple[Array, Array], weights: tuple,
                       settings: RecurrenceSettings, chunk: int) -> tuple[Array, tuple[Array, Array]]:
    """`lstm_recurrence` from the inputs (directions, time, batch, in) rather than their
    products: the input products are made `chunk` steps at a time inside an outer loop, so the
    (directions, time, batch, 4 * dim) products of all steps never exist at once (inference's
    peak memory at ELMo's size). No hand-written gradient: for inference."""
    n_directions, time, batch, in_dim = inputs.shape
    n_chunks = -(-time // chunk)
    pad = n_chunks * chunk - time
    inputs = jnp.pad(inputs, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))  # padded steps are masked: no change, no output

    def block(carry, k):
        x = lax.dynamic_slice_in_dim(inputs, k * chunk, chunk, axis=1).reshape(n_directions, chunk * batch, in_dim)
        gates = settings.einsum("dnk,dkm->dnm", x, w_input).reshape(n_directions, chunk, batch, -1)
        m = lax.dynamic_slice_in_dim(mask, k * chunk, chunk, axis=1)
        return _scan_steps(gates, m, carry, weights, settings, save_residuals=False)

    final, outputs = lax.scan(block, state, jnp.arange(n_chunks))  # outputs (chunks, directions, chunk, ...)
    outputs = jnp.moveaxis(outputs, 0, 1).reshape(n_directions, n_chunks * chunk, batch, -1)[:, :time]
    return outputs, final


class LSTMLayer(nn.Module):
    """One LSTM layer of each of `n_directions` independent LSTMs (the biLM's forward and
    backward LMs), with TensorFlow LSTMCell semantics, run over time together by one
    `lax.scan`. Inputs, masks, state and outputs carry a leading direction axis, as do the
    params (W_x, W_h, B, W_P_0, each direction's as bilm-tf's cell holds it).

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
    numerics: Numerics = PARITY
    unroll: int = 1  # time steps per iteration of the scan's loop
    # inference: the input products of at most this many bytes at a time (`chunked_recurrence`)
    input_chunk_bytes: Optional[int] = None

    @nn.compact
    def __call__(self, inputs: Array, mask: Array, state: tuple[Array, Array],
                 deterministic: bool = True) -> tuple[Array, tuple[Array, Array]]:
        """inputs (directions, batch, time, in), mask (directions, batch, time), state (c, h)
        each (directions, batch, .)."""
        n_directions, batch, time, in_dim = inputs.shape
        out_dim = self.projection_dim or self.dim
        # W_0 = [W_x; W_h], kept as two params so that neither is ever sliced (copied) out of it;
        # both initialized as the rows of one Glorot-uniform W_0, as TensorFlow does.
        limit = np.sqrt(6.0 / (in_dim + out_dim + 4 * self.dim))
        w_input = self.param("W_x", uniform(-limit, limit), (n_directions, in_dim, 4 * self.dim))
        w_hidden = self.param("W_h", uniform(-limit, limit), (n_directions, out_dim, 4 * self.dim))
        bias = self.param("B", nn.initializers.zeros, (n_directions, 4 * self.dim))
        w_proj = None
        if self.projection_dim is not None:
            w_proj = self.param("W_P_0", nn.initializers.glorot_uniform(batch_axis=(0,)),
                                (n_directions, self.dim, self.projection_dim))

        if self.dropout_rate > 0.0:
            inputs = Dropout(self.dropout_rate)(inputs, deterministic=deterministic)

        settings = RecurrenceSettings(self.cell_clip, self.proj_clip if w_proj is not None else None,
                                      self.numerics, self.unroll)
        weights = (w_hidden, bias, w_proj)
        time_major = jnp.swapaxes(inputs, 1, 2)  # transposing the small input, not the 4 * dim wide products
        mask_time_major = jnp.swapaxes(mask, 1, 2)
        step_bytes = 4 * n_directions * batch * 4 * self.dim  # one step's input products, float32
        chunk = time if not self.input_chunk_bytes else max(1, self.input_chunk_bytes // step_bytes)
        if chunk < time:
            outputs, new_state = chunked_recurrence(time_major, w_input, mask_time_major, tuple(state), weights,
                                                    settings, chunk)
        else:
            # The input-to-hidden products of all steps in one (batched) matrix product, before
            # the scan, laid out time-major for it.
            input_gates = settings.einsum("dnk,dkm->dnm", time_major.reshape(n_directions, time * batch, in_dim),
                                          w_input).reshape(n_directions, time, batch, 4 * self.dim)
            outputs, new_state = lstm_recurrence(input_gates, mask_time_major, tuple(state), weights, settings)
        outputs = jnp.swapaxes(outputs, 1, 2)
        if self.residual:
            outputs = jnp.where(mask[..., None], outputs + inputs, 0.0)
        return outputs, new_state


class LSTMStack(nn.Module):
    """Stacked LSTM layers of each direction (a leading direction axis on inputs, masks, state
    and outputs, see LSTMLayer); skip connections from the second layer on.

    `drop_output` (training) also drops the top layer's output, which bilm-tf's training graph
    does before its softmax."""

    options: LSTMOptions
    dropout_rate: float = 0.0
    numerics: Numerics = PARITY
    unroll: int = 1
    input_chunk_bytes: Optional[int] = None  # see LSTMLayer

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
                numerics=self.numerics,
                unroll=self.unroll,
                input_chunk_bytes=self.input_chunk_bytes,
                name=f"layer_{i}",
            )(x, mask, state[i], deterministic)
            outputs.append(x)
            new_state.append(layer_state)
        if drop_output and self.dropout_rate > 0.0:
            outputs[-1] = Dropout(self.dropout_rate, name="output_dropout")(outputs[-1], deterministic)
        return outputs, tuple(new_state)
