"""The Flax modules (float32) against independent float64 NumPy implementations.

The NumPy reference below is written from the math of bilm-tf (char CNN, highway, TensorFlow
LSTMCell with forget bias 1.0, cell / projection clipping, skip connections, the backward LM
reading each row's real tokens reversed, and weight_layers' masked layer norm); it calls no
elmojax code. Parameters come from the modules' own `init` (biases perturbed so that nothing
is trivially zero) and are converted to float64 for the reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elmojax.formats.options import BiLMOptions, CharCNNOptions, LSTMOptions
from elmojax.infer.mix import ScalarMix, weight_layers
from elmojax.model import char_ids as char_ids_lib
from elmojax.model.bilm import BiLM, CharCNNEmbedder, zero_state
from elmojax.model.char_ids import CharShapes, choose_shapes, distinct_tokens, full_shapes, pack_chars, trim_char_ids
from elmojax.model.lstm import LSTMLayer, gate_activations, gate_activations_plain
from elmojax.model.numerics import PARITY

# float32 against float64: tight enough that a wrong gate order, forget bias, clip or
# reversal (all changing values by >= 1e-3) fails.
ATOL = 1e-5
RTOL = 1e-5

BATCH = 3
TIME = 9
MAX_CHARS = 10


# --------------------------------------------------------------------------------------------
# NumPy float64 reference
# --------------------------------------------------------------------------------------------

def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_relu(x):
    return np.maximum(x, 0.0)


def to_f64(tree):
    """A nested dict / tuple of arrays as plain dicts / tuples of float64 numpy arrays."""
    if hasattr(tree, "items"):
        return {k: to_f64(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_f64(v) for v in tree)
    return np.asarray(tree, dtype=np.float64)


def np_highway(x, w_carry, b_carry, w_transform, b_transform):
    carry = np_sigmoid(x @ w_carry + b_carry)
    transform = np_relu(x @ w_transform + b_transform)
    return carry * transform + (1.0 - carry) * x


def np_char_cnn(p, options: CharCNNOptions, projection_dim: int, char_ids):
    """Char CNN embedder on char ids in the +1 layout (0 = padding = zero vector)."""
    char_ids = np.asarray(char_ids)
    batch_shape, n_chars = char_ids.shape[:-1], char_ids.shape[-1]
    ids = char_ids.reshape(-1, n_chars)
    table = p["char_embed"]
    chars = np.zeros(ids.shape + (table.shape[1],))
    real = ids > 0
    chars[real] = table[ids[real] - 1]

    activation = {"relu": np_relu, "tanh": np.tanh}[options.activation]
    pooled = []
    for i, (width, num) in enumerate(options.filters):
        kernel, bias = p[f"W_cnn_{i}"], p[f"b_cnn_{i}"]
        assert kernel.shape == (1, width, table.shape[1], num)
        n_pos = n_chars - width + 1
        conv = np.zeros((ids.shape[0], n_pos, num))
        for pos in range(n_pos):
            # out[p, n] = sum_{k < width, c} x[p + k, c] * W[0, k, c, n] + b[n]
            for k in range(width):
                conv[:, pos] += chars[:, pos + k] @ kernel[0, k]
            conv[:, pos] += bias
        pooled.append(activation(conv.max(axis=1)))
    x = np.concatenate(pooled, axis=-1)

    for i in range(options.n_highway):
        x = np_highway(x, p[f"W_carry_{i}"], p[f"b_carry_{i}"], p[f"W_transform_{i}"], p[f"b_transform_{i}"])

    if x.shape[-1] != projection_dim:
        x = x @ p["W_proj"] + p["b_proj"]
    return x.reshape(batch_shape + (x.shape[-1],))


def np_lstm_step(p, x, c_prev, h_prev, cell_clip=None, proj_clip=None, use_projection=False):
    """TensorFlow LSTMCell: gates i, j, f, o; forget bias 1.0; clip cell; project; clip."""
    # the file's W_0 is [W_x; W_h]
    z = np.concatenate([x, h_prev], axis=-1) @ np.concatenate([p["W_x"], p["W_h"]]) + p["B"]
    i, j, f, o = np.split(z, 4, axis=-1)
    c = np_sigmoid(f + 1.0) * c_prev + np_sigmoid(i) * np.tanh(j)
    if cell_clip is not None:
        c = np.clip(c, -cell_clip, cell_clip)
    h = np_sigmoid(o) * np.tanh(c)
    if use_projection:
        h = h @ p["W_P_0"]
        if proj_clip is not None:
            h = np.clip(h, -proj_clip, proj_clip)
    return c, h


def np_lstm_layer(p, x, mask, state, cell_clip=None, proj_clip=None, use_projection=False, residual=False):
    """One layer over time; masked steps keep the state and output 0."""
    c, h = state
    outputs = []
    for t in range(x.shape[1]):
        c_new, h_new = np_lstm_step(p, x[:, t], c, h, cell_clip, proj_clip, use_projection)
        m = mask[:, t, None]
        out = h_new + x[:, t] if residual else h_new
        outputs.append(np.where(m, out, 0.0))
        c = np.where(m, c_new, c)
        h = np.where(m, h_new, h)
    return np.stack(outputs, axis=1), (c, h)


def direction(p, d):
    """Direction d's params of a stacked LSTM (elmojax.model.lstm keeps the directions on a leading axis)."""
    return jax.tree_util.tree_map(lambda v: v[d], p)


