"""The pure training math: the TrainState, the losses, and the train and eval steps.

A step embeds the forward stream and the reversed stream and runs each direction's LSTM stack
from the carried state with the BiLM methods inference calls too (`BiLM.embed`,
`BiLM.contextualize`), and scores next tokens with a softmax shared by both directions (sampled for
training, full for evaluation), as bilm-tf's training.py does. Nothing here knows about devices:
elmojax.train.trainer jits these functions over a mesh.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from elmojax.formats.directions import directions as directions_of
from elmojax.model import softmax
from elmojax.model.bilm import BiLM, lookup_tokens, zero_state
from elmojax.train.batch import Batch
from elmojax.train.config import OptimizerSettings, StepSettings


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any          # {'bilm': BiLM params, 'softmax': {'W', 'b'} (just 'b' when shared)}
    opt_state: Any
    lstm_state: Any      # the LSTM carry, fed from one batch to the next
    rng: jax.Array


class StreamIds(NamedTuple):
    """The vocabulary ids of one direction that a sampled-softmax step reads: its negatives, its
    targets and, for word inputs, its input ids (n_vocab for padding); or, from touched_rows,
    where each lies among the rows the step reads."""
    sampled: jax.Array
    next_token_id: jax.Array
    token_ids: Optional[jax.Array] = None


class SoftmaxRows(NamedTuple):
    """The vocabulary tables' rows a step reads (softmax.touched_rows), and per direction where
    its ids lie among them."""
    row_ids: jax.Array
    positions: dict  # direction -> StreamIds of positions


class TrainingDraw(NamedTuple):
    """What makes a loss a training loss: the dropout key, each direction's sampled softmax
    negatives (softmax.Negatives, or (ids, number of draws); None for the full softmax), and
    the rows the vocabulary tables were cut to (None: they are whole)."""
    dropout_rng: jax.Array
    samples: Optional[dict] = None
    rows: Optional[SoftmaxRows] = None


def _softmax_table(params, settings: StepSettings, rows: Optional[SoftmaxRows]) -> softmax.SoftmaxTable:
    """The softmax both directions share (its W the word embedding's, when shared)."""
    if settings.share_embedding_softmax:
        weights = params["bilm"]["embedder"]["embedding"]
    else:
        weights = params["softmax"]["W"]
    return softmax.SoftmaxTable(weights, params["softmax"]["b"], None if rows is None else rows.row_ids)


def _lstm_inputs(bilm_params, batch: Batch, model: BiLM, settings: StepSettings,
                 rows: Optional[SoftmaxRows]) -> tuple[dict, dict]:
    """Per direction, the LSTM's inputs (the token embeddings) and masks."""
    if settings.use_character_inputs:
        # the char CNN runs once per distinct token of the batch (both streams), see batch.to_device
        token_table = model.apply({"params": bilm_params}, batch.distinct_char_ids, batch.distinct_tail_ids,
                                  method=BiLM.embed)
        if batch.distinct_long_char_ids is not None:  # [short rows, long rows], see char_ids.pack_chars
            long_rows = model.apply({"params": bilm_params}, batch.distinct_long_char_ids, method=BiLM.embed)
            token_table = jnp.concatenate([token_table, long_rows])
    inputs, masks = {}, {}
    for direction in directions_of(settings.bidirectional):
        stream = batch.stream(direction)
        if settings.use_character_inputs:
            inputs[direction] = jnp.take(token_table, stream.token_index, axis=0)
        else:  # the embedder's lookup, on its table as the step has it (maybe only `rows`)
            token_ids = stream.token_ids
            if rows is not None:  # ids + 1 (0: padding) -> their rows' positions + 1
                token_ids = jnp.where(token_ids > 0, rows.positions[direction].token_ids + 1, 0)
            inputs[direction] = lookup_tokens(bilm_params["embedder"]["embedding"], token_ids)
        masks[direction] = stream.weights > 0
    return inputs, masks


def _token_losses(table: softmax.SoftmaxTable, top: jax.Array, direction: str, batch: Batch,
                  settings: StepSettings, draw: Optional[TrainingDraw]) -> jax.Array:
    """A direction's loss at each position: sampled softmax when training with samples, else full."""
    targets = batch.stream(direction).next_token_id.reshape(-1)
    if draw is None or not settings.sample_softmax:
        return softmax.full_softmax_loss(table, top, targets, numerics=settings.numerics)
    negatives = softmax.Negatives(*draw.samples[direction])
    if draw.rows is not None:  # ids -> their rows' positions
        positions = draw.rows.positions[direction]
        targets, negatives = positions.next_token_id.reshape(-1), negatives._replace(ids=positions.sampled)
    return softmax.sampled_softmax_loss(table, top, targets, negatives, settings.n_vocab,
                                        numerics=settings.numerics)


def direction_losses(params, batch: Batch, lstm_state: dict, *, model: BiLM, settings: StepSettings,
                     draw: Optional[TrainingDraw] = None):
    """Per direction (sum of token losses, number of tokens), and the new LSTM carry.

    Training (a `draw`) applies dropout and scores with the sampled softmax on the draw's
    samples (see draw_samples), or with the full softmax where settings.sample_softmax is False;
    evaluation (no draw) scores with the full softmax, without dropout. The draw's rows, when
    given, say that the vocabulary tables (softmax, word embedding) hold only those rows.
    """
    training = draw is not None
    rows = draw.rows if training else None
    inputs, masks = _lstm_inputs(params["bilm"], batch, model, settings, rows)
    rng = draw.dropout_rng if training else jax.random.PRNGKey(0)
    outputs, new_state = model.apply({"params": params["bilm"]}, inputs, masks, lstm_state, not training, training,
                                     rngs={"dropout": rng}, method=BiLM.contextualize)
    table = _softmax_table(params, settings, rows)
    sums = {}
    for direction in directions_of(settings.bidirectional):
        top = outputs[direction][-1]
        losses = _token_losses(table, top.reshape(-1, top.shape[-1]), direction, batch, settings, draw)
        token_weights = batch.stream(direction).weights.reshape(-1)
        sums[direction] = (jnp.sum(losses * token_weights), jnp.sum(token_weights))
    return sums, new_state


def draw_samples(rng: jax.Array, settings: StepSettings) -> dict:
    """Each direction's sampled softmax negatives for a step (softmax.Negatives)."""
    names = directions_of(settings.bidirectional)
    keys = jax.random.split(rng, len(names))
    return {direction: softmax.sample_log_uniform_unique(key, settings.n_negative_samples_batch, settings.n_vocab)
            for direction, key in zip(names, keys)}


def _softmax_rows(batch: Batch, samples: dict, settings: StepSettings) -> Optional[SoftmaxRows]:
    """The rows of the vocabulary tables a sampled-softmax step reads (None: all of them)."""
    ids = {}
    for direction in directions_of(settings.bidirectional):
        stream = batch.stream(direction)
        token_ids = None
        if not settings.use_character_inputs:  # input ids are ids + 1, with 0 (padding) for none: n_vocab
            token_ids = jnp.where(stream.token_ids > 0, stream.token_ids - 1, settings.n_vocab)
        ids[direction] = StreamIds(softmax.Negatives(*samples[direction]).ids, stream.next_token_id, token_ids)
    found = softmax.touched_rows(ids, settings.n_vocab)
    return None if found is None else SoftmaxRows(*found)


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
                  model: BiLM, settings: StepSettings):
    """What a train step differentiates: bilm-tf's loss (the mean of the directions' mean token
    losses) times unroll_steps, as bilm-tf scales it before its gradients (a per-window sum, in
    effect); with the loss itself and the new LSTM carry as aux. `rng` is dropout's, `samples`
    the negatives (None for the full softmax)."""
    return _drawn_loss(params, batch, lstm_state, TrainingDraw(rng, samples), model=model, settings=settings)


