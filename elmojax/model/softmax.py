"""Softmax losses for training the biLM: sampled softmax (as bilm-tf trains) and full softmax.

bilm-tf trains with TensorFlow's sampled softmax and its defaults: one true class per example,
negatives from the log-uniform ("Zipfian") candidate sampler with unique=True, logits corrected
by subtracting log(expected count), and accidental hits (a negative equal to the example's
label) removed. One set of negatives is shared by the whole batch.

Vocabulary ids are frequency-sorted (frequent words have small ids), so the log-uniform
distribution over ids approximates unigram frequencies:

    P(id) = (log(id + 2) - log(id + 1)) / log(range_max + 1),    id in [0, range_max).

The unique sampler draws from P with replacement until it has `num_sampled` distinct ids and
reports the number of draws `num_tries`; the expected count of an id is then the probability
that it appears in that many draws, 1 - (1 - P(id)) ** num_tries.

Everything here is a pure JAX function with static shapes (jit/vmap friendly); randomness
comes from explicit PRNG keys.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from elmojax.model.numerics import Numerics

Array = jax.Array

# Value given to the logits of removed accidental hits: exp(it - anything finite) is 0.
_REMOVED_LOGIT = float(jnp.finfo(jnp.float32).min)


def log_uniform_probs(ids: Array, range_max: int) -> Array:
    """P(id) = (log(id + 2) - log(id + 1)) / log(range_max + 1) for ids in [0, range_max).

    Computed as log1p(1 / (id + 1)), which keeps full relative precision for large ids where
    the difference of two nearby logs would cancel.
    """
    ids = jnp.asarray(ids)
    x = ids.astype(jnp.float32) + 1.0
    return jnp.log1p(1.0 / x) / jnp.log(jnp.float32(range_max) + 1.0)


def _geometric_failures(key: Array, success_prob: Array) -> Array:
    """Number of failures before the first success of independent Bernoulli(success_prob) trials.

    Inverse-CDF sampling: floor(log(U) / log(1 - q)) with U uniform in (0, 1]. q = 1 gives 0.
    Written out (rather than jax.random.geometric) so that q = 1 is handled exactly.
    """
    u = 1.0 - jax.random.uniform(key, success_prob.shape, jnp.float32)  # in (0, 1]
    q = jnp.clip(success_prob, 0.0, 1.0)
    log_fail = jnp.log1p(-q)  # -inf when q == 1, and log(u) / -inf == 0
    return jnp.floor(jnp.log(u) / log_fail)


def sample_log_uniform_unique(key: Array, num_sampled: int, range_max: int) -> Negatives:
    """Draw `num_sampled` distinct ids as TF's unique log-uniform candidate sampler does.

    TF draws ids with replacement from log_uniform_probs until it has `num_sampled` distinct
    ones, returns them in order of first appearance, and reports the number of draws. The same
    joint distribution with static shapes:

    * The ordered distinct ids are a sequential sample without replacement proportional to P
      (each new id is distributed as P restricted to the ids not yet seen), which is what
      Gumbel-top-k gives: the top `num_sampled` of log P + Gumbel noise, in decreasing order.
      This costs O(range_max) memory and never O(range_max * num_sampled).
    * Given that order, draws are i.i.d., so while j distinct ids have been seen each draw is
      new with probability r_j = 1 - (mass of the first j ids), independently of which new id
      it turns out to be. The repeats before the (j+1)-th new id are geometric(r_j) failures,
      and num_tries = num_sampled + their sum.

    r_j is summed from positive terms (mass of never-sampled ids + mass of sampled ids at
    positions >= j), not as 1 - cumsum, so it stays accurate when it is small.

    Args:
      key: PRNG key.
      num_sampled: number of distinct ids (static Python int, 1 <= num_sampled <= range_max).
      range_max: vocabulary size (static Python int).

    Returns:
      sampled_ids: int32 (num_sampled,), distinct, in order of first appearance.
      num_tries: float32 scalar, total number of draws (an integer >= num_sampled).
    """
    num_sampled = int(num_sampled)
    range_max = int(range_max)
    if range_max < 1:
        raise ValueError(f"range_max must be >= 1, got {range_max}")
    if not 1 <= num_sampled <= range_max:
        raise ValueError(
            f"num_sampled must be in [1, range_max={range_max}] (the unique sampler needs that "
            f"many distinct ids), got {num_sampled}")

    key_order, key_tries = jax.random.split(key)
    all_ids = jnp.arange(range_max, dtype=jnp.int32)
    probs = log_uniform_probs(all_ids, range_max)
    scores = jnp.log(probs) + jax.random.gumbel(key_order, (range_max,), jnp.float32)
    _, sampled_ids = lax.top_k(scores, num_sampled)
    sampled_ids = sampled_ids.astype(jnp.int32)

    # remaining[j] = mass of ids not among the first j sampled ones.
    sampled_probs = probs[sampled_ids]
    was_sampled = jnp.zeros((range_max,), jnp.bool_).at[sampled_ids].set(True)
    never_sampled_mass = jnp.sum(jnp.where(was_sampled, 0.0, probs))
    suffix_mass = jnp.cumsum(sampled_probs[::-1])[::-1]  # sum of sampled_probs[j:]
    remaining = never_sampled_mass + suffix_mass
    # The first draw is always new (remaining[0] is 1 up to rounding).
    remaining = remaining.at[0].set(1.0)

    repeats = _geometric_failures(key_tries, remaining)
    num_tries = jnp.float32(num_sampled) + jnp.sum(repeats)
    return Negatives(sampled_ids, num_tries)


def expected_counts(probs: Array, num_tries: Array) -> Array:
    """TF's expected count for the unique sampler: P(id drawn at least once in num_tries draws).

    1 - (1 - p) ** num_tries, computed as -expm1(num_tries * log1p(-p)) to stay accurate for
    small p.
    """
    probs = jnp.asarray(probs)
    return -jnp.expm1(jnp.asarray(num_tries, probs.dtype) * jnp.log1p(-probs))


def sampler_expected_counts(ids: Array, num_tries: Array, range_max: int, num_sampled: int) -> Array:
    """The expected counts TF's unique log-uniform sampler reports for ids, after `num_tries`
    draws for `num_sampled` distinct ids: expected_counts, but p * num_sampled when no draw was
    repeated (num_tries == num_sampled), as TensorFlow's range sampler computes it then."""
    probs = log_uniform_probs(ids, range_max)
    num_tries = jnp.asarray(num_tries, probs.dtype)
    return jnp.where(num_tries == num_sampled, probs * num_sampled, expected_counts(probs, num_tries))


