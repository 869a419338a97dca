"""The trainer: a config's model, optimizer and jitted steps over a device mesh.

Data parallelism: a Mesh over all devices with one axis, 'data'. Batches and the LSTM carry are
sharded along the batch dimension, params and optimizer state replicated; one jitted step each
for training and evaluation (elmojax.train.step).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from elmojax.formats.options import BiLMOptions
from elmojax.model import numerics
from elmojax.model.bilm import BiLM, zero_state
from elmojax.model.char_ids import CharShapes, choose_shapes
from elmojax.train import config as config_lib
from elmojax.train.batch import Batch, host_arrays, stacked_char_ids, to_device
from elmojax.train.step import TrainState, eval_step, init_params, make_optimizer, new_state, train_step


class Trainer:
    """The model, optimizer, mesh and jitted steps for one config and vocabulary size."""

    def __init__(self, config: ml_collections.ConfigDict, n_vocab: int, mesh: Optional[Mesh] = None):
        self.config = config
        self.options: BiLMOptions = config_lib.bilm_options(config, n_vocab)
        if self.options.char_cnn is not None and config.model.share_embedding_softmax:
            raise ValueError("share_embedding_softmax needs word inputs: a char CNN has no softmax-sized "
                             "embedding table to share (as in bilm-tf)")
        self.settings = config_lib.step_settings(config, n_vocab)
        if self.settings.n_negative_samples_batch > n_vocab:
            raise ValueError(f"train.n_negative_samples_batch ({self.settings.n_negative_samples_batch}) exceeds "
                             f"the vocabulary ({n_vocab} tokens): the sampler draws distinct ids")
        self.model = BiLM(self.options, self.settings.use_character_inputs, dropout_rate=self.settings.dropout,
                          numerics=self.settings.numerics, scan_unroll=self.settings.scan_unroll)
        self.tx = make_optimizer(config_lib.optimizer_settings(config))
        self.mesh = mesh or Mesh(np.array(jax.devices()), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P("data"))
        self.n_devices = self.mesh.devices.size
        self.n_local_devices = len(self.mesh.local_devices)
        self.n_processes = self.n_devices // self.n_local_devices  # (> 1: the mesh spans other processes)
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
        return init_params(self.model, self.settings, rng)

    def create_state(self, rng: jax.Array, params: Optional[dict] = None, batch_size: Optional[int] = None,
                     accumulators: Optional[dict] = None) -> TrainState:
        """step.new_state on the mesh, for `batch_size` rows (default: the global batch), as one
        compiled program (run op by op, its hundred-odd operations would each compile)."""
        make = functools.partial(new_state, self.model, self.tx, self.settings, batch_size=batch_size or self.batch_size)
        return jax.jit(make, out_shardings=self.state_sharding)(rng, params=params, accumulators=accumulators)

    def abstract_state(self, batch_size: Optional[int] = None) -> TrainState:
        """create_state's shapes, dtypes and shardings (what a checkpoint restores into)."""
        shapes = jax.eval_shape(lambda: self.create_state(jax.random.PRNGKey(0), batch_size=batch_size))
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                            _broadcast_sharding(self.state_sharding, shapes))

    @property
    def max_width(self) -> Optional[int]:
        """The char CNN's widest filter (character inputs), else None."""
        return self.options.char_cnn.max_width if self.settings.use_character_inputs else None

    def char_shapes(self, host_batches: list[dict]) -> Optional[CharShapes]:
        """The layout for batches like these (char_ids.choose_shapes), None for word inputs or
        a mesh over several processes (whose batches keep one full layout)."""
        if self.max_width is None or self.n_processes > 1:
            return None
        samples = [stacked_char_ids(b) for b in host_batches]
        return choose_shapes(samples, self.max_width, self.n_local_devices)

    def stored_shapes(self, stored) -> Optional[CharShapes]:
        """A checkpoint's char layout (its meta's char_shapes) if this trainer's batches can take
        it, else None (a layout is then chosen anew)."""
        if self.max_width is None or not isinstance(stored, (list, tuple)) or len(stored) != 3:
            return None
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in stored):
            return None
        shapes = CharShapes(*stored)
        full, multiple = self.options.char_cnn.max_characters_per_token, self.n_local_devices
        fits = (self.max_width <= shapes.width <= full and shapes.n_short > 0 and shapes.n_short % multiple == 0
                and shapes.n_long % multiple == 0)
        return shapes if fits else None

    def host_arrays(self, host_batch: dict, shapes: Optional[CharShapes] = None) -> dict:
        """A host batch (elmojax.data) laid out as the steps take it, in `shapes` or else the full
        layout (batch.host_arrays): NumPy work, for a thread beside the steps."""
        return host_arrays(host_batch, shapes, self.max_width, self.n_local_devices, self.n_processes)

    def put_batch(self, host_batch: dict, shapes: Optional[CharShapes] = None) -> Batch:
        """A host batch on the devices, as the steps take it (host_arrays, batch.to_device)."""
        return self.put_arrays(self.host_arrays(host_batch, shapes))

    def put_arrays(self, arrays: dict) -> Batch:
        return to_device(arrays, self.sharded)

    def compile_train_step(self, state: TrainState, host_batch: dict, shapes: Optional[CharShapes]) -> None:
        """Compiles the train step for both layouts a batch of `host_batch`'s size may take with
        `shapes` (it and the full one), so that none compiles later in the run."""
        blank = {name: np.zeros_like(value) for name, value in host_batch.items()}  # fits every layout
        layouts = [self.host_arrays(blank)]
        if shapes is not None:
            layouts.append(self.host_arrays(blank, shapes))
        shapes_of = lambda arrays: [x.shape for x in jax.tree.leaves(arrays)]  # noqa: E731
        if len(layouts) == 2 and shapes_of(layouts[0]) == shapes_of(layouts[1]):
            layouts.pop()
        for arrays in layouts:
            self.train_step.lower(state, self.put_arrays(arrays)).compile()

    def zero_lstm_state(self, batch_size: int):
        return jax.device_put(zero_state(self.options, batch_size), self.sharded)


def _broadcast_sharding(prefix: TrainState, tree: TrainState) -> TrainState:
    return TrainState(**{f.name: jax.tree.map(lambda _: getattr(prefix, f.name), getattr(tree, f.name))
                         for f in dataclasses.fields(TrainState)})


def local_mesh() -> Mesh:
    """This process's devices: evaluation and export run on process 0 alone."""
    return Mesh(np.array(jax.local_devices()), ("data",))