def np_lstm_stack(p, lstm: LSTMOptions, x, mask, state):
    use_projection = lstm.projection_dim < lstm.dim
    outputs, new_state = [], []
    for i in range(lstm.n_layers):
        x, s = np_lstm_layer(
            p[f"layer_{i}"], x, mask, state[i],
            cell_clip=lstm.cell_clip,
            proj_clip=lstm.proj_clip if use_projection else None,
            use_projection=use_projection,
            residual=lstm.use_skip_connections and i > 0)
        outputs.append(x)
        new_state.append(s)
    return outputs, tuple(new_state)


def np_reverse(x, lengths):
    """Reverses the first lengths[b] steps of row b; the rest stay where they are."""
    y = np.array(x, copy=True)
    for b, n in enumerate(lengths):
        y[b, :n] = x[b, :n][::-1]
    return y


def np_bilm(params, options: BiLMOptions, char_ids, state):
    p = to_f64(params)
    state = to_f64(state)
    char_ids = np.asarray(char_ids)
    lengths = np.sum(np.any(char_ids > 0, axis=-1), axis=1)
    mask = np.arange(char_ids.shape[1])[None, :] < lengths[:, None]
    embedding = np_char_cnn(p["embedder"], options.char_cnn, options.projection_dim, char_ids)
    embedding = np.where(mask[..., None], embedding, 0.0)
    forward, forward_state = np_lstm_stack(direction(p["lstm"], 0), options.lstm, embedding, mask, state["forward"])
    reversed_outputs, backward_state = np_lstm_stack(
        direction(p["lstm"], 1), options.lstm, np_reverse(embedding, lengths), mask, state["backward"])
    backward = [np_reverse(x, lengths) for x in reversed_outputs]
    return ({"embedding": embedding, "mask": mask, "lengths": lengths, "forward": forward, "backward": backward},
            {"forward": forward_state, "backward": backward_state})


def np_layer_norm(x, mask):
    selected = x[mask]  # (n_real, dim)
    mean = selected.mean()
    variance = ((selected - mean) ** 2).mean()
    return (x - mean) / np.sqrt(variance + 1e-12)


def np_weight_layers(lm_embeddings, mask, weights, gamma, l2_coef=None, use_top_only=False, do_layer_norm=False):
    lm_embeddings = np.asarray(lm_embeddings, np.float64)
    gamma = float(np.reshape(gamma, ()))
    if use_top_only:
        return gamma * lm_embeddings[:, -1], 0.0
    weights = np.asarray(weights, np.float64)
    n_layers = lm_embeddings.shape[1]
    e = np.exp(weights + 1.0 / n_layers)
    normed = e / e.sum()
    mixed = np.zeros_like(lm_embeddings[:, 0])
    for k in range(n_layers):
        layer = lm_embeddings[:, k]
        mixed += normed[k] * (np_layer_norm(layer, mask) if do_layer_norm else layer)
    regularization = l2_coef * np.sum(weights ** 2) if l2_coef is not None else 0.0
    return gamma * mixed, regularization


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def assert_close(got, want, what, atol=ATOL, rtol=RTOL):
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}"
    np.testing.assert_allclose(got.astype(np.float64), want, atol=atol, rtol=rtol, err_msg=what)


def assert_substantial(x, what, scale=0.05):
    """Guards against vacuous comparisons of (nearly) all-zero tensors."""
    assert np.max(np.abs(x)) > scale, f"{what}: reference values are all tiny ({np.max(np.abs(x))})"


def perturb_biases(params, seed, scale=0.5):
    """Adds N(0, scale^2) to every bias (names b_*, B) so that none is trivially 0 or -2."""
    rng = np.random.default_rng(seed)

    def walk(tree):
        out = {}
        for k, v in tree.items():
            if hasattr(v, "items"):
                out[k] = walk(v)
            elif k == "B" or k.startswith("b_"):
                out[k] = jnp.asarray(np.asarray(v) + scale * rng.standard_normal(v.shape), jnp.float32)
            else:
                out[k] = v
        return out

    return walk(params)


def make_char_ids(rng, lengths, time=TIME, max_chars=MAX_CHARS):
    """(batch, time, max_chars) ids in the +1 layout; tokens past each row's length are all 0.

    Real tokens have 1..max_chars ids in 1..261 followed by 0 (zero vector) or 261 (bilm-tf's
    padding character) for the rest; those at odd positions start with a 0.
    """
    ids = np.zeros((len(lengths), time, max_chars), np.int32)
    for b, n in enumerate(lengths):
        for t in range(n):
            k = rng.integers(1, max_chars + 1)
            ids[b, t, :k] = rng.integers(1, 262, size=k)
            ids[b, t, k:] = 0 if rng.random() < 0.5 else 261
            if t % 2 == 1:  # a real token whose first id is 0: realness is "any id > 0"
                ids[b, t, 0] = 0
                ids[b, t, -1] = max(ids[b, t, -1], 1)
    return ids


def random_state(options: BiLMOptions, rng, scale=0.5):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), jnp.float32), zero_state(options, BATCH))


def init_params(module, seed, *args):
    """`module.init(PRNGKey(seed), *args)`, jitted (one XLA compile instead of many eager ops).

    The key is an RBG key (scoped to this call): the parameter values only need to be random,
    and threefry's per-parameter random bits take XLA several times longer to compile on CPU.
    """
    with jax.default_prng_impl("rbg"):
        return jax.jit(module.init)(jax.random.PRNGKey(seed), *args)


