"""The pure training math: the TrainState, the losses, and the train and eval steps.

A step embeds the forward stream and the reversed stream and runs each direction's LSTM stack
from the carried state with the BiLM methods inference calls too (`BiLM.embed`,
`BiLM.contextualize`), and scores next tokens with a softmax shared by both directions (sampled for
training, full for evaluation), as bilm-tf's training.py does. Nothing here knows about devices:
elmojax.train.trainer jits these functions over a mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from elmojax.train import config as config_lib
from elmojax.model import numerics, softmax
from elmojax.model.bilm import BiLM, lookup_tokens
from elmojax.train.batch import Batch, DIRECTIONS


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any          # {'bilm': BiLM params, 'softmax': {'W', 'b'} (just 'b' when shared)}
    opt_state: Any
    lstm_state: Any      # the LSTM carry, fed from one batch to the next
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """What the loss needs to know; static under jit."""
    bidirectional: bool
    use_character_inputs: bool
    share_embedding_softmax: bool
    dropout: float
    unroll_steps: int
    n_negative_samples_batch: int
    n_vocab: int
    sample_softmax: bool = True  # False: train with the full softmax (bilm-tf's sample_softmax option)
    state_reset_probability: float = 0.0  # each batch row's LSTM carry is zeroed with this probability
    precision: Any = None
    compute_dtype: Any = None  # see elmojax.model.numerics


def loss_settings(config: ml_collections.ConfigDict, n_vocab: int) -> LossSettings:
    precision = config.train.matmul_precision
    return LossSettings(
        bidirectional=bool(config.model.bidirectional),
        use_character_inputs=config_lib.use_character_inputs(config),
        share_embedding_softmax=bool(config.model.share_embedding_softmax),
        dropout=float(config.train.dropout),
        unroll_steps=int(config.train.unroll_steps),
        n_negative_samples_batch=int(config.train.n_negative_samples_batch),
        n_vocab=n_vocab,
        sample_softmax=bool(config.train.get("sample_softmax", True)),
        state_reset_probability=float(config.train.get("state_reset_probability", 0.0)),
        precision=None if precision == "default" else precision,
        compute_dtype=numerics.compute_dtype(config.train.get("compute_dtype", "float32")),
    )


def directions(settings: LossSettings) -> tuple[str, ...]:
    names = tuple(direction for direction, _ in DIRECTIONS)
    return names if settings.bidirectional else names[:1]


def direction_losses(params, batch: Batch, lstm_state: dict, rng: jax.Array, *, model: BiLM,
                     settings: LossSettings, training: bool, samples: Optional[dict] = None,
                     rows: Optional[tuple] = None):
    """Per direction (sum of token losses, number of tokens), and the new LSTM carry.

    Training applies dropout and scores with the sampled softmax on `samples` (see
    draw_samples), or with the full softmax where settings.sample_softmax is False; evaluation
    (training False) scores with the full softmax, without dropout. `rows` (from
    softmax.touched_rows), when given, says that the vocabulary tables (softmax, word
    embedding) hold only those rows, and where the step's ids are among them.
    """
    row_ids, positions = rows if rows is not None else (None, None)
    bilm_params = params["bilm"]
    if settings.share_embedding_softmax:
        softmax_w = bilm_params["embedder"]["embedding"]
    else:
        softmax_w = params["softmax"]["W"]
    softmax_b = params["softmax"]["b"]
    if settings.use_character_inputs:
        # the char CNN runs once per distinct token of the batch (both streams), see batch.to_device
        token_table = model.apply({"params": bilm_params}, batch.distinct_char_ids, batch.distinct_tail_ids,
                                  method=BiLM.embed)
    inputs, masks = {}, {}
    for direction in directions(settings):
        stream = batch.stream(direction)
        if settings.use_character_inputs:
            inputs[direction] = jnp.take(token_table, stream.token_index, axis=0)
        else:  # the embedder's lookup, on its table as the step has it (maybe only `rows`)
            token_ids = stream.token_ids
            if positions is not None:  # ids + 1 (0: padding) -> their rows' positions + 1
                token_ids = jnp.where(token_ids > 0, positions[direction, "token_ids"] + 1, 0)
            inputs[direction] = lookup_tokens(bilm_params["embedder"]["embedding"], token_ids)
        masks[direction] = stream.weights > 0
    outputs, new_state = model.apply({"params": bilm_params}, inputs, masks, lstm_state, not training, training,
                                     rngs={"dropout": rng}, method=BiLM.contextualize)
    sums = {}
    for direction in directions(settings):
        stream = batch.stream(direction)
        top = outputs[direction][-1]
        top = top.reshape(-1, top.shape[-1])
        targets = stream.next_token_id.reshape(-1)
        if training and settings.sample_softmax:
            sampled, num_tries = samples[direction]
            if positions is not None:  # ids -> their rows' positions
                targets, sampled = positions[direction, "next_token_id"].reshape(-1), positions[direction, "sampled"]
            losses = softmax.sampled_softmax_loss(softmax_w, softmax_b, top, targets, sampled, num_tries,
                                                  settings.n_vocab, row_ids=row_ids, precision=settings.precision,
                                                  compute_dtype=settings.compute_dtype)
        else:
            losses = softmax.full_softmax_loss(softmax_w, softmax_b, top, targets,
                                               compute_dtype=settings.compute_dtype)
        token_weights = stream.weights.reshape(-1)
        sums[direction] = (jnp.sum(losses * token_weights), jnp.sum(token_weights))
    return sums, new_state


def draw_samples(rng: jax.Array, settings: LossSettings) -> dict:
    """Each direction's sampled softmax negatives for a step: (sampled ids, number of draws)."""
    keys = jax.random.split(rng, len(directions(settings)))
    return {direction: softmax.sample_log_uniform_unique(key, settings.n_negative_samples_batch, settings.n_vocab)
            for direction, key in zip(directions(settings), keys)}


