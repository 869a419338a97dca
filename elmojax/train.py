"""Training the biLM: the TrainState, the jitted train and eval steps, the loops, export.

The model is `elmojax.model.BiLM`, the same modules inference uses. A step embeds the forward
stream and the reversed stream with the shared token embedder, runs each direction's LSTM stack
from the carried state, and scores next tokens with a softmax shared by both directions
(sampled for training, full for evaluation), as bilm-tf's training.py does.

Data parallelism: a Mesh over all devices with one axis, 'data'. Batches and the LSTM carry are
sharded along the batch dimension, params and optimizer state replicated; one jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import queue
import shutil
import threading
import time
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from elmojax import checkpoint, config as config_lib, data, files, hdf5, numerics, softmax
from elmojax.embed import distinct_tokens, trim_char_ids
from elmojax.model import BiLM, lookup_tokens, zero_state
from elmojax.options import N_CHARACTERS_PREDICT, BiLMOptions
from elmojax.tensorboard import SummaryWriter
from elmojax.vocab import UnicodeCharsVocabulary, Vocabulary

log = logging.getLogger(__name__)

DIRECTIONS = (("forward", ""), ("backward", "_reverse"))
VOCAB_FILE = "vocab.txt"  # the vocabulary, copied into the workdir


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
    compute_dtype: Any = None  # see elmojax.numerics


def _loss_settings(config: ml_collections.ConfigDict, n_vocab: int) -> LossSettings:
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


def _directions(settings: LossSettings):
    return DIRECTIONS if settings.bidirectional else DIRECTIONS[:1]


def direction_losses(params, batch: dict, lstm_state: dict, rng: jax.Array, *, model: BiLM,
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
        # the char CNN runs once per distinct token of the batch (both streams), see put_batch
        token_table = model.apply({"params": bilm_params}, batch["distinct_char_ids"],
                                  batch.get("distinct_tail_ids"), method=BiLM.embed)
    sums, new_state = {}, {}
    for direction, suffix in _directions(settings):
        rng, dropout_key = jax.random.split(rng)
        weights = batch["weights" + suffix]
        if settings.use_character_inputs:
            embedding = jnp.take(token_table, batch["token_index" + suffix], axis=0)
        else:  # the embedder's lookup, on its table as the step has it (maybe only `rows`)
            token_ids = batch["token_ids" + suffix]
            if positions is not None:  # ids + 1 (0: padding) -> their rows' positions + 1
                token_ids = jnp.where(token_ids > 0, positions["token_ids" + suffix] + 1, 0)
            embedding = lookup_tokens(bilm_params["embedder"]["embedding"], token_ids)
        outputs, new_state[direction] = model.apply(
            {"params": bilm_params}, direction, embedding, weights > 0, lstm_state[direction],
            not training, training, rngs={"dropout": dropout_key}, method=BiLM.run_lstm)
        top = outputs[-1].reshape(-1, outputs[-1].shape[-1])
        targets = batch["next_token_id" + suffix].reshape(-1)
        if training and settings.sample_softmax:
            sampled, num_tries = samples[direction]
            if positions is not None:  # ids -> their rows' positions
                targets, sampled = positions["next_token_id" + suffix].reshape(-1), positions["sampled" + suffix]
            losses = softmax.sampled_softmax_loss(softmax_w, softmax_b, top, targets, sampled, num_tries,
                                                  settings.n_vocab, row_ids=row_ids, precision=settings.precision,
                                                  compute_dtype=settings.compute_dtype)
        else:
            losses = softmax.full_softmax_loss(softmax_w, softmax_b, top, targets,
                                               compute_dtype=settings.compute_dtype)
        token_weights = weights.reshape(-1)
        sums[direction] = (jnp.sum(losses * token_weights), jnp.sum(token_weights))
    return sums, new_state


def draw_samples(rng: jax.Array, settings: LossSettings) -> dict:
    """Each direction's sampled softmax negatives for a step: (sampled ids, number of draws)."""
    keys = jax.random.split(rng, len(_directions(settings)))
    return {direction: softmax.sample_log_uniform_unique(key, settings.n_negative_samples_batch, settings.n_vocab)
            for (direction, _), key in zip(_directions(settings), keys)}


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