def _drawn_loss(params, batch: Batch, lstm_state: dict, draw: TrainingDraw, *, model: BiLM, settings: StepSettings):
    """training_loss, for a whole draw (the tables maybe cut to its rows)."""
    sums, new_lstm_state = direction_losses(params, batch, lstm_state, model=model, settings=settings, draw=draw)
    loss = sum(total / count for total, count in sums.values()) / len(sums)
    return loss * settings.unroll_steps, (loss, new_lstm_state)


def train_step(state: TrainState, batch: Batch, *, model: BiLM, tx: optax.GradientTransformation,
               settings: StepSettings, samples: Optional[dict] = None) -> tuple[TrainState, dict]:
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
    rows = None
    if settings.sample_softmax:
        if samples is None:
            samples = draw_samples(sample_rng, settings)
        rows = _softmax_rows(batch, samples, settings)
    params, opt_state = state.params, state.opt_state
    if rows is not None:
        params, opt_state = _take_rows(params, rows.row_ids), _take_rows(opt_state, rows.row_ids)

    lstm_state = state.lstm_state
    if settings.state_reset_probability > 0:
        lstm_state = reset_rows(lstm_state, jax.random.fold_in(sample_rng, 1), settings.state_reset_probability)
    grads, (loss, new_lstm_state) = jax.grad(_drawn_loss, has_aux=True)(
        params, batch, lstm_state, TrainingDraw(loss_rng, samples, rows), model=model, settings=settings)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if rows is not None:
        params = _put_rows(state.params, params, rows.row_ids)
        opt_state = _put_rows(state.opt_state, opt_state, rows.row_ids)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, lstm_state=new_lstm_state,
                              rng=rng)
    return new_state, {"loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads)}


def reset_rows(lstm_state: dict, rng: jax.Array, probability: float) -> dict:
    """The carry with each batch row's state (every direction and layer) zeroed with `probability`."""
    batch = jax.tree.leaves(lstm_state)[0].shape[0]
    keep = jax.random.uniform(rng, (batch, 1)) >= probability
    return jax.tree.map(lambda x: jnp.where(keep, x, 0.0), lstm_state)


def eval_step(params, lstm_state: dict, batch: Batch, *, model: BiLM, settings: StepSettings):
    sums, new_lstm_state = direction_losses(params, batch, lstm_state, model=model, settings=settings)
    return new_lstm_state, sums


INITIAL_ACCUMULATOR = 1.0  # bilm-tf's Adagrad (initial_accumulator_value)


def make_optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
    # TensorFlow's Adagrad: accumulator starts at 1.0, no epsilon.
    return optax.chain(
        optax.clip_by_global_norm(settings.clip_norm),
        optax.adagrad(settings.learning_rate, initial_accumulator_value=INITIAL_ACCUMULATOR, eps=0.0),
    )


def with_accumulators(opt_state, accumulators):
    """make_optimizer's state with Adagrad's accumulators (a params-shaped tree) replaced."""
    clip_state, (rss_state, *rest) = opt_state
    return clip_state, (rss_state._replace(sum_of_squares=accumulators), *rest)


def init_params(model: BiLM, settings: StepSettings, rng: jax.Array) -> dict:
    """Fresh params: the biLM's (its modules' initializers) and the softmax's, bilm-tf's
    normal(0, 1/sqrt(dim)) weights (none where the input embedding is shared) and zero biases."""
    options = model.options
    width = options.char_cnn.max_characters_per_token if settings.use_character_inputs else None
    ids = jnp.ones((1, 1, width) if width else (1, 1), jnp.int32)
    model_rng, softmax_rng = jax.random.split(rng)
    params = {"bilm": model.init(model_rng, ids, zero_state(options, 1))["params"],
              "softmax": {"b": jnp.zeros((settings.n_vocab,), jnp.float32)}}
    if not settings.share_embedding_softmax:
        dim = options.projection_dim
        params["softmax"]["W"] = jax.random.normal(softmax_rng, (settings.n_vocab, dim)) / np.sqrt(dim)
    return params


def new_state(model: BiLM, tx: optax.GradientTransformation, settings: StepSettings, rng: jax.Array,
              batch_size: int, params: Optional[dict] = None, accumulators: Optional[dict] = None) -> TrainState:
    """A fresh TrainState: new params (or `params`), a new optimizer state (or one with Adagrad's
    `accumulators`), a zero carry for `batch_size` rows."""
    params_rng, state_rng = jax.random.split(rng)
    params = init_params(model, settings, params_rng) if params is None else params
    opt_state = tx.init(params)
    if accumulators is not None:
        opt_state = with_accumulators(opt_state, accumulators)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      lstm_state=zero_state(model.options, batch_size), rng=state_rng)
