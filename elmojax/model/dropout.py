"""Dropout, with the same masks as flax's nn.Dropout, from random bits computed faster on CPUs.

jax.random's threefry hash is lowered for CPUs as a loop over the whole array, several passes
over memory per dropout mask; `random_bits` computes the same bits as jax.random.bits
(threefry, JAX's default partitionable counters) as one elementwise expression instead, so the
masks, and the training runs, do not change (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 block cipher (20 rounds), as jax.random uses it."""
    keys = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + keys[0], x2 + keys[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))) ^ x1
        x1, x2 = x1 + keys[(i + 1) % 3], x2 + keys[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """jax.random.bits(key, shape) (uint32) for a threefry key, raw (uint32[2]) or typed."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if int(np.prod(shape)) >= 2**32:
        raise ValueError(f"random_bits counts elements in 32 bits; {shape} has too many")
    # each element's row-major index, from iotas that sharded arrays can partition
    strides = np.cumprod((tuple(shape[1:]) + (1,))[::-1])[::-1]
    index = sum(lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(s) for d, s in enumerate(strides))
    bits_1, bits_2 = _threefry2x32(key[0], key[1], jnp.zeros(shape, jnp.uint32), index)
    return bits_1 ^ bits_2


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Zeroes each element with probability `rate` and scales the rest by 1 / (1 - rate): the
    values of jnp.where(jax.random.bernoulli(key, 1 - rate, x.shape), x / (1 - rate), 0)."""
    if rate == 0.0:
        return x
    keep_prob = 1.0 - rate
    if keep_prob == 0.0:
        return jnp.zeros_like(x)
    # jax.random.uniform's float in [0, 1) from the top 23 bits
    mantissa = (random_bits(key, x.shape) >> np.uint32(9)) | np.uint32(0x3F800000)
    uniform = lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0
    return jnp.where(uniform < keep_prob, x / keep_prob, 0.0)


class Dropout(nn.Module):
    """nn.Dropout's drop-in: the same 'dropout' rng stream and the same masks."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:  # (as nn.Dropout: no rng drawn)
            return jnp.zeros_like(x)
        return dropout(x, self.rate, self.make_rng("dropout"))