def training_loss(params, batch: dict, lstm_state: dict, rng: jax.Array, samples: Optional[dict], *,
                  model: BiLM, settings: LossSettings, rows: Optional[tuple] = None):
    """What a train step differentiates: bilm-tf's loss (the mean of the directions' mean token
    losses) times unroll_steps, as bilm-tf scales it before its gradients (a per-window sum, in
    effect); with the loss itself and the new LSTM carry as aux."""
    sums, new_lstm_state = direction_losses(params, batch, lstm_state, rng, model=model, settings=settings,
                                            training=True, samples=samples, rows=rows)
    loss = sum(total / count for total, count in sums.values()) / len(sums)
    return loss * settings.unroll_steps, (loss, new_lstm_state)


def train_step(state: TrainState, batch: dict, *, model: BiLM, tx: optax.GradientTransformation,
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
        for direction, suffix in _directions(settings):
            ids["sampled" + suffix] = samples[direction][0]
            ids["next_token_id" + suffix] = batch["next_token_id" + suffix]
            if not settings.use_character_inputs:  # input ids are ids + 1, with 0 (padding) for none: n_vocab
                token_ids = batch["token_ids" + suffix]
                ids["token_ids" + suffix] = jnp.where(token_ids > 0, token_ids - 1, settings.n_vocab)
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


def eval_step(params, lstm_state: dict, batch: dict, *, model: BiLM, settings: LossSettings):
    sums, new_lstm_state = direction_losses(params, batch, lstm_state, jax.random.PRNGKey(0), model=model,
                                            settings=settings, training=False)
    return new_lstm_state, sums


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    # TensorFlow's Adagrad: accumulator starts at 1.0, no epsilon.
    return optax.chain(
        optax.clip_by_global_norm(config.train.all_clip_norm_val),
        optax.adagrad(config.train.learning_rate, initial_accumulator_value=1.0, eps=0.0),
    )


class Trainer:
    """The model, optimizer, mesh and jitted steps for one config and vocabulary size."""

    def __init__(self, config: ml_collections.ConfigDict, n_vocab: int, mesh: Optional[Mesh] = None):
        self.config = config
        self.options: BiLMOptions = config_lib.bilm_options(config, n_vocab)
        if self.options.char_cnn is not None and config.model.share_embedding_softmax:
            raise ValueError("share_embedding_softmax needs word inputs: a char CNN has no softmax-sized "
                             "embedding table to share (as in bilm-tf)")
        self.settings = _loss_settings(config, n_vocab)
        if self.settings.n_negative_samples_batch > n_vocab:
            raise ValueError(f"train.n_negative_samples_batch ({self.settings.n_negative_samples_batch}) exceeds "
                             f"the vocabulary ({n_vocab} tokens): the sampler draws distinct ids")
        self.model = BiLM(self.options, self.settings.use_character_inputs, dropout_rate=self.settings.dropout,
                          precision=self.settings.precision, scan_unroll=config.train.get("scan_unroll", 1),
                          compute_dtype=self.settings.compute_dtype)
        self.tx = make_optimizer(config)
        self.mesh = mesh or Mesh(np.array(jax.devices()), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P("data"))
        self.n_devices = self.mesh.devices.size
        self.batch_size = config.train.batch_size * self.n_devices  # global
        self.state_sharding = TrainState(
            step=self.replicated, params=self.replicated, opt_state=self.replicated,
            lstm_state=self.sharded, rng=self.replicated)
        self.train_step = numerics.jit(
            functools.partial(train_step, model=self.model, tx=self.tx, settings=self.settings),
            in_shardings=(self.state_sharding, self.sharded), out_shardings=(self.state_sharding, self.replicated),
            donate_argnums=(0,))
        self.eval_step = numerics.jit(
            functools.partial(eval_step, model=self.model, settings=self.settings),
            in_shardings=(self.replicated, self.sharded, self.sharded), out_shardings=(self.sharded, self.replicated))

    def init_params(self, rng: jax.Array) -> dict:
        o, s = self.options, self.settings
        width = o.char_cnn.max_characters_per_token if s.use_character_inputs else None
        ids = jnp.ones((1, 1, width) if width else (1, 1), jnp.int32)
        model_rng, softmax_rng = jax.random.split(rng)
        params = {"bilm": self.model.init(model_rng, ids, zero_state(o, 1))["params"]}
        # bilm-tf: normal(0, 1/sqrt(dim)) softmax weights, zero biases
        params["softmax"] = {"b": jnp.zeros((s.n_vocab,), jnp.float32)}
        if not s.share_embedding_softmax:
            params["softmax"]["W"] = jax.random.normal(softmax_rng, (s.n_vocab, o.projection_dim)) / np.sqrt(
                o.projection_dim)
        return params

    def create_state(self, rng: jax.Array, params: Optional[dict] = None) -> TrainState:
        params_rng, state_rng = jax.random.split(rng)
        params = self.init_params(params_rng) if params is None else params
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                           lstm_state=zero_state(self.options, self.batch_size), rng=state_rng)
        return jax.device_put(state, self.state_sharding)

    def abstract_state(self) -> TrainState:
        shapes = jax.eval_shape(lambda: self.create_state(jax.random.PRNGKey(0)))
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                            _broadcast_sharding(self.state_sharding, shapes))

    def put_batch(self, batch: dict) -> dict:
        """Sends a batch to the devices, sharded along the batch axis; with several processes,
        each passes its own rows of the global batch. Character inputs go as the batch's
        distinct tokens and an index into them per position, so the char CNN runs once per
        distinct token. Their number is padded to a power of two (few shapes to compile); with
        several processes, to one fixed size, so that every process's part has the same shape.
        With one process their char ids are also cut short past the longest word (trim_char_ids):
        the CNN does not convolve the padding characters."""
        batch = {k: np.asarray(v) for k, v in batch.items()}
        # does the mesh span other processes' devices?
        n_processes = self.mesh.devices.size // len(self.mesh.local_devices)
        if self.settings.use_character_inputs:
            suffixes = [suffix for _, suffix in DIRECTIONS if "char_ids" + suffix in batch]
            stacked = np.stack([batch.pop("char_ids" + s) for s in suffixes])
            local_devices = len(self.mesh.local_devices)
            fixed = int(np.prod(stacked.shape[:-1])) if n_processes > 1 else None
            distinct, index = distinct_tokens(stacked, size=fixed, multiple=local_devices)
            if n_processes > 1:  # index into the global table: this process's part comes at its offset
                index += jax.process_index() * len(distinct)
            for k, suffix in enumerate(suffixes):
                batch["token_index" + suffix] = index[k]
            if n_processes == 1:  # with several, every process's part must have the same width
                distinct, tail_ids = trim_char_ids(distinct, self.options.char_cnn.max_width)
                if tail_ids is not None:
                    batch["distinct_tail_ids"] = tail_ids
            batch["distinct_char_ids"] = distinct
        if n_processes == 1:
            return jax.device_put(batch, self.sharded)
        return {k: jax.make_array_from_process_local_data(self.sharded, v) for k, v in batch.items()}

    def zero_lstm_state(self, batch_size: int):
        return jax.device_put(zero_state(self.options, batch_size), self.sharded)


