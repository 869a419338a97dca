"""Orbax checkpoints written before the LSTM's directions were stacked (forward_lstm/ and
backward_lstm/ params, elmojax at 144c12b) restore, export and train on; the fixture and that
code's own export of it were made by tests/fixtures/orbax_per_direction/make_fixture.sh."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import jax
import pytest
import numpy as np
from elmojax.formats.vocab import Vocabulary
from elmojax.train import checkpoint, loop, trained_models
from elmojax.train.trainer import Trainer

import tiny
from conftest import FIXTURES

FIXTURE = os.path.join(FIXTURES, "orbax_per_direction")
OLD_EXPORT = os.path.join(FIXTURE, "export_144c12b.hdf5")
OLD_ACCUMULATORS = os.path.join(FIXTURE, "accumulators_144c12b.npz")


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_old_checkpoint_exports_as_the_old_code_did(tmp_path):
    exported = trained_models.export(os.path.join(FIXTURE, "workdir"), str(tmp_path / "weights.hdf5"))
    old, new = _datasets(OLD_EXPORT), _datasets(str(tmp_path / "weights.hdf5"))
    assert sorted(old) == sorted(new) and any("RNN_1" in name for name in new)
    for name in old:
        np.testing.assert_array_equal(new[name], old[name], err_msg=name)
    softmax = _datasets(exported.softmax)
    assert softmax["softmax/W"].shape[0] == len(softmax["vocab"])


def test_old_checkpoint_restores_its_accumulators():
    """Adagrad's accumulators as the old code restored them, now stacked by direction."""
    workdir = os.path.join(FIXTURE, "workdir")
    trainer = Trainer(tiny.get_config(), Vocabulary(os.path.join(workdir, "vocab.txt")).size)
    step, state, _, _ = checkpoint.restore(workdir, lambda meta: trainer.abstract_state())
    assert step == 3
    sums = checkpoint.split_directions(jax.device_get(state.opt_state[1][0].sum_of_squares))
    got = {"/".join(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}
    want = np.load(OLD_ACCUMULATORS)
    assert sorted(got) == sorted(want) and any("backward_lstm" in k for k in got)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert max(float(np.max(v)) for v in want.values()) > 0.2  # trained: not the initial 0.1


@pytest.mark.slow  # a whole training run
def test_old_checkpoint_trains_on(tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(os.path.join(FIXTURE, "workdir"), workdir)
    config = tiny.get_config()
    config.train.max_steps = 5
    config.train.checkpoint_every = 5
    state = loop.train(config, str(workdir))
    assert int(state.step) == 5 and checkpoint.steps(str(workdir)) == [3, 5]
    with open(workdir / "checkpoints" / "5" / "meta" / "metadata", encoding="utf-8") as f:
        assert json.load(f)["params_layout"] == checkpoint.PARAMS_LAYOUT
    restored = trained_models.load_trained(str(workdir)).params  # the new step, in the new layout
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_split_and_stack_directions_invert_each_other():
    tree = {"bilm": {"embedder": {"w": np.ones(2)}, "lstm": {"layer_0": {"B": np.arange(6.0).reshape(2, 3)}}}}
    split = checkpoint.split_directions(tree)
    assert sorted(split["bilm"]) == ["backward_lstm", "embedder", "forward_lstm"]
    np.testing.assert_array_equal(split["bilm"]["backward_lstm"]["layer_0"]["B"], [3.0, 4.0, 5.0])
    again = checkpoint.stack_directions(split)
    np.testing.assert_array_equal(again["bilm"]["lstm"]["layer_0"]["B"], tree["bilm"]["lstm"]["layer_0"]["B"])


def test_listing_the_steps_waits_on_no_other_process(tmp_path, monkeypatch):
    """checkpoint.steps reads the directory: making an orbax CheckpointManager waits on the other
    processes, and processes that ask at different moments (one workdir made by another process
    just before) would wait at different barriers. Unfinished saves are not steps."""
    workdir = tmp_path / "workdir"
    shutil.copytree(os.path.join(FIXTURE, "workdir"), workdir)
    os.makedirs(workdir / "checkpoints" / "7.orbax-checkpoint-tmp-1")
    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", lambda *a, **k: pytest.fail("a CheckpointManager"))
    assert checkpoint.steps(str(workdir)) == sorted(int(n) for n in os.listdir(os.path.join(FIXTURE, "workdir",
                                                                                                 "checkpoints")))
