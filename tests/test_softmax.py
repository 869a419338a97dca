"""Tests of elmojax.model.softmax against independent NumPy (float64) computations.

Statistical tests use fixed seeds and bounds of several standard errors (Z = 5), so they are
deterministic and would still pass for almost any other seed; each bound is also far tighter
than the effect of the mistakes it is meant to catch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elmojax.model import softmax
from elmojax.model.numerics import Numerics

HIGHEST = Numerics(precision="highest")

Z = 5.0  # standard errors allowed in statistical comparisons


def np_log_uniform(range_max):
    ids = np.arange(range_max, dtype=np.float64)
    return (np.log(ids + 2.0) - np.log(ids + 1.0)) / np.log(range_max + 1.0)


def simulate_unique_sampler(rng, n, num_sampled, range_max):
    """The literal process, n times in parallel: draw one id at a time with replacement from
    the log-uniform distribution until num_sampled distinct ids have been seen.

    Returns (order (n, num_sampled): distinct ids in order of first appearance, tries (n,)).
    """
    p = np_log_uniform(range_max)
    seen = np.zeros((n, range_max), bool)
    order = np.full((n, num_sampled), -1, np.int64)
    count = np.zeros(n, np.int64)
    tries = np.zeros(n, np.int64)
    active = np.arange(n)
    while active.size:
        draw = rng.choice(range_max, size=active.size, p=p)
        new = ~seen[active, draw]
        seen[active, draw] = True
        order[active[new], count[active[new]]] = draw[new]
        count[active] += new
        tries[active] += 1
        active = active[count[active] < num_sampled]
    return order, tries


def assert_frequencies_match(a_counts, n_a, b_counts, n_b, what):
    """Two-sample comparison of Bernoulli frequencies, elementwise, at Z standard errors."""
    fa, fb = a_counts / n_a, b_counts / n_b
    pooled = np.clip((a_counts + b_counts) / (n_a + n_b), 1.0 / (n_a + n_b), None)
    se = np.sqrt(pooled * (1 - pooled) * (1.0 / n_a + 1.0 / n_b))
    bad = np.abs(fa - fb) > Z * se
    assert not bad.any(), f"{what}: {fa[bad]} vs {fb[bad]} (se {se[bad]}) at {np.nonzero(bad)}"


def sample_many(seed, n, num_sampled, range_max):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    fn = jax.jit(jax.vmap(lambda k: softmax.sample_log_uniform_unique(k, num_sampled, range_max)))
    ids, tries = fn(keys)
    return np.asarray(ids), np.asarray(tries)


# 1. log-uniform probabilities


@pytest.mark.parametrize("range_max", [1, 2, 50, 793471])
def test_log_uniform_probs(range_max):
    ids = np.arange(range_max)
    got = np.asarray(softmax.log_uniform_probs(jnp.asarray(ids), range_max), np.float64)
    want = np_log_uniform(range_max)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    assert abs(got.sum() - 1.0) < 1e-5
    assert abs(want.sum() - 1.0) < 1e-12


# 2. the unique log-uniform sampler


def test_sampler_matches_literal_process():
    num_sampled, range_max, n = 5, 50, 20000
    ids, tries = sample_many(0, n, num_sampled, range_max)
    order, sim_tries = simulate_unique_sampler(np.random.default_rng(1), n, num_sampled, range_max)

    # (a) shape, dtype, range, distinctness; num_tries an integer >= num_sampled
    assert ids.shape == (n, num_sampled) and ids.dtype == np.int32
    assert tries.shape == (n,) and tries.dtype == np.float32
    assert ids.min() >= 0 and ids.max() < range_max
    assert (np.diff(np.sort(ids, axis=1), axis=1) > 0).all()
    assert (tries == np.round(tries)).all() and tries.min() >= num_sampled

    # (b) inclusion frequency of each id, and the frequency of each id at each position
    # (the order of first appearance)
    def counts(x):
        return np.stack([np.bincount(x[:, j], minlength=range_max) for j in range(num_sampled)])

    got_pos, want_pos = counts(ids), counts(order)
    assert_frequencies_match(got_pos.sum(0), n, want_pos.sum(0), n, "inclusion")
    assert_frequencies_match(got_pos, n, want_pos, n, "position")
    # the first id of a sequence is the first draw: exactly log-uniform
    assert_frequencies_match(got_pos[0], n, np_log_uniform(range_max) * 1e12, 1e12, "first id")

    # (c) num_tries: mean, and the distribution of the number of extra draws
    se = np.sqrt(tries.var() / n + sim_tries.var() / n)
    assert abs(tries.mean() - sim_tries.mean()) < Z * se, (tries.mean(), sim_tries.mean(), se)
    bins = np.arange(num_sampled, num_sampled + 12)

    def hist(t):
        return np.bincount(np.minimum(t.astype(np.int64), bins[-1]) - num_sampled, minlength=len(bins))

    assert_frequencies_match(hist(tries), n, hist(sim_tries), n, "num_tries histogram")


def test_sampler_single_sample_is_log_uniform():
    # (d) one sample: one draw, distributed as the formula
    range_max, n = 50, 20000
    ids, tries = sample_many(2, n, 1, range_max)
    assert (tries == 1.0).all()
    p = np_log_uniform(range_max)
    got = np.bincount(ids[:, 0], minlength=range_max) / n
    se = np.sqrt(p * (1 - p) / n)
    assert (np.abs(got - p) < Z * se).all(), (got, p)


def test_sampler_all_ids():
    # num_sampled == range_max: a permutation, and many draws to find the rare ids
    ids, tries = sample_many(3, 50, 50, 50)
    assert (np.sort(ids, axis=1) == np.arange(50)).all()
    assert np.isfinite(tries).all() and tries.min() >= 50


def test_sampler_real_vocab_size():
    # bilm-tf's recipe: 8192 negatives from a 793,471-word vocabulary
    fn = jax.jit(softmax.sample_log_uniform_unique, static_argnums=(1, 2))
    ids, tries = fn(jax.random.PRNGKey(4), 8192, 793471)
    ids, tries = np.asarray(ids), float(tries)
    assert ids.shape == (8192,) and len(np.unique(ids)) == 8192
    assert ids.min() >= 0 and ids.max() < 793471
    assert tries == round(tries) and 8192 <= tries < 1e6


def test_sampler_rejects_too_many_samples():
    with pytest.raises(ValueError, match="num_sampled"):
        softmax.sample_log_uniform_unique(jax.random.PRNGKey(0), 51, 50)
    with pytest.raises(ValueError, match="num_sampled"):
        softmax.sample_log_uniform_unique(jax.random.PRNGKey(0), 0, 50)


# 3. expected counts


def test_expected_counts():
    p = np.concatenate([np_log_uniform(793471)[[0, 1, 10, 1000, 100000, 793470]], [0.5, 1e-8]])
    for num_tries in [1.0, 7.0, 15872.0, 1e6]:
        got = np.asarray(softmax.expected_counts(jnp.asarray(p, jnp.float32), jnp.float32(num_tries)))
        want = 1.0 - (1.0 - p) ** num_tries
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


def test_sampler_expected_counts_when_no_draw_repeated():
    """TensorFlow's range sampler reports p * num_sampled, not 1 - (1 - p) ** num_tries, when
    its num_sampled draws came out distinct (num_tries == num_sampled)."""
    ids = np.array([0, 5, 999])
    p = np_log_uniform(1000)[ids]
    got = np.asarray(softmax.sampler_expected_counts(jnp.asarray(ids), jnp.float32(3), 1000, 3))
    np.testing.assert_allclose(got, 3 * p, rtol=1e-6)
    got = np.asarray(softmax.sampler_expected_counts(jnp.asarray(ids), jnp.float32(4), 1000, 3))
    np.testing.assert_allclose(got, 1.0 - (1.0 - p) ** 4, rtol=1e-6)


# 4. the losses against NumPy float64


def np_sampled_softmax_loss(W, b, x, y, sampled, num_tries, range_max, remove_hits=True):
    W, b, x = (np.asarray(a, np.float64) for a in (W, b, x))
    p = np_log_uniform(range_max)
    # TensorFlow's expected counts: p * num_sampled when no draw repeated
    log_q = np.log(p * len(sampled) if num_tries == len(sampled) else 1.0 - (1.0 - p) ** num_tries)
    true = np.einsum("nd,nd->n", x, W[y]) + b[y] - log_q[y]
    neg = x @ W[sampled].T + b[sampled] - log_q[sampled]
    if remove_hits:
        neg = np.where(y[:, None] == sampled[None, :], -np.inf, neg)
    logits = np.concatenate([true[:, None], neg], axis=1)
    m = logits.max(1, keepdims=True)
    return np.log(np.exp(logits - m).sum(1)) + m[:, 0] - true


def loss_problem(seed=0, V=30, D=7, N=6):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(V, D)).astype(np.float32)
    b = rng.normal(size=V).astype(np.float32)
    x = rng.normal(size=(N, D)).astype(np.float32)
    return W, b, x


def test_sampled_softmax_loss_matches_numpy():
    V = 30
    W, b, x = loss_problem(V=V)
    y = np.array([0, 3, 17, 3, 29, 5], np.int32)
    sampled = np.array([3, 0, 8, 25, 11, 1, 14], np.int32)  # 3 and 0 are accidental hits
    num_tries = 11.0
    for remove, tries in [(True, num_tries), (False, num_tries), (True, float(len(sampled)))]:
        got = softmax.sampled_softmax_loss(softmax.SoftmaxTable(jnp.asarray(W), jnp.asarray(b)), jnp.asarray(x),
                                           jnp.asarray(y), softmax.Negatives(jnp.asarray(sampled), jnp.float32(tries)),
                                           V, remove_accidental_hits=remove, numerics=HIGHEST)
        want = np_sampled_softmax_loss(W, b, x, y, sampled, tries, V, remove_hits=remove)
        assert got.shape == (6,)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # the removal matters for examples with a hit, and only for them
    no_removal = np_sampled_softmax_loss(W, b, x, y, sampled, num_tries, V, remove_hits=False)
    with_removal = np_sampled_softmax_loss(W, b, x, y, sampled, num_tries, V, remove_hits=True)
    hit = np.isin(y, sampled)
    assert (no_removal[hit] > with_removal[hit] + 1e-3).all()
    np.testing.assert_array_equal(no_removal[~hit], with_removal[~hit])

    # jit, labels of shape (N, 1) as bilm-tf passes them, and finite gradients with hits
    fn = jax.jit(lambda W, x: softmax.sampled_softmax_loss(
        softmax.SoftmaxTable(W, b), x, y[:, None], softmax.Negatives(sampled, num_tries), V, numerics=HIGHEST).sum())
    np.testing.assert_allclose(float(fn(W, x)), with_removal.sum(), rtol=1e-5)
    gW, gx = jax.grad(fn, argnums=(0, 1))(jnp.asarray(W), jnp.asarray(x))
    assert np.isfinite(np.asarray(gW)).all() and np.isfinite(np.asarray(gx)).all()


def test_sampled_softmax_loss_on_the_touched_rows_only():
    """The loss from the rows a step touches (touched_rows, labels and samples as row positions,
    row_ids for the expected counts) equals NumPy's loss over the whole table."""
    V = 8 * 13  # ROW_UPDATE_MIN_RATIO times the 13 ids below: the smallest table that takes rows
    assert softmax.ROW_UPDATE_MIN_RATIO == 8
    W, b, x = loss_problem(seed=2, V=V)
    y = np.array([0, 3, 17, 3, 99, 5], np.int32)
    sampled = np.array([3, 0, 8, 25, 103, 1, 14], np.int32)
    rows, positions = softmax.touched_rows({"sampled": sampled, "labels": y}, V)
    # sorted distinct ids, then padding with V (past the table) to the 13 ids given
    want_rows = np.unique(np.concatenate([sampled, y]))
    np.testing.assert_array_equal(np.asarray(rows), np.concatenate([want_rows, np.full(13 - len(want_rows), V)]))
    for key, ids in [("sampled", sampled), ("labels", y)]:  # positions: where each id is in the rows
        np.testing.assert_array_equal(np.asarray(rows)[np.asarray(positions[key])], ids)
    take = lambda a: jnp.take(jnp.asarray(a), rows, axis=0, mode="fill", fill_value=0)
    got = softmax.sampled_softmax_loss(softmax.SoftmaxTable(take(W), take(b), rows), jnp.asarray(x), positions["labels"],
                                       softmax.Negatives(positions["sampled"], jnp.float32(11.0)), V, numerics=HIGHEST)
    want = np_sampled_softmax_loss(W, b, x, y, sampled, 11.0, V)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # a table less than 8x the ids: every row, as it is
    assert softmax.touched_rows({"sampled": sampled, "labels": y}, V - 1) is None