def _broadcast_sharding(prefix: TrainState, tree: TrainState) -> TrainState:
    return TrainState(**{f.name: jax.tree.map(lambda _: getattr(prefix, f.name), getattr(tree, f.name))
                         for f in dataclasses.fields(TrainState)})


# ----------------------------------------------------------------------------------------------
# vocabularies, data, initialization

def load_vocab(config: ml_collections.ConfigDict, vocab_file: Optional[str] = None) -> Vocabulary:
    vocab_file = vocab_file or config.data.vocab_file
    if not vocab_file:
        raise ValueError("no vocabulary: set --config.data.vocab_file=FILE")
    if config_lib.use_character_inputs(config):
        return UnicodeCharsVocabulary(vocab_file, config.model.char_cnn.max_characters_per_token, validate_file=True)
    return Vocabulary(vocab_file, validate_file=True)


def make_dataset(config, vocab, prefix: str, batch_size: int, unroll_steps: int, test: bool, seed: int = 0,
                 shard_subset: tuple[int, int] = (0, 1)):
    if not prefix:
        raise ValueError("no data: set --config.data.train_prefix=GLOB (and heldout_prefix for evaluation)")
    chars = config.model.char_cnn.max_characters_per_token if config_lib.use_character_inputs(config) else None
    cls = data.BidirectionalLMDataset if config.model.bidirectional else data.LMDataset
    return cls(prefix, vocab, batch_size, unroll_steps, test=test, seed=seed, max_characters_per_token=chars,
               shard_subset=shard_subset)


