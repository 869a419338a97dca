"""A training run bilm-tf recorded (benchmarks/bilm_tf_training.py record), replayed with
elmojax's own jitted train step: the same initial variables (elmojax.formats.tf_variables), the
same batches from the same zero state, the negatives bilm-tf's sampler drew and the dropout masks
bilm-tf applied (where the record has them); per step the loss and gradient norm, at the
recorded snapshots every variable by its TensorFlow name. The tests replay small records
(tests/fixtures/bilm_tf_training/), benchmarks/training_parity.py long ones."""

from __future__ import annotations

import contextlib
import json
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from elmojax.formats import hdf5, tf_variables
from elmojax.formats.directions import DIRECTIONS, directions, host_suffix
from elmojax.model import softmax
from elmojax.model.dropout import Dropout
from elmojax.train import config as config_lib
from elmojax.train.step import train_step, training_loss
from elmojax.train.trainer import Trainer


class Record:
    """A bilm-tf run recorded by bilm_tf_training.py record (an npz of plain arrays)."""
    def __init__(self, path: str):
        self.path = path
        with np.load(path, allow_pickle=False) as f:
            self.arrays = {k: f[k] for k in f.files}
        self.options = json.loads(str(self.arrays["options"]))
        self.steps = len(self.arrays["loss"])
        self.char_inputs = "char_cnn" in self.options
        self.bidirectional = bool(self.options.get("bidirectional", False))
        self.sampled = "sampled/ids/0" in self.arrays
        self.dropout = any(k.startswith("mask/") for k in self.arrays)

    def variables(self, prefix: str) -> dict:
        """The TensorFlow variables (and slots) under `prefix` ('init', 'grad', 'after_20')."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.arrays.items() if k.startswith(prefix + "/")}

    def snapshot(self, step: int) -> dict:
        """Every variable after a step, and the LSTM carry then (lstm_state/<d>/<l>/{c,h}), if recorded."""
        carry = {k[len(f"lstm_state_after_{step}/"):]: v for k, v in self.arrays.items()
                 if k.startswith(f"lstm_state_after_{step}/")}
        return {**self.variables(f"after_{step}"), **{f"lstm_state/{k}": v for k, v in carry.items()}}

    def snapshots(self) -> list[int]:
        return sorted({int(k.split("/")[0][len("after_"):]) for k in self.arrays if k.startswith("after_")})

    def suffixes(self) -> tuple[str, ...]:
        return tuple(host_suffix(d) for d in directions(self.bidirectional))

    def batch(self, step: int) -> dict:
        """Step `step`'s (1-based) batch in elmojax's layout: ids + 1 (0 would be padding), and
        weights 1 (bilm-tf's training windows are always full)."""
        out = {}
        for suffix in self.suffixes():
            if self.char_inputs:
                out["char_ids" + suffix] = self.arrays["batch/tokens_characters" + suffix][step - 1].astype(np.int32) + 1
            else:
                out["token_ids" + suffix] = self.arrays["batch/token_ids" + suffix][step - 1].astype(np.int32) + 1
            targets = self.arrays["batch/next_token_id" + suffix][step - 1].astype(np.int32)
            out["next_token_id" + suffix] = targets
            out["weights" + suffix] = np.ones(targets.shape, np.float32)
        return out

    def samples(self, step: int) -> Optional[dict]:
        """bilm-tf's negatives at a step, as train_step takes them: per direction (ids, number of
        draws). TensorFlow reports expected counts, not its number of draws: that is recovered
        from them (and the expected counts elmojax computes from it are checked by `compare`)."""
        if not self.sampled:
            return None
        n_vocab = self.options["n_tokens_vocab"]
        out = {}
        for d, direction in enumerate(directions(self.bidirectional)):
            ids = self.arrays[f"sampled/ids/{d}"][step - 1].astype(np.int64)
            counts = self.arrays[f"sampled/sampled_expected_count/{d}"][step - 1].astype(np.float64)
            out[direction] = (ids.astype(np.int32), np.float32(num_tries(ids, counts, n_vocab)))
        return out

    def carry(self, prefix: str) -> dict:
        """An LSTM carry the record holds (prefix/<direction>/<layer>/{c,h}), as elmojax's pytree."""
        return carry_from_arrays(self.arrays, prefix, self.options)

    def masks(self, step: int) -> dict:
        """Dropout keep masks at a step by the path of elmojax's Dropout module they stand for,
        the directions' masks stacked as its input is (elmojax.model.lstm)."""
        parts: dict = {}
        for key, value in self.arrays.items():
            if key.startswith("mask/input_"):
                d, layer = key[len("mask/input_"):].split("_")
                parts.setdefault(("lstm", f"layer_{layer}", "Dropout_0"), {})[int(d)] = value[step - 1]
            elif key.startswith("mask/output_"):
                parts.setdefault(("lstm", "output_dropout"), {})[int(key[len("mask/output_"):])] = value[step - 1]
        return {path: np.stack([by_direction[d] for d in sorted(by_direction)]) for path, by_direction in parts.items()}


def carry_from_arrays(arrays, prefix: str, options: dict) -> dict:
    """elmojax's LSTM carry {direction: ((c, h) per layer)} from bilm_tf_training.py's arrays."""
    n_layers = options["lstm"].get("n_layers", 1)
    return {direction: tuple((np.asarray(arrays[f"{prefix}/{d}/{layer}/c"]), np.asarray(arrays[f"{prefix}/{d}/{layer}/h"]))
                             for layer in range(n_layers))
            for d, direction in enumerate(directions(bool(options.get("bidirectional", False))))}


def carry_arrays(carry: dict, prefix: str) -> dict:
    """The inverse of carry_from_arrays."""
    return {f"{prefix}/{d}/{layer}/{name}": np.asarray(value) for d, direction in enumerate(DIRECTIONS)
            if direction in carry for layer, pair in enumerate(carry[direction]) for name, value in zip("ch", pair)}


def num_tries(ids: np.ndarray, expected_counts: np.ndarray, n_vocab: int) -> int:
    """The number of draws behind TensorFlow's expected counts for a unique log-uniform sample:
    count = 1 - (1 - p) ** tries (or p * tries when no draw was repeated), so tries =
    log1p(-count) / log1p(-p), read off the ids whose counts are small (accurately stored)."""
    p = np.log1p(1.0 / (ids + 1.0)) / np.log(n_vocab + 1.0)
    if np.allclose(expected_counts, p * len(ids), rtol=1e-5):
        return len(ids)
    small = expected_counts < 0.5
    return int(np.round(np.median(np.log1p(-expected_counts[small]) / np.log1p(-p[small]))))


def trainer_for(record: Record) -> Trainer:
    """A Trainer of the record's options (bilm-tf's options.json) on one device."""
    config = config_lib.config_from_options_json(record.options, source=record.path)
    return Trainer(config, record.options["n_tokens_vocab"], Mesh(np.array(jax.devices()[:1]), ("data",)))


def initial_state(trainer, record: Record, prefix: str = "init"):
    """A TrainState holding bilm-tf's variables and Adagrad accumulators under `prefix`."""
    variables = record.variables(prefix)
    share = bool(record.options.get("share_embedding_softmax", False))
    params = tf_variables.params_from_tf(variables, trainer.options, share, source=record.path)
    accumulators = tf_variables.params_from_tf(variables, trainer.options, share, slot=tf_variables.ADAGRAD_SLOT,
                                               source=record.path)
    return trainer.create_state(jax.random.PRNGKey(0), params, accumulators=accumulators)


@contextlib.contextmanager
def given_dropout_masks(masks: dict):
    """Inside, elmojax's Dropout modules apply the given keep masks (by module path) as bilm-tf
    does, x * (1 / keep_prob) * mask, instead of drawing their own."""
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, Dropout) or context.method_name != "__call__" or module.path not in masks:
            return next_fun(*args, **kwargs)
        x = args[0]
        keep_prob = 1.0 - module.rate
        return x * (1.0 / keep_prob) * jnp.reshape(masks[module.path], x.shape).astype(x.dtype)

    with nn.intercept_methods(interceptor):
        yield