def _log_expected_counts(ids: Array, num_tries: Array, range_max: int, num_sampled: int) -> Array:
    """log(expected count) of ids under the log-uniform unique sampler: the logit correction."""
    return jnp.log(sampler_expected_counts(ids, num_tries, range_max, num_sampled))


class SoftmaxTable(NamedTuple):
    """A softmax's weights (V, D) and biases (V,); `row_ids`, when they hold only some rows of the
    vocabulary's softmax (see `touched_rows`), the vocabulary id of each."""
    weights: Array
    biases: Array
    row_ids: Optional[Array] = None

    def logits(self, inputs: Array, ids: Optional[Array], subscripts: str, numerics: Numerics) -> Array:
        """inputs @ W[ids].T + b[ids] (every row for ids None), in float32 or wider."""
        weights, biases = (self.weights, self.biases) if ids is None else (self.weights[ids], self.biases[ids])
        out_dtype = jnp.promote_types(jnp.result_type(inputs, self.weights), jnp.float32)
        return numerics.einsum(subscripts, inputs, weights).astype(out_dtype) + biases.astype(out_dtype)


class Negatives(NamedTuple):
    """A sampled softmax's shared negatives: distinct ids (S,), and the number of draws the
    sampler took for them (a float32 scalar, for the expected counts)."""
    ids: Array
    num_tries: Array


def _table(weights, biases, row_ids=None) -> SoftmaxTable:
    return SoftmaxTable(jnp.asarray(weights), jnp.asarray(biases), row_ids)