def _local_mesh() -> Mesh:
    """This process's devices: evaluation and export run on process 0 alone."""
    return Mesh(np.array(jax.local_devices()), ("data",))


def _vocab_tokens(vocab: Vocabulary) -> list[str]:
    return [vocab.id_to_word(i) for i in range(vocab.size)]


def remap_rows(old: np.ndarray, old_vocab: list[str], new: np.ndarray, new_vocab: list[str]) -> tuple[np.ndarray, int]:
    """Rows of `new` (fresh init) overwritten by `old`'s rows for tokens both vocabularies have."""
    index = {token: i for i, token in enumerate(old_vocab)}
    out = np.array(new, copy=True)
    shared = [(j, index[t]) for j, t in enumerate(new_vocab) if t in index]
    if shared:
        new_ids, old_ids = map(np.array, zip(*shared))
        out[new_ids] = np.asarray(old)[old_ids]
    return out, len(shared)


def _exported_files(weight_file: str, softmax_file: str = "") -> dict:
    stem, _ = os.path.splitext(weight_file)
    directory = os.path.dirname(os.path.abspath(weight_file))
    return {"weights": weight_file, "options": os.path.join(directory, "options.json"),
            "softmax": softmax_file or f"{stem}_softmax.hdf5", "vocab": os.path.join(directory, VOCAB_FILE)}


def trained_vocab_file(path: str) -> str:
    """The vocabulary of a workdir (copied into it) or of an exported weight file (beside it)."""
    return os.path.join(path, VOCAB_FILE) if os.path.isdir(path) else _exported_files(path)["vocab"]


def load_trained(path: str, softmax_file: str = "") -> tuple[dict, dict, list[str]]:
    """(params, options.json dict, vocabulary tokens) of a workdir's latest checkpoint or an export."""
    if os.path.isdir(path):
        step, meta = checkpoint.restore_meta(path)
        config = ml_collections.ConfigDict(json.loads(meta["config"]))
        vocab = Vocabulary(trained_vocab_file(path))
        trainer = Trainer(config, vocab.size, Mesh(np.array(jax.local_devices()[:1]), ("data",)))
        abstract = trainer.abstract_state()
        # the saved carry has the saved global batch; only params are needed here
        abstract = abstract.replace(lstm_state=jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((meta["global_batch_size"],) + x.shape[1:], x.dtype, sharding=x.sharding),
            abstract.lstm_state))
        state, _ = checkpoint.restore_state(path, abstract, step)
        return jax.device_get(state.params), meta["options"], _vocab_tokens(vocab)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: neither a workdir with checkpoints nor an exported weight file")
    exported = _exported_files(path, softmax_file)
    if not os.path.isfile(exported["options"]):
        raise ValueError(f"{path}: no options.json beside it ({exported['options']})")
    options_d = files.read_json(exported["options"])
    options = BiLMOptions.from_dict(options_d, source=exported["options"])
    if not os.path.isfile(exported["softmax"]):
        raise ValueError(f"{path}: no softmax file {exported['softmax']} (give --config.init_softmax_from=FILE)")
    softmax_w, softmax_b, vocab = hdf5.load_softmax(exported["softmax"])
    if vocab is None:
        vocab = _vocab_tokens(Vocabulary(exported["vocab"]))
    if options.char_cnn is None:
        options = dataclasses.replace(options, n_tokens_vocab=softmax_w.shape[0])
    params = {"bilm": hdf5.load_weights(path, options), "softmax": {"W": softmax_w, "b": softmax_b}}
    if options_d.get("share_embedding_softmax"):
        del params["softmax"]["W"]
    return params, options_d, vocab