def replay_step_fn(trainer):
    """train_step as a jitted function of (state, batch, negatives, dropout masks)."""
    def step(state, batch, samples, masks):
        with given_dropout_masks(masks):
            return train_step(state, batch, model=trainer.model, tx=trainer.tx, settings=trainer.settings,
                              samples=samples)

    return jax.jit(step, donate_argnums=(0,))


def first_step_gradients(trainer, record: Record) -> dict:
    """elmojax's gradients of the first step, as TensorFlow variables (dense)."""
    state = initial_state(trainer, record)
    batch = trainer.put_batch(record.batch(1))
    with given_dropout_masks(record.masks(1)):
        grads, _ = jax.grad(training_loss, has_aux=True)(state.params, batch, state.lstm_state, state.rng,
                                                         record.samples(1), model=trainer.model,
                                                         settings=trainer.settings)
    return as_tf_variables(jax.device_get(grads), trainer, record)


def as_tf_variables(params: dict, trainer, record: Record, slot: str = "") -> dict:
    """The trainer's params (or a tree shaped like them) as TensorFlow variables by name."""
    share = bool(record.options.get("share_embedding_softmax", False))
    out = {}
    for name, path, shape in tf_variables.tf_layout(trainer.options, share):
        value = hdf5.take(params, path, shape, trainer.options, "params")
        out[f"{name}/{slot}" if slot else name] = np.asarray(value)
    return out


