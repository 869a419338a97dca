"""ELMo's learned scalar mix of the biLM layers (bilm-tf's `weight_layers`).

    ELMo = gamma * sum_k softmax(W + 1/L)_k * f(layer_k),   regularization = l2_coef * sum(W ** 2)

with f the identity, or layer normalization whose mean and variance are taken over the
non-padded positions of the whole batch (epsilon 1e-12), as in bilm-tf.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYER_NORM_EPSILON = 1e-12


def _layer_norm(x: jax.Array, mask: jax.Array) -> jax.Array:
    """(x - mean) / sqrt(var + eps), the statistics over the positions where mask is True."""
    m = mask[..., None].astype(x.dtype)
    n = jnp.sum(m) * x.shape[-1]
    mean = jnp.sum(x * m) / n
    variance = jnp.sum(((x * m - mean) * m) ** 2) / n
    return (x - mean) * jax.lax.rsqrt(variance + LAYER_NORM_EPSILON)


def weight_layers(lm_embeddings: jax.Array, mask: jax.Array, weights: jax.Array, gamma: jax.Array,
                  l2_coef: Optional[float] = None, use_top_only: bool = False,
                  do_layer_norm: bool = False) -> tuple[jax.Array, jax.Array]:
    """Mixes lm_embeddings (batch, n_layers, time, dim) into (batch, time, dim).

    weights: (n_layers,) unnormalized layer weights W; gamma: a scalar or (1,) scale.
    Returns (weighted embeddings, regularization term). `use_top_only` takes the top layer
    (times gamma) with no regularization.
    """
    lm_embeddings = jnp.asarray(lm_embeddings)
    gamma = jnp.reshape(jnp.asarray(gamma, lm_embeddings.dtype), ())
    if use_top_only:
        return gamma * lm_embeddings[:, -1], jnp.zeros((), lm_embeddings.dtype)
    n_layers = lm_embeddings.shape[1]
    weights = jnp.asarray(weights, lm_embeddings.dtype)
    if weights.shape != (n_layers,):
        raise ValueError(f"weights must have shape ({n_layers},), one per layer; got {weights.shape}")
    normed = jax.nn.softmax(weights + 1.0 / n_layers)
    mask = jnp.asarray(mask)
    mixed = sum(normed[k] * (_layer_norm(lm_embeddings[:, k], mask) if do_layer_norm else lm_embeddings[:, k])
                for k in range(n_layers))
    regularization = l2_coef * jnp.sum(weights ** 2) if l2_coef is not None else jnp.zeros((), weights.dtype)
    return gamma * mixed, regularization


class ScalarMix(nn.Module):
    """`weight_layers` as a Flax module for downstream models: params `weights` (zeros) and `gamma` (ones)."""

    n_layers: int
    l2_coef: Optional[float] = None
    use_top_only: bool = False
    do_layer_norm: bool = False

    @nn.compact
    def __call__(self, lm_embeddings: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        gamma = self.param("gamma", nn.initializers.ones, (1,))
        weights = None if self.use_top_only else self.param("weights", nn.initializers.zeros, (self.n_layers,))
        return weight_layers(lm_embeddings, mask, weights, gamma, self.l2_coef, self.use_top_only,
                             self.do_layer_norm)