def _is_vocab_table(path) -> bool:
    """Whether a leaf is a vocabulary-sized table (softmax W or b, a word-input embedding), in
    params or in an optimizer state's params-shaped parts."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return keys[-2:-1] == ["softmax"] or keys[-2:] == ["embedder", "embedding"]


def _take_rows(tree, rows: jax.Array):
    """tree with its vocabulary tables cut to `rows` (padding rows, past the table, read as zeros)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.take(x, rows, axis=0, mode="fill", fill_value=0) if _is_vocab_table(path) else x, tree)


def _put_rows(tree, part, rows: jax.Array):
    """`part` (a tree from _take_rows) with its rows written back into tree's whole tables."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x, y: x.at[rows].set(y, mode="drop") if _is_vocab_table(path) else y, tree, part)


def training_loss(params, batch: Batch, lstm_state: dict, rng: jax.Array, samples: Optional[dict], *,
                  model: BiLM, settings: LossSettings, rows: Optional[tuple] = None):
    """What a train step differentiates: bilm-tf's loss (the mean of the directions' mean token
    losses) times unroll_steps, as bilm-tf scales it before its gradients (a per-window sum, in
    effect); with the loss itself and the new LSTM carry as aux."""
    sums, new_lstm_state = direction_losses(params, batch, lstm_state, rng, model=model, settings=settings,
                                            training=True, samples=samples, rows=rows)
    loss = sum(total / count for total, count in sums.values()) / len(sums)
    return loss * settings.unroll_steps, (loss, new_lstm_state)


def train_step(state: TrainState, batch: Batch, *, model: BiLM, tx: optax.GradientTransformation,
               settings: LossSettings, samples: Optional[dict] = None) -> tuple[TrainState, dict]:
    """One Adagrad step on `training_loss`. `samples` stands for the step's own draw of the
    sampled softmax's negatives (draw_samples), e.g. to replay another run's.

    The sampled softmax reads a few thousand rows of a vocabulary-sized table (793k rows for
    the 1B Word Benchmark), and its gradient is zero elsewhere, where Adagrad changes nothing;
    so does a word-input embedding. So the step takes the rows it reads (sampled, target and
    input ids) out of these tables and Adagrad's accumulators, differentiates and updates
    those, and writes them back: the same numbers as a dense update (zero rows add nothing to
    the global norm either), without passes over the tables. (The full softmax reads them all.)
    """
    rng, loss_rng, sample_rng = jax.random.split(state.rng, 3)
    rows = None  # (row ids, each id's position), or None: all rows
    if settings.sample_softmax:
        if samples is None:
            samples = draw_samples(sample_rng, settings)
        ids = {}
        for direction in directions(settings):
            stream = batch.stream(direction)
            ids[direction, "sampled"] = samples[direction][0]
            ids[direction, "next_token_id"] = stream.next_token_id
            if not settings.use_character_inputs:  # input ids are ids + 1, with 0 (padding) for none: n_vocab
                ids[direction, "token_ids"] = jnp.where(stream.token_ids > 0, stream.token_ids - 1, settings.n_vocab)
        rows = softmax.touched_rows(ids, settings.n_vocab)
    params, opt_state = state.params, state.opt_state
    if rows is not None:
        row_ids = rows[0]
        params, opt_state = _take_rows(params, row_ids), _take_rows(opt_state, row_ids)

    lstm_state = state.lstm_state
    if settings.state_reset_probability > 0:
        lstm_state = reset_rows(lstm_state, jax.random.fold_in(sample_rng, 1), settings.state_reset_probability)
    grads, (loss, new_lstm_state) = jax.grad(training_loss, has_aux=True)(
        params, batch, lstm_state, loss_rng, samples, model=model, settings=settings, rows=rows)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if rows is not None:
        params, opt_state = _put_rows(state.params, params, row_ids), _put_rows(state.opt_state, opt_state, row_ids)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, lstm_state=new_lstm_state,
                              rng=rng)
    return new_state, {"loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads)}


def reset_rows(lstm_state: dict, rng: jax.Array, probability: float) -> dict:
    """The carry with each batch row's state (every direction and layer) zeroed with `probability`."""
    batch = jax.tree.leaves(lstm_state)[0].shape[0]
    keep = jax.random.uniform(rng, (batch, 1)) >= probability
    return jax.tree.map(lambda x: jnp.where(keep, x, 0.0), lstm_state)


def eval_step(params, lstm_state: dict, batch: Batch, *, model: BiLM, settings: LossSettings):
    sums, new_lstm_state = direction_losses(params, batch, lstm_state, jax.random.PRNGKey(0), model=model,
                                            settings=settings, training=False)
    return new_lstm_state, sums


INITIAL_ACCUMULATOR = 1.0  # bilm-tf's Adagrad (initial_accumulator_value)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    # TensorFlow's Adagrad: accumulator starts at 1.0, no epsilon.
    return optax.chain(
        optax.clip_by_global_norm(config.train.all_clip_norm_val),
        optax.adagrad(config.train.learning_rate, initial_accumulator_value=INITIAL_ACCUMULATOR, eps=0.0),
    )


def with_accumulators(opt_state, accumulators):
    """make_optimizer's state with Adagrad's accumulators (a params-shaped tree) replaced."""
    clip_state, (rss_state, *rest) = opt_state
    return clip_state, (rss_state._replace(sum_of_squares=accumulators), *rest)