@functools.lru_cache(maxsize=None)
def bilm_apply(options: BiLMOptions):
    return jax.jit(BiLM(options).apply)


@functools.lru_cache(maxsize=None)
def bilm_params(options: BiLMOptions, seed: int):
    ids = jnp.zeros((BATCH, TIME, options.char_cnn.max_characters_per_token), jnp.int32)
    params = init_params(BiLM(options), seed, ids, zero_state(options, BATCH))
    return {"params": perturb_biases(params["params"], seed)}


def compare_bilm(options: BiLMOptions, params, ids, state):
    out, new_state = bilm_apply(options)(params, jnp.asarray(ids), state)
    ref, ref_state = np_bilm(params["params"], options, ids, state)

    np.testing.assert_array_equal(np.asarray(out.lengths), ref["lengths"])
    np.testing.assert_array_equal(np.asarray(out.mask), ref["mask"])
    assert_substantial(ref["embedding"], "embedding")
    assert_close(out.embedding, ref["embedding"], "embedding")
    assert len(out.forward) == len(out.backward) == options.lstm.n_layers
    for direction in ("forward", "backward"):
        for i, (got, want) in enumerate(zip(getattr(out, direction), ref[direction])):
            assert_substantial(want, f"{direction} layer {i}")
            assert_close(got, want, f"{direction} layer {i}")
        for i, ((c, h), (c_ref, h_ref)) in enumerate(zip(new_state[direction], ref_state[direction])):
            assert_close(c, c_ref, f"{direction} layer {i} final c")
            assert_close(h, h_ref, f"{direction} layer {i} final h")
    return out, ref


# --------------------------------------------------------------------------------------------
# 1. LSTM step
# --------------------------------------------------------------------------------------------

def test_lstm_step_with_projection_and_clipping():
    """One step of two directions at once (the stacked recurrence), each its own LSTMCell: its
    own weights, inputs, mask and state."""
    rng = np.random.default_rng(0)
    dim, proj, in_dim = 16, 8, 6
    cell_clip, proj_clip = 1.0, 0.5
    layer = LSTMLayer(dim=dim, projection_dim=proj, cell_clip=cell_clip, proj_clip=proj_clip)
    x = jnp.asarray(3.0 * rng.standard_normal((2, BATCH, 1, in_dim)), jnp.float32)
    mask = jnp.asarray([[[True], [True], [False]], [[False], [True], [True]]])
    c0 = jnp.asarray(2.0 * rng.standard_normal((2, BATCH, dim)), jnp.float32)
    h0 = jnp.asarray(rng.standard_normal((2, BATCH, proj)), jnp.float32)

    params = init_params(layer, 0, x, mask, (c0, h0))
    p = perturb_biases(params["params"], 0)
    p["W_P_0"] = 3.0 * p["W_P_0"]  # make the projection large enough to reach proj_clip
    assert p["W_x"].shape == (2, in_dim, 4 * dim) and p["W_P_0"].shape == (2, dim, proj)
    out, (c, h) = layer.apply({"params": p}, x, mask, (c0, h0))
    assert out.shape == (2, BATCH, 1, proj) and c.shape == (2, BATCH, dim) and h.shape == (2, BATCH, proj)

    for d, real in ((0, slice(0, 2)), (1, slice(1, 3))):
        pf = direction(to_f64(p), d)
        xd, c0d, h0d = to_f64(x)[d, :, 0], to_f64(c0)[d], to_f64(h0)[d]
        c_ref, h_ref = np_lstm_step(pf, xd, c0d, h0d, cell_clip, proj_clip, True)
        c_raw, h_raw = np_lstm_step(pf, xd, c0d, h0d, None, proj_clip, True)
        # Clipping actually happens in the reference (some values at the bound, some inside it).
        assert np.any(np.abs(c_raw[real]) > cell_clip + 0.05) and np.any(np.abs(c_ref[real]) < cell_clip - 0.05)
        assert np.any(np.abs(c_ref[real]) == cell_clip)
        assert np.any(np.abs(h_ref[real]) == proj_clip) and np.any(np.abs(h_ref[real]) < proj_clip - 0.05)

        assert_close(c[d, real], c_ref[real], f"direction {d} c")
        assert_close(h[d, real], h_ref[real], f"direction {d} h")
        assert_close(out[d, real, 0], h_ref[real], f"direction {d} output")
        np.testing.assert_array_less(np.abs(np.asarray(c[d, real])), cell_clip + 1e-6)
        np.testing.assert_array_less(np.abs(np.asarray(h[d, real])), proj_clip + 1e-6)
        # The masked row: state unchanged, output 0.
        masked = 2 if d == 0 else 0
        np.testing.assert_array_equal(np.asarray(c[d, masked]), np.asarray(c0[d, masked]))
        np.testing.assert_array_equal(np.asarray(h[d, masked]), np.asarray(h0[d, masked]))
        np.testing.assert_array_equal(np.asarray(out[d, masked]), 0.0)