def _architecture(options_d: dict) -> dict:
    d = BiLMOptions.from_dict(options_d).to_dict()
    d.pop("n_tokens_vocab", None)
    if "char_cnn" in d:
        d["char_cnn"].pop("n_characters")
    return d


def init_from(trainer: Trainer, fresh: dict, path: str, softmax_file: str, vocab: list[str]) -> dict:
    """Params for fine-tuning: the trained model's, with softmax (and word embedding) rows
    re-mapped by token onto the new vocabulary; tokens it did not have keep their fresh init."""
    params, options_d, old_vocab = load_trained(path, softmax_file)
    ours = config_lib.options_json(trainer.config)
    if _architecture(options_d) != _architecture(ours):
        raise ValueError(f"{path}: its architecture differs from the config's model "
                         f"({_architecture(options_d)} vs {_architecture(ours)})")
    fresh = jax.device_get(fresh)
    out = {"bilm": params["bilm"], "softmax": dict(fresh["softmax"])}
    if trainer.options.char_cnn is None:
        out["bilm"]["embedder"]["embedding"], _ = remap_rows(
            params["bilm"]["embedder"]["embedding"], old_vocab, fresh["bilm"]["embedder"]["embedding"], vocab)
    for name in out["softmax"]:
        if name in params["softmax"]:
            out["softmax"][name], n_shared = remap_rows(params["softmax"][name], old_vocab, fresh["softmax"][name], vocab)
    log.info("init from %s: %d of %d vocabulary tokens re-mapped from the trained softmax, %d initialized fresh",
             path, n_shared, len(vocab), len(vocab) - n_shared)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), out)


# ----------------------------------------------------------------------------------------------
# the loops