def test_full_softmax_loss_matches_numpy():
    W, b, x = loss_problem(seed=1)
    y = np.array([0, 3, 17, 3, 29, 5], np.int32)
    got = softmax.full_softmax_loss(softmax.SoftmaxTable(jnp.asarray(W), jnp.asarray(b)), jnp.asarray(x),
                                    jnp.asarray(y), numerics=HIGHEST)
    logits = x.astype(np.float64) @ W.astype(np.float64).T + b
    m = logits.max(1, keepdims=True)
    log_softmax = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    np.testing.assert_allclose(np.asarray(got), -log_softmax[np.arange(6), y], rtol=1e-5, atol=1e-6)


# 5. the sampled gradient, averaged over draws, approaches the full-softmax gradient

GRAD_V, GRAD_D, GRAD_N, GRAD_DRAWS = 20, 8, 16, 10000


@pytest.fixture(scope="module")
def grad_problem():
    rng = np.random.default_rng(0)
    W = (0.7 * rng.normal(size=(GRAD_V, GRAD_D))).astype(np.float32)
    b = (0.5 * rng.normal(size=GRAD_V)).astype(np.float32)
    x = rng.normal(size=(GRAD_N, GRAD_D)).astype(np.float32)
    y = rng.choice(GRAD_V, size=GRAD_N, p=np_log_uniform(GRAD_V)).astype(np.int32)
    # the full-softmax gradient of the mean loss, in float64 NumPy:
    # d/dlogits = softmax - onehot, divided by N
    logits = x.astype(np.float64) @ W.astype(np.float64).T + b
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    dlogits = (prob - np.eye(GRAD_V)[y]) / GRAD_N
    full = (dlogits @ W.astype(np.float64), dlogits.T @ x.astype(np.float64))
    return (W, b, x, y), full