def replay(record: Record, steps: Optional[int] = None, trainer=None, perturbation: float = 0.0):
    """elmojax on the record's batches from bilm-tf's initial variables: per step (loss, grad
    norm), and at each snapshot step the variables (and Adagrad slots) by TensorFlow name.
    `perturbation` multiplies each initial weight by 1 + perturbation * N(0, 1)
    (a fixed draw): a run as far from elmojax's own as rounding would put it, a yardstick for
    how much a trajectory amplifies float32 differences."""
    trainer = trainer or trainer_for(record)
    steps = min(steps or record.steps, record.steps)
    step_fn = replay_step_fn(trainer)
    state = initial_state(trainer, record)
    if perturbation:
        noise = np.random.default_rng(0)
        state = state.replace(params=jax.tree.map(
            lambda x: x * (1 + perturbation * noise.standard_normal(x.shape)).astype(np.float32), state.params))
    losses, norms, snapshots = [], [], {}
    for k in range(1, steps + 1):
        state, metrics = step_fn(state, trainer.put_batch(record.batch(k)), record.samples(k), record.masks(k))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
        if k in record.snapshots():
            params = jax.device_get(state.params)
            accumulators = jax.device_get(state.opt_state[1][0].sum_of_squares)
            snapshots[k] = {**as_tf_variables(params, trainer, record),
                            **as_tf_variables(accumulators, trainer, record, slot=tf_variables.ADAGRAD_SLOT),
                            **carry_arrays(jax.device_get(state.lstm_state), "lstm_state")}
    return np.array(losses), np.array(norms), snapshots


def relative_difference(got, want) -> float:
    """|got - want| / max|want| over one array (0 for two zero arrays)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.max(np.abs(want))
    diff = np.max(np.abs(got - want)) if got.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def expected_count_difference(record: Record) -> float:
    """elmojax's expected counts (from the recovered number of draws) against TensorFlow's."""
    worst_relative = 0.0
    n_vocab = record.options["n_tokens_vocab"]
    for k in range(1, record.steps + 1):
        for d, (ids, tries) in enumerate(record.samples(k).values()):
            got = np.asarray(softmax.sampler_expected_counts(ids, tries, n_vocab, len(ids)))
            want = record.arrays[f"sampled/sampled_expected_count/{d}"][k - 1]
            worst_relative = max(worst_relative, float(np.max(np.abs(got - want) / want)))
    return worst_relative