def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains, resuming from the workdir's latest checkpoint if there is one."""
    os.makedirs(workdir, exist_ok=True)
    vocab = load_vocab(config)
    trainer = Trainer(config, vocab.size)
    tc = config.train
    n_train_tokens = tc.n_train_tokens or data.count_tokens(config.data.train_prefix)
    tokens_per_step = trainer.batch_size * tc.unroll_steps
    steps_per_epoch = max(1, int(n_train_tokens / tokens_per_step))
    total_steps = tc.n_epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    # Each process reads its own share of the shards and feeds its rows of the global batch.
    process, n_processes = jax.process_index(), jax.process_count()
    dataset = make_dataset(config, vocab, config.data.train_prefix, trainer.batch_size // n_processes,
                           tc.unroll_steps, test=False, seed=tc.seed, shard_subset=(process, n_processes))

    vocab_copy = os.path.join(workdir, VOCAB_FILE)
    if checkpoint.latest_step(workdir) is not None:
        step, meta = checkpoint.restore_meta(workdir)
        if meta["global_batch_size"] != trainer.batch_size:
            raise ValueError(f"{workdir}: the checkpoint was trained with a global batch of "
                             f"{meta['global_batch_size']}, this run has {trainer.batch_size}")
        if _vocab_tokens(Vocabulary(vocab_copy)) != _vocab_tokens(vocab):
            raise ValueError(f"{config.data.vocab_file}: not the vocabulary the checkpoint in {workdir} was trained with")
        state, meta = checkpoint.restore_state(workdir, trainer.abstract_state(), step)
        if n_processes > 1:
            meta["data"] = files.read_json(checkpoint.data_position_file(workdir, step, process))
        dataset.load_state_dict(meta["data"])
        log.info("resuming from %s at step %d", workdir, step)
    else:
        rng = jax.random.PRNGKey(tc.seed)
        params = None
        if config.init_from:
            params = init_from(trainer, trainer.init_params(jax.random.fold_in(rng, 1)), config.init_from,
                               config.init_softmax_from, _vocab_tokens(vocab))
        state = trainer.create_state(rng, params)
        if process == 0:
            with files.atomic_output(vocab_copy) as tmp:
                shutil.copyfile(vocab.filename, tmp)
            files.write_json(os.path.join(workdir, "options.json"), config_lib.options_json(config, vocab.size))

    checkpointer = checkpoint.Checkpointer(workdir, tc.keep_checkpoints)
    writer = SummaryWriter(workdir) if process == 0 else None
    meta = {"config": config.to_json(), "options": config_lib.options_json(config, vocab.size),
            "global_batch_size": trainer.batch_size}
    step = int(state.step)
    log.info("training %s for %d steps (%d per epoch of %d tokens; global batch %d on %d device(s))",
             "chars" if trainer.settings.use_character_inputs else "words", total_steps, steps_per_epoch,
             n_train_tokens, trainer.batch_size, trainer.n_devices)
    batches = BatchPrefetcher(dataset)
    try:
        pending, interval_start, interval_steps = [], time.monotonic(), 0
        while step < total_steps:
            batch, data_position = next(batches)
            state, metrics = trainer.train_step(state, trainer.put_batch(batch))
            step += 1
            pending.append(metrics["loss"])
            interval_steps += 1
            if step % tc.log_every == 0 or step == total_steps:
                loss = float(np.mean(jax.device_get(pending)))
                elapsed = time.monotonic() - interval_start
                tokens_per_second = interval_steps * tokens_per_step / elapsed
                left = (total_steps - step) * elapsed / interval_steps
                if writer is not None:
                    log.info("step %d/%d  %.0f tokens/s  train perplexity (sampled softmax) %.2f  %s left",
                             step, total_steps, tokens_per_second, np.exp(loss), _duration(left))
                    writer.scalars(step, {"train/loss": loss, "train/sampled_perplexity": float(np.exp(loss)),
                                          "train/grad_norm": float(metrics["grad_norm"]),
                                          "train/tokens_per_second": tokens_per_second})
                pending, interval_start, interval_steps = [], time.monotonic(), 0
            if step % tc.checkpoint_every == 0 or step == total_steps:
                if n_processes > 1:
                    files.write_json(checkpoint.data_position_file(workdir, step, process), data_position)
                checkpointer.save(step, state, {**meta, "data": data_position if n_processes == 1 else None})
    finally:
        batches.close()
    checkpointer.close()
    if writer is not None:
        writer.close()
    return state