def mean_sampled_grad(problem, num_sampled, seed, num_tries=None):
    """Average over GRAD_DRAWS sampler draws of d(mean sampled loss)/d(inputs, W).

    num_tries, if given, replaces the sampler's count (a huge value removes the log-q correction).
    """
    keys = jax.random.split(jax.random.PRNGKey(seed), GRAD_DRAWS)
    override = jnp.float32(np.nan if num_tries is None else num_tries)
    gx, gW = _sampled_grads(keys, override, *(jnp.asarray(a) for a in problem), num_sampled=num_sampled)
    return np.asarray(gx, np.float64).mean(0), np.asarray(gW, np.float64).mean(0)


@functools.partial(jax.jit, static_argnames="num_sampled")
def _sampled_grads(keys, override, W, b, x, y, num_sampled):
    def one(key):
        ids, tries = softmax.sample_log_uniform_unique(key, num_sampled, GRAD_V)
        tries = jnp.where(jnp.isnan(override), tries, override)
        loss = lambda x, W: softmax.sampled_softmax_loss(softmax.SoftmaxTable(W, b), x, y,
                                                         softmax.Negatives(ids, tries), GRAD_V, numerics=HIGHEST).mean()
        return jax.grad(loss, argnums=(0, 1))(x, W)

    return jax.vmap(one)(keys)


