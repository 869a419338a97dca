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

from elmojax.formats.checks import check_array, check_bool, check_int, check_mask_values, check_real

LAYER_NORM_EPSILON = 1e-12


def masked_layer_norm(x: jax.Array, mask: jax.Array, epsilon: float) -> jax.Array:
    """(x - mean) / sqrt(var + epsilon), the statistics over the positions where mask (x's shape
    less its last axis) is True: bilm-tf's layer norm (epsilon 1e-12), AllenNLP's (1e-13)."""
    m = mask[..., None].astype(x.dtype)
    n = jnp.sum(m) * x.shape[-1]
    mean = jnp.sum(x * m) / n
    variance = jnp.sum(((x * m - mean) * m) ** 2) / n
    return (x - mean) * jax.lax.rsqrt(variance + epsilon)


def weight_layers(lm_embeddings: jax.Array, mask: jax.Array, weights: jax.Array, gamma: jax.Array,
                  l2_coef: Optional[float] = None, use_top_only: bool = False,
                  do_layer_norm: bool = False) -> tuple[jax.Array, jax.Array]:
    """Mixes lm_embeddings (batch, n_layers, time, dim) into (batch, time, dim).

    weights: (n_layers,) unnormalized layer weights W; gamma: a scalar or (1,) scale.
    Returns (weighted embeddings, regularization term). `use_top_only` takes the top layer
    (times gamma) with no regularization.
    """
    lm_embeddings = check_array("lm_embeddings", lm_embeddings, 4, "float", " (batch, n_layers, time, dim)")
    batch, n_layers, time = lm_embeddings.shape[:3]
    mask = check_array("mask", mask, 2, "mask", " (batch, time)")
    if tuple(mask.shape) != (batch, time):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; lm_embeddings {tuple(lm_embeddings.shape)} needs "
                         f"(batch, time) = {(batch, time)}")
    check_mask_values("mask", mask)
    use_top_only, do_layer_norm = check_bool("use_top_only", use_top_only), check_bool("do_layer_norm", do_layer_norm)
    if l2_coef is not None:
        l2_coef = check_real("l2_coef", l2_coef, 0.0)
    gamma = check_array("gamma", gamma, kind="real")
    if gamma.size != 1:
        raise ValueError(f"gamma must be a scalar or of shape (1,), got shape {tuple(gamma.shape)}")
    gamma = jnp.reshape(jnp.asarray(gamma, lm_embeddings.dtype), ())
    if use_top_only:
        return gamma * lm_embeddings[:, -1], jnp.zeros((), lm_embeddings.dtype)
    if weights is None:
        raise ValueError("weights must be given (one per layer) unless use_top_only")
    weights = check_array("weights", weights, kind="real")
    if tuple(weights.shape) != (n_layers,):
        raise ValueError(f"weights must have shape ({n_layers},), one per layer of lm_embeddings "
                         f"{tuple(lm_embeddings.shape)}; got {tuple(weights.shape)}")
    weights = jnp.asarray(weights, lm_embeddings.dtype)
    normed = jax.nn.softmax(weights + 1.0 / n_layers)
    mask = jnp.asarray(mask)
    mixed = sum(normed[k] * (masked_layer_norm(lm_embeddings[:, k], mask, LAYER_NORM_EPSILON) if do_layer_norm
                             else lm_embeddings[:, k]) for k in range(n_layers))
    regularization = l2_coef * jnp.sum(weights ** 2) if l2_coef is not None else jnp.zeros((), weights.dtype)
    return gamma * mixed, regularization


class ScalarMix(nn.Module):
    """`weight_layers` as a Flax module for downstream models: params `weights` (zeros) and `gamma` (ones)."""

    n_layers: int
    l2_coef: Optional[float] = None
    use_top_only: bool = False
    do_layer_norm: bool = False

    def __post_init__(self):
        check_int("n_layers", self.n_layers, 1)
        if self.l2_coef is not None:
            check_real("l2_coef", self.l2_coef, 0.0)
        check_bool("use_top_only", self.use_top_only)
        check_bool("do_layer_norm", self.do_layer_norm)
        super().__post_init__()

    @nn.compact
    def __call__(self, lm_embeddings: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        lm_embeddings = check_array("lm_embeddings", lm_embeddings, 4, "float", " (batch, n_layers, time, dim)")
        if not self.use_top_only and lm_embeddings.shape[1] != self.n_layers:
            raise ValueError(f"lm_embeddings {tuple(lm_embeddings.shape)} has {lm_embeddings.shape[1]} layers; "
                             f"this ScalarMix mixes n_layers={self.n_layers}")
        gamma = self.param("gamma", nn.initializers.ones, (1,))
        weights = None if self.use_top_only else self.param("weights", nn.initializers.zeros, (self.n_layers,))
        return weight_layers(lm_embeddings, mask, weights, gamma, self.l2_coef, self.use_top_only,
                             self.do_layer_norm)
