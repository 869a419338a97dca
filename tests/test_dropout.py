"""elmojax.model.dropout against jax.random and flax's nn.Dropout: the same bits, masks and rng stream."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elmojax.model.dropout import Dropout, dropout, random_bits


@pytest.mark.parametrize("shape", [(5,), (7, 3), (32, 20, 64), (2, 3, 4, 5)])
@pytest.mark.parametrize("typed", [False, True])
def test_random_bits_are_jax_random_bits(shape, typed):
    key = jax.random.key(11) if typed else jax.random.PRNGKey(11)
    key = jax.random.fold_in(key, sum(shape))
    expected = jax.random.bits(key, shape, jnp.uint32)
    got = jax.jit(random_bits, static_argnums=1)(key, shape)
    assert got.dtype == jnp.uint32 and got.shape == shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_is_a_bernoulli_mask(rate):
    key = jax.random.PRNGKey(3)
    x = jax.random.normal(jax.random.PRNGKey(4), (64, 50))
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    np.testing.assert_array_equal(np.asarray(dropout(x, rate, key)), np.asarray(jnp.where(keep, x / (1.0 - rate), 0.0)))
    # and, independently of jax.random, the kept fraction is near 1 - rate (3200 draws)
    kept = np.mean(np.asarray(dropout(jnp.ones((64, 50)), rate, key)) != 0)
    assert abs(kept - (1.0 - rate)) < 4 * np.sqrt(rate * (1.0 - rate) / 3200)


def test_dropout_module_is_flax_dropout():
    """Inside a parent module: the same rng stream (name Dropout_0), the same outputs."""

    class Parent(nn.Module):
        use_flax: bool

        @nn.compact
        def __call__(self, x, deterministic):
            layer = nn.Dropout(0.3) if self.use_flax else Dropout(0.3)
            return layer(x, deterministic=deterministic) + layer(2 * x, deterministic=deterministic)

    x = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 12))
    rngs = {"dropout": jax.random.PRNGKey(9)}
    ours = Parent(False).apply({}, x, False, rngs=rngs)
    flax_out = Parent(True).apply({}, x, False, rngs=rngs)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(flax_out))
    np.testing.assert_array_equal(np.asarray(Parent(False).apply({}, x, True)), np.asarray(3 * x))
    assert not np.any(np.asarray(Dropout(1.0).apply({}, x, False)))