def test_gate_activations_against_float64_and_their_plain_twin():
    """The one-pass activations (sigmoid through tanh) against float64 NumPy and against the
    plain sigmoid/tanh twin, from 0 to where they saturate, in each gate's place: i, j, f (with
    the forget bias), o."""
    dim = 40
    z = np.concatenate([np.linspace(-40.0, 40.0, 4 * dim * 25), [0.0, -1.0, 1.0, 1e-8]])
    z = np.resize(np.random.default_rng(0).permutation(z), (27, 4 * dim))
    fast = np.asarray(gate_activations(jnp.asarray(z, jnp.float32)))
    plain = np.asarray(gate_activations_plain(jnp.asarray(z, jnp.float32)))
    zi, zj, zf, zo = np.split(np.asarray(z, np.float32).astype(np.float64), 4, axis=-1)
    ref = np.concatenate([np_sigmoid(zi), np.tanh(zj), np_sigmoid(zf + 1.0), np_sigmoid(zo)], axis=-1)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=3e-7)  # a few float32 ulps of 1
    np.testing.assert_allclose(fast, plain, rtol=0, atol=3e-7)
    assert fast.min() >= -1.0 and fast.max() <= 1.0
    sig = np.r_[0:dim, 2 * dim:4 * dim]  # the sigmoid gates' columns stay in [0, 1]
    assert fast[:, sig].min() >= 0.0