def sampled_softmax_loss(table: SoftmaxTable, inputs: Array, labels: Array, negatives: Negatives, range_max: int, *,
                         remove_accidental_hits: bool = True, numerics: Numerics = Numerics()) -> Array:
    """Per-example sampled softmax loss, as tf.nn.sampled_softmax_loss with bilm-tf's settings.

    For each example the logits are those of its true class and of the shared sampled classes,
    inputs @ W[ids].T + b[ids], each minus log(expected count of that id). Sampled entries equal
    to the example's label are removed (their logit set to a huge negative number) when
    remove_accidental_hits; the loss is the softmax cross-entropy with the true class at index 0.

    Args:
      table: the softmax; with row_ids, labels and the negatives' ids index its rows.
      inputs: (N, D) hidden states.
      labels: (N,) int true class ids ((N, 1) is accepted too).
      negatives: the shared sampled ids, e.g. from sample_log_uniform_unique.
      range_max: size of the sampler's range (static).
      remove_accidental_hits: drop sampled entries equal to the label.
      numerics: the products' precision and operand dtype.

    Returns:
      (N,) losses in float32 (or wider, if the inputs are).
    """
    table, inputs = _table(*table), jnp.asarray(inputs)
    n = inputs.shape[0]
    labels = jnp.reshape(labels, (n,)).astype(jnp.int32)
    sampled_ids = jnp.asarray(negatives.ids).astype(jnp.int32)
    true_logits = table.logits(inputs, labels, "nd,nd->n", numerics)
    sampled_logits = table.logits(inputs, sampled_ids, "nd,sd->ns", numerics)
    out_dtype = true_logits.dtype

    row_ids = table.row_ids
    label_ids, sampled_vocab_ids = (labels, sampled_ids) if row_ids is None else (row_ids[labels], row_ids[sampled_ids])
    num_sampled, num_tries = sampled_ids.shape[0], negatives.num_tries
    true_logits = true_logits - _log_expected_counts(label_ids, num_tries, range_max, num_sampled).astype(out_dtype)
    sampled_log_q = _log_expected_counts(sampled_vocab_ids, num_tries, range_max, num_sampled).astype(out_dtype)
    sampled_logits = sampled_logits - sampled_log_q

    if remove_accidental_hits:
        hits = labels[:, None] == sampled_ids[None, :]
        sampled_logits = jnp.where(hits, jnp.asarray(_REMOVED_LOGIT, out_dtype), sampled_logits)

    logits = jnp.concatenate([true_logits[:, None], sampled_logits], axis=1)
    return jax.nn.logsumexp(logits, axis=1) - true_logits


# The row update (see touched_rows) pays only where the vocabulary tables are much larger than
# the rows a step reads (benchmarks/RESULTS.md).
ROW_UPDATE_MIN_RATIO = 8


def touched_rows(ids, range_max: int) -> Optional[tuple[Array, Any]]:
    """The rows of the vocabulary tables a sampled-softmax step reads, and so the only ones its
    gradient and an Adagrad update change: the distinct ids among the arrays of `ids` (a pytree
    of a step's labels, sampled ids and, for word inputs, input ids; range_max, past the
    vocabulary, stands for none), sorted and padded with range_max to their total number. With
    them, each array's ids as positions in those rows (a pytree of the same structure and shapes).

    None (every row, as it is) when the vocabulary is less than ROW_UPDATE_MIN_RATIO times the
    number of ids."""
    leaves, structure = jax.tree.flatten(ids)
    arrays = [jnp.asarray(a, jnp.int32) for a in leaves]
    flat = jnp.concatenate([a.ravel() for a in arrays])
    if range_max < ROW_UPDATE_MIN_RATIO * flat.size:
        return None
    # the inverse gives every id's position directly (no search, which is a loop on GPUs)
    rows, inverse = jnp.unique(flat, size=flat.size, fill_value=range_max, return_inverse=True)
    parts = jnp.split(inverse.ravel(), np.cumsum([a.size for a in arrays])[:-1])
    return rows, jax.tree.unflatten(structure, [part.reshape(a.shape) for part, a in zip(parts, arrays)])


def full_softmax_loss(table: SoftmaxTable, inputs: Array, labels: Array, *, numerics: Numerics = Numerics()) -> Array:
    """Per-example exact cross-entropy over all V classes (evaluation / perplexity), with the
    products' `numerics`.

    Materializes the (N, V) logits, so batch it for very large vocabularies.
    """
    table, inputs = _table(*table), jnp.asarray(inputs)
    if table.row_ids is not None:
        raise ValueError("the full softmax needs the whole table, not some of its rows")
    n = inputs.shape[0]
    labels = jnp.reshape(labels, (n,)).astype(jnp.int32)
    logits = table.logits(inputs, None, "nd,vd->nv", numerics)
    true_logits = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - true_logits