class BatchPrefetcher:
    """Reads batches in a background thread so the device never waits for the host.

    Yields (batch, data position after it): the position saved with a checkpoint must be that
    of the last batch trained on, not of the batches read ahead.
    """

    def __init__(self, dataset, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(dataset,), daemon=True)
        self._thread.start()

    def _work(self, dataset) -> None:
        try:
            for batch in dataset.iter_batches():
                if not self._put((batch, dataset.state_dict())):
                    return
            self._put(StopIteration())
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def evaluate(config: ml_collections.ConfigDict, path: str, trained: Optional[tuple] = None,
             initial_state: Optional[dict] = None) -> dict:
    """Heldout perplexity with the full softmax, state carried, every heldout token counted once.
    `trained` (params, options.json dict, vocabulary) stands for what `path` holds, if given.
    The LSTMs start from zero state (as embeddings do), or from `initial_state`, a carry whose
    batch size is then the evaluation's (e.g. where training left the LSTMs)."""
    params, options_d, vocab_tokens = trained or load_trained(path, config.init_softmax_from)
    eval_config = config_lib.config_from_options_json(options_d, source=path)
    eval_config.train.matmul_precision = config.train.matmul_precision
    vocab = load_vocab(eval_config, trained_vocab_file(path))
    if _vocab_tokens(vocab) != vocab_tokens:
        raise ValueError(f"{path}: its vocabulary file does not match the softmax's vocabulary")
    trainer = Trainer(eval_config, vocab.size, _local_mesh())
    batch_size = -(-config.eval.batch_size // trainer.n_devices) * trainer.n_devices
    if initial_state is not None:
        batch_size = jax.tree.leaves(initial_state)[0].shape[0]
    dataset = make_dataset(eval_config, vocab, config.data.heldout_prefix, batch_size, config.eval.unroll_steps,
                           test=True)
    params = jax.device_put(params, trainer.replicated)
    lstm_state = trainer.zero_lstm_state(batch_size) if initial_state is None else jax.device_put(
        initial_state, trainer.sharded)
    totals: dict[str, list[float]] = {}
    target_counts = np.zeros(vocab.size, np.int64)
    for batch in dataset.iter_batches():
        target_counts += np.bincount(batch["next_token_id"].ravel(), weights=batch["weights"].ravel(),
                                     minlength=vocab.size).astype(np.int64)
        lstm_state, sums = trainer.eval_step(params, lstm_state, trainer.put_batch(batch))
        for direction, (loss_sum, count) in jax.device_get(sums).items():
            t = totals.setdefault(direction, [0.0, 0.0])
            t[0] += float(loss_sum)
            t[1] += float(count)
    if not totals or next(iter(totals.values()))[1] == 0:
        raise ValueError(f"{config.data.heldout_prefix}: no heldout tokens")
    mean_losses = {d: s / n for d, (s, n) in totals.items()}
    result = {"perplexity": float(np.exp(np.mean(list(mean_losses.values())))),
              "tokens": int(totals["forward"][1]),
              # a unigram model fit to the heldout targets themselves: a baseline to beat
              "unigram_perplexity": _unigram_perplexity(target_counts)}
    for direction, loss in mean_losses.items():
        result[f"{direction}_perplexity"] = float(np.exp(loss))
    if "backward_perplexity" not in result:
        result["backward_perplexity"] = None
    result["blown_up"] = blown_up(result)
    return result


# A direction whose heldout perplexity is this many times the other's has gone wrong: healthy
# forward and backward LMs score within a few percent of each other.
DIRECTION_RATIO_LIMIT = 1.2


def blown_up(result: dict) -> bool:
    """Whether an evaluation's result shows a broken model: a direction's heldout perplexity
    above the unigram baseline (what a model of word frequencies alone would score), or
    DIRECTION_RATIO_LIMIT times the other direction's."""
    scores = [result[f"{d}_perplexity"] for d in ("forward", "backward") if result.get(f"{d}_perplexity") is not None]
    return max(scores) > result["unigram_perplexity"] or max(scores) > DIRECTION_RATIO_LIMIT * min(scores)


def health_warning(result: dict, from_carry: Optional[dict] = None) -> Optional[str]:
    """For an evaluation that shows a broken model (blown_up), one line that says so, with the
    perplexities, why and what to do; None otherwise. `from_carry`, the evaluation from the
    LSTM state training ended in, tells the zero-state trap (a model fine from there) from a
    model that did not learn."""
    if not blown_up(result):
        return None
    scores = {d: result[f"{d}_perplexity"] for d in ("forward", "backward") if result.get(f"{d}_perplexity") is not None}
    worst = max(scores, key=scores.get)
    line = (f"warning: the {worst} LM is broken: heldout perplexity {scores[worst]:.6g} ("
            + ", ".join(f"{d} {p:.6g}" for d, p in scores.items())
            + f"; unigram baseline {result['unigram_perplexity']:.6g})")
    trap = ("from the zero LSTM state that evaluation and embeddings start from, it falls into a state that "
            "training, which carries the state from batch to batch, never visits. ")
    if from_carry is None:
        return f"{line}. If its sampled-softmax training perplexity looked normal, {trap}{REMEDY}"
    carried = from_carry[f"{worst}_perplexity"]
    if blown_up(from_carry):
        return (f"{line}, and {carried:.6g} from the LSTM state training ended in: it has not learnt; train it "
                f"longer (or with a smaller learning rate).")
    return f"{line}, but {carried:.6g} from the LSTM state training ended in: {trap}{REMEDY}"


# What health_warning advises for the zero-state trap (see README, "When a model blows up").
REMEDY = ("Do not use it: train again with --config.train.state_reset_probability=0.05 (each row's carried LSTM "
          "state is zeroed now and then, so that the model learns to start from it), or with another seed.")


def _unigram_perplexity(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def export(path: str, output: str, trained: Optional[tuple] = None) -> dict:
    """Writes a trained model as bilm-tf files: weights (hdf5), options.json (n_characters 262)
    beside them, the softmax (softmax/W, softmax/b, and the vocabulary) and vocab.txt."""
    params, options_d, vocab_tokens = trained or load_trained(path)
    options = BiLMOptions.from_dict(options_d, source=path)
    exported = _exported_files(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    hdf5.save_weights(params["bilm"], options, output)
    prediction_options = dict(options_d)
    if "char_cnn" in prediction_options:
        prediction_options["char_cnn"] = {**prediction_options["char_cnn"], "n_characters": N_CHARACTERS_PREDICT}
    files.write_json(exported["options"], prediction_options)
    softmax_w = params["softmax"].get("W")
    if softmax_w is None:  # shared with the word embedding
        softmax_w = params["bilm"]["embedder"]["embedding"]
    hdf5.save_softmax(softmax_w, params["softmax"]["b"], exported["softmax"], vocab_tokens)
    with files.atomic_output(exported["vocab"]) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(t + "\n" for t in vocab_tokens))
    return exported


def after_training(config: ml_collections.ConfigDict, workdir: str, state: TrainState) -> list[str]:
    """What the config asks for once training ends: heldout evaluation, export, and embedding
    the example sentences with the exported model, all from the final `state`. Returns lines to
    print."""
    lines = []
    if jax.process_index() != 0:  # process 0 evaluates and exports on its own devices
        return lines
    vocab = _vocab_tokens(Vocabulary(os.path.join(workdir, VOCAB_FILE)))
    params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
    trained = (params, config_lib.options_json(config, len(vocab)), vocab)
    if config.data.heldout_prefix:
        result = evaluate(config, workdir, trained)
        lines.append(f"heldout perplexity {result['perplexity']:.2f} (forward {result['forward_perplexity']:.2f}, "
                     f"backward {result['backward_perplexity'] or float('nan'):.2f}) over {result['tokens']} tokens; "
                     f"unigram baseline {result['unigram_perplexity']:.2f}")
        if result["blown_up"]:
            from_carry = None
            if jax.process_count() == 1:  # (with several, the carry's rows are spread over the processes)
                from_carry = evaluate(config, workdir, trained, initial_state=jax.device_get(state.lstm_state))
            lines.append(health_warning(result, from_carry))
    if config.export_after_training:
        output = os.path.join(workdir, config.export_after_training)
        exported = export(workdir, output, trained)
        lines.append(f"exported {exported['weights']} with {exported['options']} and {exported['softmax']}")
        if config.example_sentences and config.model.bidirectional and config_lib.use_character_inputs(config):
            lines.extend(_embed_examples(exported, list(config.example_sentences)))
    return lines


def _embed_examples(exported: dict, sentences: list[str]) -> list[str]:
    from elmojax.embed import BidirectionalLanguageModel
    from elmojax.vocab import Batcher

    options = BiLMOptions.from_dict(files.read_json(exported["options"]))
    bilm = BidirectionalLanguageModel(exported["options"], exported["weights"])
    batcher = Batcher(exported["vocab"], options.char_cnn.max_characters_per_token)
    tokens = [s.split() for s in sentences]
    out = bilm(batcher.batch_sentences(tokens))
    lines = [f"embedded {len(tokens)} example sentences: lm_embeddings {out['lm_embeddings'].shape}"]
    # mean-pooled top layer: how alike the sentences look to the model
    pooled = [out["lm_embeddings"][i, -1, : len(t)].mean(axis=0) for i, t in enumerate(tokens)]
    unit = [p / np.linalg.norm(p) for p in pooled]
    for i in range(len(unit)):
        for j in range(i + 1, len(unit)):
            lines.append(f"  cosine(sentence {i}, sentence {j}) = {float(unit[i] @ unit[j]):.3f}")
    return lines