@pytest.mark.parametrize("residual", [False, True])
def test_lstm_layer_sequence_with_mask_holes(residual):
    """Several steps, no projection, masks that are not prefixes (each direction its own), a
    nonzero initial state; one direction alone (a unidirectional model) gives the same."""
    rng = np.random.default_rng(1)
    dim, time = 8, 5
    layer = LSTMLayer(dim=dim, cell_clip=0.8, residual=residual)
    x = jnp.asarray(rng.standard_normal((2, BATCH, time, dim)), jnp.float32)
    mask = jnp.asarray([[[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]],
                        [[0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]], bool)
    state = (jnp.asarray(rng.standard_normal((2, BATCH, dim)), jnp.float32),
             jnp.asarray(rng.standard_normal((2, BATCH, dim)), jnp.float32))
    params = init_params(layer, 1, x, mask, state)
    p = perturb_biases(params["params"], 1)
    assert "W_P_0" not in p
    out, new_state = layer.apply({"params": p}, x, mask, state)

    for d in range(2):
        ref, ref_state = np_lstm_layer(direction(to_f64(p), d), to_f64(x)[d], np.asarray(mask)[d],
                                       direction(to_f64(state), d), cell_clip=0.8, residual=residual)
        assert_substantial(ref, "outputs")
        assert_close(out[d], ref, f"direction {d} outputs")
        assert_close(new_state[0][d], ref_state[0], f"direction {d} final c")
        assert_close(new_state[1][d], ref_state[1], f"direction {d} final h")
    # inference's input products two steps at a time (chunked_recurrence; 5 steps: one padded)
    chunked = LSTMLayer(dim=dim, cell_clip=0.8, residual=residual, input_chunk_bytes=2 * 4 * 2 * BATCH * 4 * dim)
    chunked_out, chunked_state = chunked.apply({"params": p}, x, mask, state)
    for d in range(2):
        ref, ref_state = np_lstm_layer(direction(to_f64(p), d), to_f64(x)[d], np.asarray(mask)[d],
                                       direction(to_f64(state), d), cell_clip=0.8, residual=residual)
        assert_close(chunked_out[d], ref, f"chunked, direction {d} outputs")
        assert_close(chunked_state[0][d], ref_state[0], f"chunked, direction {d} final c")
        assert_close(chunked_state[1][d], ref_state[1], f"chunked, direction {d} final h")
    one = jax.tree_util.tree_map(lambda v: v[1:], (p, x, mask, state))
    alone, alone_state = layer.apply({"params": one[0]}, *one[1:])
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(out[1]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(alone_state[0][0]), np.asarray(new_state[0][1]), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 2. Highway layer and char CNN
# --------------------------------------------------------------------------------------------

def _cnn_ids(rng, shape):
    ids = rng.integers(1, 262, size=shape).astype(np.int32)
    ids[rng.random(shape) < 0.25] = 0   # padding chars inside tokens: zero vectors
    ids[0, 1] = 0                        # an all-padding token
    ids[1, 0, :] = 261                   # the highest id: the table's last row
    return ids


def test_highway_layer():
    """One highway layer in isolation: the CNN output from the module itself, then one layer."""
    rng = np.random.default_rng(2)
    filters = ((1, 4), (2, 6), (3, 6))
    with_highway = CharCNNOptions(filters=filters, embedding_dim=5, max_characters_per_token=MAX_CHARS, n_highway=1)
    no_highway = dataclasses.replace(with_highway, n_highway=0)
    n_filters = with_highway.n_filters  # = projection_dim: no projection
    ids = jnp.asarray(_cnn_ids(rng, (BATCH, 4, MAX_CHARS)))

    module = CharCNNEmbedder(with_highway, n_filters)
    params = init_params(module, 2, ids)["params"]
    params = perturb_biases(params, 2)
    params = {k: (10.0 * v if k.startswith("W_cnn") else v) for k, v in params.items()}  # sizeable CNN output
    assert set(params) == {"char_embed", "W_cnn_0", "b_cnn_0", "W_cnn_1", "b_cnn_1", "W_cnn_2", "b_cnn_2",
                           "W_carry_0", "b_carry_0", "W_transform_0", "b_transform_0"}

    cnn_only = {k: v for k, v in params.items() if "carry" not in k and "transform" not in k}
    x0 = CharCNNEmbedder(no_highway, n_filters).apply({"params": cnn_only}, ids)
    got = module.apply({"params": params}, ids)
    p = to_f64(params)
    want = np_highway(to_f64(x0), p["W_carry_0"], p["b_carry_0"], p["W_transform_0"], p["b_transform_0"])
    assert_substantial(want - to_f64(x0), "highway change")
    assert_close(got, want, "highway output")


@pytest.mark.parametrize("activation, chunk_size", [("relu", None), ("tanh", None), ("relu", 5)])
def test_char_cnn(activation, chunk_size):
    """chunk_size 5: the convolutions over 12 tokens in 3 chunks, the last one padded."""
    rng = np.random.default_rng(3)
    # widths 1 (every position) to max_characters_per_token (a single position)
    filters = ((1, 3), (2, 4), (3, 5), (MAX_CHARS, 4))
    options = CharCNNOptions(filters=filters, embedding_dim=5, max_characters_per_token=MAX_CHARS,
                             activation=activation, n_highway=2)
    projection_dim = 8
    ids = _cnn_ids(rng, (BATCH, 4, MAX_CHARS))
    module = CharCNNEmbedder(options, projection_dim, chunk_size=chunk_size)
    params = perturb_biases(init_params(module, 3, jnp.asarray(ids))["params"], 3, scale=0.3)
    if activation == "relu":
        params = {k: (10.0 * v if k.startswith("W_cnn") else v) for k, v in params.items()}
    assert params["W_proj"].shape == (options.n_filters, projection_dim)

    got = module.apply({"params": params}, jnp.asarray(ids))
    want = np_char_cnn(to_f64(params), options, projection_dim, ids)
    assert got.shape == (BATCH, 4, projection_dim)
    assert_substantial(want, "char cnn")
    assert_close(got, want, f"char cnn ({activation})")


# --------------------------------------------------------------------------------------------
# 3. + 4. The whole BiLM
# --------------------------------------------------------------------------------------------

def bilm_options(filters=((1, 4), (2, 8), (3, 8)), embedding_dim=4, activation="relu", n_highway=2,
                 dim=16, projection_dim=8, n_layers=2, cell_clip=3.0, proj_clip=3.0, use_skip_connections=False):
    return BiLMOptions(
        lstm=LSTMOptions(dim=dim, projection_dim=projection_dim, n_layers=n_layers, cell_clip=cell_clip,
                         proj_clip=proj_clip, use_skip_connections=use_skip_connections),
        char_cnn=CharCNNOptions(filters=filters, embedding_dim=embedding_dim, max_characters_per_token=MAX_CHARS,
                                activation=activation, n_highway=n_highway))


BASE = bilm_options()


@pytest.mark.parametrize("lengths, initial_state", [
    ((TIME, 4, 1), "zero"),
    ((6, TIME, 0), "zero"),
    ((2, 7, TIME), "random"),
    ((TIME, 0, 5), "random"),
])
def test_bilm_backward_reversal(lengths, initial_state):
    rng = np.random.default_rng(sum(lengths))
    ids = make_char_ids(rng, lengths)
    state = zero_state(BASE, BATCH) if initial_state == "zero" else random_state(BASE, rng)
    params = bilm_params(BASE, 0)
    out, ref = compare_bilm(BASE, params, ids, state)

    lengths = np.asarray(lengths)
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(np.asarray(out.embedding[b, n:]), 0.0)
        for layer in list(out.forward) + list(out.backward):
            np.testing.assert_array_equal(np.asarray(layer[b, n:]), 0.0)
    # The backward LM reads each row's real tokens last to first: its output at the last real
    # token is its first step from the initial state, which sees that one token only.
    p = direction(to_f64(params["params"])["lstm"], 1)
    initial = to_f64(state)["backward"]
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        first, _ = np_lstm_stack(p, BASE.lstm, ref["embedding"][b:b + 1, n - 1:n], np.ones((1, 1), bool),
                                 tuple((c[b:b + 1], h[b:b + 1]) for c, h in initial))
        for i, layer in enumerate(out.backward):
            assert_close(layer[b, n - 1], first[i][0, 0], f"row {b} backward layer {i} at the last token")


OPTION_SETS = {
    "tanh": bilm_options(activation="tanh"),
    "highway0": bilm_options(n_highway=0),
    "highway1": bilm_options(n_highway=1),
    "no_cnn_projection": bilm_options(filters=((1, 2), (2, 2), (3, 4)), projection_dim=8),
    # dim == projection_dim: no LSTM projection, so proj_clip (tiny here) must not apply.
    "no_lstm_projection": bilm_options(dim=8, projection_dim=8, proj_clip=0.05, cell_clip=0.5),
    "skip_connections": bilm_options(use_skip_connections=True, n_layers=3, cell_clip=0.5, proj_clip=0.2),
    "one_layer": bilm_options(n_layers=1),
    "three_layers": bilm_options(n_layers=3, cell_clip=None, proj_clip=None),
}


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_bilm_option_sets(name):
    options = OPTION_SETS[name]
    rng = np.random.default_rng(len(name))
    ids = make_char_ids(rng, (TIME, 5, 2))
    state = random_state(options, rng)
    params = bilm_params(options, 1)

    embedder = params["params"]["embedder"]
    assert ("W_proj" in embedder) == (options.char_cnn.n_filters != options.projection_dim)
    assert sum(k.startswith("W_carry") for k in embedder) == options.char_cnn.n_highway
    layer0 = params["params"]["lstm"]["layer_0"]
    assert ("W_P_0" in layer0) == (options.lstm.projection_dim < options.lstm.dim)

    out, ref = compare_bilm(options, params, ids, state)
    if name == "no_lstm_projection":
        # proj_clip would have changed the outputs had it been applied.
        assert np.max(np.abs(ref["forward"][0])) > 4 * options.lstm.proj_clip


# --------------------------------------------------------------------------------------------
# 5. Layer norm, weight_layers, ScalarMix
# --------------------------------------------------------------------------------------------

def _lm_embeddings(rng, n_layers=3, time=6, dim=5):
    lengths = np.array([time, 3, 1])
    mask = np.arange(time)[None, :] < lengths[:, None]
    # Layers with different offsets / scales; junk (not zeros) at padded positions, which the
    # layer-norm statistics must ignore.
    x = np.stack([2.0 * k + (k + 1) * rng.standard_normal((BATCH, time, dim)) for k in range(n_layers)], axis=1)
    x[~np.broadcast_to(mask[:, None], x.shape[:3])] += 50.0
    return x.astype(np.float32), mask


def test_layer_norm_masked_statistics():
    rng = np.random.default_rng(5)
    x, mask = _lm_embeddings(rng, n_layers=1)
    got, reg = weight_layers(x, mask, np.zeros(1, np.float32), np.ones(1, np.float32), do_layer_norm=True)
    want = np_layer_norm(x[:, 0].astype(np.float64), mask)
    assert_close(got, want, "layer norm")
    assert float(reg) == 0.0
    # Over the real positions the result has mean 0 and variance 1.
    real = np.asarray(got)[mask]
    assert abs(real.mean()) < 1e-5 and abs(real.var() - 1.0) < 1e-4


@pytest.mark.parametrize("do_layer_norm, use_top_only, l2_coef", [
    (False, False, None),
    (False, False, 0.01),
    (True, False, None),
    (True, False, 0.1),
    (False, True, None),
    (True, True, 0.01),
])
def test_weight_layers_and_scalar_mix(do_layer_norm, use_top_only, l2_coef):
    rng = np.random.default_rng(6)
    x, mask = _lm_embeddings(rng)
    weights = np.array([0.3, -1.2, 0.8], np.float32)
    gamma = np.array([1.7], np.float32)

    got, reg = weight_layers(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(weights), jnp.asarray(gamma),
                             l2_coef=l2_coef, use_top_only=use_top_only, do_layer_norm=do_layer_norm)
    want, want_reg = np_weight_layers(x, mask, weights, gamma, l2_coef, use_top_only, do_layer_norm)
    assert_substantial(want, "weight_layers")
    assert_close(got, want, "weight_layers")
    np.testing.assert_allclose(float(reg), want_reg, rtol=1e-6, atol=1e-7)
    if l2_coef is not None and not use_top_only:
        assert want_reg > 0

    mix = ScalarMix(n_layers=3, l2_coef=l2_coef, use_top_only=use_top_only, do_layer_norm=do_layer_norm)
    mix_params = mix.init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(mask))["params"]
    assert ("weights" in mix_params) == (not use_top_only)
    mix_params = {"gamma": jnp.asarray(gamma)}
    if not use_top_only:
        mix_params["weights"] = jnp.asarray(weights)
    mixed, mix_reg = mix.apply({"params": mix_params}, jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(mixed), np.asarray(got), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(float(mix_reg), float(reg), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# 5. Gradients: the hand-written backward passes against finite differences of the reference
# --------------------------------------------------------------------------------------------

def _directional_check(grads, loss_np, point, rng, what, eps=1e-6, rtol=1e-6):
    """For each leaf of `point`: <grad, v> against a central difference of the float64 NumPy
    loss along a random direction v (the other leaves held fixed)."""
    leaves, treedef = jax.tree_util.tree_flatten(point)
    grad_leaves = jax.tree_util.tree_leaves(grads)
    assert len(grad_leaves) == len(leaves)
    for k, (leaf, grad) in enumerate(zip(leaves, grad_leaves)):
        v = rng.standard_normal(np.shape(leaf))

        def shifted(sign):
            moved = list(leaves)
            moved[k] = np.asarray(leaf) + sign * eps * v
            return loss_np(jax.tree_util.tree_unflatten(treedef, moved))

        numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
        analytic = float(np.sum(np.asarray(grad, np.float64) * v))
        assert abs(numeric) > 1e-3, f"{what}, leaf {k}: the loss hardly depends on it"
        assert abs(analytic - numeric) <= rtol * max(1.0, abs(numeric)), \
            f"{what}, leaf {k}: gradient {analytic} != finite difference {numeric}"


@pytest.mark.parametrize("projection, cell_clip, proj_clip", [(True, 0.6, 0.5), (False, 0.6, None),
                                                              (True, None, None)])
def test_lstm_layer_gradients(projection, cell_clip, proj_clip):
    """The LSTM's hand-written backpropagation through time (float64) against central
    differences of the NumPy layer: clipping active (or none), a mask with holes, a nonzero
    initial state."""
    rng = np.random.default_rng(11)
    dim, proj, time = 6, 4, 5
    out_dim = proj if projection else dim
    layer = LSTMLayer(dim=dim, projection_dim=proj if projection else None, cell_clip=cell_clip,
                      proj_clip=proj_clip, numerics=PARITY)
    # two directions, each its own mask with holes (the stacked recurrence's backward pass)
    mask = np.array([[[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]],
                     [[1, 1, 0, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]], bool)
    x = rng.standard_normal((2, BATCH, time, dim))
    state = (rng.standard_normal((2, BATCH, dim)), rng.standard_normal((2, BATCH, out_dim)))
    params = init_params(layer, 11, jnp.asarray(x, jnp.float32), jnp.asarray(mask),
                         jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), state))["params"]
    params = {k: 2.0 * np.asarray(v, np.float64) + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    weights = (rng.standard_normal((2, BATCH, time, out_dim)), rng.standard_normal((2, BATCH, dim)),
               rng.standard_normal((2, BATCH, out_dim)))

    def loss_np(point):
        p, inputs, s = point
        total = 0.0
        for d in range(2):
            out, (c, h) = np_lstm_layer(direction(p, d), inputs[d], mask[d], direction(s, d), cell_clip, proj_clip,
                                        use_projection=projection)
            total += np.sum(out * weights[0][d]) + np.sum(c * weights[1][d]) + np.sum(h * weights[2][d])
        return total

    with jax.enable_x64(True):
        def loss(point):
            p, inputs, s = point
            out, (c, h) = layer.apply({"params": p}, inputs, jnp.asarray(mask), s)
            return jnp.sum(out * weights[0]) + jnp.sum(c * weights[1]) + jnp.sum(h * weights[2])

        point = jax.tree_util.tree_map(jnp.asarray, (params, x, state))
        assert point[1].dtype == jnp.float64
        grads = jax.grad(loss)(point)
        _, (c, _) = layer.apply({"params": point[0]}, point[1], jnp.asarray(mask), point[2])
    if cell_clip is not None:  # some cells sit on the clip (their gradient must be cut) and some do not
        at_clip = np.isclose(np.abs(np.asarray(c)), cell_clip)
        assert at_clip.any() and not at_clip.all()
    _directional_check(grads, loss_np, (params, x, state), rng, f"LSTM layer (projection={projection})")


def test_char_cnn_gradients():
    """The char CNN's gradient (max-pooling's goes to one maximal position) against central
    differences of the NumPy embedder, with padding characters whose windows tie at the max."""
    rng = np.random.default_rng(12)
    options = CharCNNOptions(filters=((1, 3), (2, 4), (3, 5)), embedding_dim=4, max_characters_per_token=MAX_CHARS,
                             activation="relu", n_highway=1)
    projection_dim = 6
    ids = _cnn_ids(rng, (BATCH, 4, MAX_CHARS))
    ids[0, 2, 3:] = 261  # a word followed by padding characters: identical windows
    ids[2, 3, 2:] = 0
    module = CharCNNEmbedder(options, projection_dim, numerics=PARITY)
    params = init_params(module, 12, jnp.asarray(ids))["params"]
    params = {k: np.asarray(v, np.float64) + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    weights = rng.standard_normal((BATCH, 4, projection_dim))

    def loss_np(p):
        return np.sum(np_char_cnn(p, options, projection_dim, ids) * weights)

    with jax.enable_x64(True):
        point = jax.tree_util.tree_map(jnp.asarray, params)
        grads = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, jnp.asarray(ids)) * weights))(point)
        conv = jax.lax.conv_general_dilated(
            jnp.take(jnp.concatenate([jnp.zeros((1, 4)), point["char_embed"]]), jnp.asarray(ids[0, 2]), axis=0)[None],
            point["W_cnn_2"][0], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))[0]
    # the padding windows do tie at the maximum for some filter
    top = np.asarray(conv).max(axis=0)
    assert (np.sum(np.isclose(np.asarray(conv), top, rtol=0, atol=1e-12), axis=0) > 1).any()
    _directional_check(grads, loss_np, params, rng, "char CNN")