def relative_errors(estimate, full):
    return [np.linalg.norm(e - f) / np.linalg.norm(f) for e, f in zip(estimate, full)]


def test_sampled_gradient_approaches_full_gradient(grad_problem):
    problem, full = grad_problem
    # Sampled softmax is biased for few samples; the bias vanishes as num_sampled -> V (up to
    # the log-q correction, which stays < 1 even when every id is sampled). The Monte-Carlo
    # error of a 10000-draw mean is about 0.005 relative; over six setup seeds the relative
    # errors were 0.30-0.54 (num_sampled 4), 0.03-0.17 (16) and 0.01-0.05 (19).
    err4 = relative_errors(mean_sampled_grad(problem, 4, seed=10), full)
    err16 = relative_errors(mean_sampled_grad(problem, 16, seed=11), full)
    err19 = relative_errors(mean_sampled_grad(problem, 19, seed=12), full)
    for e4, e16, e19 in zip(err4, err16, err19):  # inputs, then W
        assert e19 < 0.1, (err4, err16, err19)
        assert e16 < 0.5 * e4, (err4, err16, err19)
        assert e19 < e16, (err4, err16, err19)
        assert e4 > 0.2, (err4, err16, err19)  # 4 of 20 is far from the full softmax


def test_log_q_correction_reduces_gradient_bias(grad_problem):
    # Without subtracting log(expected count) frequent negatives are over-weighted: with the
    # same draws, the corrected estimate is closer to the full gradient (margins 0.02-0.08 over
    # six setup seeds, against about 0.005 Monte-Carlo error).
    problem, full = grad_problem
    corrected = relative_errors(mean_sampled_grad(problem, 8, seed=13), full)
    uncorrected = relative_errors(mean_sampled_grad(problem, 8, seed=13, num_tries=1e9), full)
    for c, u in zip(corrected, uncorrected):
        assert c < u - 0.01, (corrected, uncorrected)