# --------------------------------------------------------------------------------------------
# 6. Char ids cut short after the longest word
# --------------------------------------------------------------------------------------------

def _spelled_ids(rng, n_tokens, n_chars, max_word):
    """Batcher-like rows: bow, chars, eow, then the padding character 261; plus an all-zero row."""
    ids = np.full((n_tokens, n_chars), 261, np.int32)
    for row in ids:
        k = rng.integers(1, max_word + 1)
        row[0], row[1 : k + 1], row[k + 1] = 259, rng.integers(1, 257, size=k), 260
    ids[-1] = 0
    return ids


@pytest.mark.parametrize("hash_collides", [False, True])
def test_distinct_tokens(monkeypatch, hash_collides):
    if hash_collides:  # every row hashes alike: the check must catch it and compare the rows
        monkeypatch.setattr(char_ids_lib, "_row_hash_multipliers", lambda width: np.zeros(width, np.uint64))
    rng = np.random.default_rng(5)
    vocabulary = rng.integers(0, 262, size=(40, 12)).astype(np.int32)
    vocabulary[1] = vocabulary[0]
    vocabulary[1, -1] += 1  # two rows that differ in their last id only
    char_ids = vocabulary[rng.integers(0, 40, size=(6, 30))]
    distinct, index = distinct_tokens(char_ids, multiple=48)
    n = len(np.unique(char_ids.reshape(-1, 12), axis=0))
    assert distinct.shape == (96, 12) and index.shape == (6, 30) and index.dtype == np.int32
    assert index.max() == n - 1 and len(np.unique(distinct[:n], axis=0)) == n
    np.testing.assert_array_equal(distinct[index], char_ids)
    np.testing.assert_array_equal(distinct[n:], 0)


def test_trim_char_ids():
    ids = np.array([[5, 6, 261, 261, 261, 261, 261, 261, 261, 261, 261, 261],
                    [5, 261, 7, 261, 261, 261, 261, 261, 261, 261, 261, 261],
                    [0] * 12], np.int32)
    trimmed, tails = trim_char_ids(ids, max_width=3, multiple=2)
    # the latest tail starts at 3; windows of 3 starting at 3 or later lie in it: keep 3 + 2 -> 6
    assert trimmed.shape == (3, 6) and list(tails) == [261, 261, 0]
    np.testing.assert_array_equal(trimmed, ids[:, :6])
    # a row without a tail: nothing can be cut
    full = ids.copy()
    full[0, -1] = 9
    assert trim_char_ids(full, max_width=3)[1] is None


def test_char_cnn_on_trimmed_ids():
    """The CNN on ids cut short (one window of the tail character standing for the left-out
    ones) against the NumPy reference on the full ids, values and gradients."""
    rng = np.random.default_rng(13)
    n_chars = 24
    options = CharCNNOptions(filters=((1, 3), (2, 4), (4, 5)), embedding_dim=4, max_characters_per_token=n_chars,
                             activation="relu", n_highway=1)
    projection_dim = 6
    ids = _spelled_ids(rng, 7, n_chars, max_word=6)
    # cut as short as allowed: the longest word's widest windows all hold some of its characters
    trimmed, tails = trim_char_ids(ids, options.max_width, multiple=1)
    assert trimmed.shape[1] < n_chars
    module = CharCNNEmbedder(options, projection_dim, numerics=PARITY, chunk_size=3)
    params = init_params(module, 13, jnp.asarray(ids))["params"]
    params = {k: np.asarray(v, np.float64) + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    params["char_embed"][260] *= 4.0  # the padding character (id 261): its windows often win the max
    weights = rng.standard_normal((len(ids), projection_dim))

    # for some token and filter, only a left-out window reaches the max
    chars = np.where(ids[..., None] > 0, params["char_embed"][np.maximum(ids, 1) - 1], 0.0)
    tail_wins = False
    for i, (width, _) in enumerate(options.filters):
        kernel = params[f"W_cnn_{i}"][0]
        conv = np.stack([sum(chars[:, p + k] @ kernel[k] for k in range(width))
                         for p in range(n_chars - width + 1)], axis=1)
        kept = trimmed.shape[1] - width + 1
        tail_wins |= bool((conv[:, kept:].max(axis=1) > conv[:, :kept].max(axis=1) + 1e-6).any())
    assert tail_wins

    def loss_np(p):
        return np.sum(np_char_cnn(p, options, projection_dim, ids) * weights)

    params32 = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    got = module.apply({"params": params32}, jnp.asarray(trimmed), jnp.asarray(tails))
    want = np_char_cnn(params, options, projection_dim, ids)
    assert_close(got, want, "char cnn on trimmed ids")
    with jax.enable_x64(True):
        point = jax.tree_util.tree_map(jnp.asarray, params)
        grads = jax.grad(lambda p: jnp.sum(
            module.apply({"params": p}, jnp.asarray(trimmed), jnp.asarray(tails)) * weights))(point)
    _directional_check(grads, loss_np, params, rng, "char CNN on trimmed ids")


def test_char_cnn_on_packed_layouts():
    """Batches laid out as char_ids.pack_chars does for the train step (short rows cut to a
    width with their tail ids, then long rows at full width): the embedding each token's index
    picks is the float64 NumPy CNN's of its full ids. Rows past the short table spill into the
    long one; a batch with more long rows than the layout has is refused (None), and
    choose_shapes picks layouts its samples fit."""
    rng = np.random.default_rng(21)
    n_chars = 24
    options = CharCNNOptions(filters=((1, 3), (2, 4), (4, 5)), embedding_dim=4, max_characters_per_token=n_chars,
                             activation="relu", n_highway=1)
    ids = _spelled_ids(rng, 30, n_chars, max_word=5)  # rows cut to 16 characters lose nothing but tail
    for row in (3, 11):  # two words too long for that
        ids[row, 1:21], ids[row, 21] = rng.integers(1, 257, size=20), 260
    ids[12] = ids[11]  # (a repeated token: one row)
    batch = ids.reshape(2, 3, 5, n_chars)  # (directions, batch, time) as the step stacks them
    module = CharCNNEmbedder(options, 6, numerics=PARITY)
    params = init_params(module, 21, jnp.asarray(ids))["params"]
    params = {k: np.asarray(v, np.float64) + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    params32 = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    want = np_char_cnn(params, options, 6, ids).reshape(2, 3, 5, -1)
    n_distinct = len(np.unique(ids, axis=0))
    for shapes in [CharShapes(32, 16, 8), CharShapes(n_distinct - 3, 16, 8), full_shapes(30, n_chars)]:
        packed = pack_chars(batch, shapes, options.max_width)
        assert packed.short.shape == (shapes.n_short, shapes.width) and packed.index.shape == (2, 3, 5)
        assert (packed.tails is None) == (shapes.width == n_chars) and (packed.long is None) == (shapes.n_long == 0)
        table = module.apply({"params": params32}, jnp.asarray(packed.short),
                             None if packed.tails is None else jnp.asarray(packed.tails))
        if packed.long is not None:
            table = jnp.concatenate([table, module.apply({"params": params32}, jnp.asarray(packed.long))])
        assert_close(np.asarray(table)[packed.index], want, f"char cnn on packed layout {shapes}")
    assert pack_chars(batch, CharShapes(32, 16, 1), options.max_width) is None  # 2 long rows, room for 1
    assert pack_chars(batch, CharShapes(n_distinct - 9, 16, 8), options.max_width) is None  # spill past the room
    chosen = choose_shapes([batch, batch[::-1]], options.max_width)
    assert pack_chars(batch, chosen, options.max_width) is not None and chosen.n_short < 60
