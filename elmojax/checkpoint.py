"""Training checkpoints with orbax: the train state (params, optimizer state, step, PRNG key,
LSTM carry) plus JSON metadata (the data stream's position, the options, the vocabulary)."""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def data_position_file(workdir: str, step: int, process_index: int) -> str:
    """Where a process of a multi-process run keeps its data stream's position at a step (each
    reads its own shards, so each has its own position)."""
    return os.path.join(checkpoint_dir(workdir), "data_positions", f"step_{step}.process_{process_index}.json")


def latest_step(workdir: str) -> Optional[int]:
    manager = _manager(workdir, create=False)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def _manager(workdir: str, keep: Optional[int] = None, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


class Checkpointer:
    """Saves the train state and its metadata at the steps it is given, keeping the last `keep`."""

    def __init__(self, workdir: str, keep: int = 3):
        self._manager = _manager(workdir, keep)

    def save(self, step: int, state: Any, meta: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _restore(workdir: str, step: Optional[int], **items) -> tuple[int, Any]:
    """The latest (or the given) step and the restored items of a workdir's checkpoint."""
    manager = _manager(workdir, create=False)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"{workdir}: no checkpoint found in {checkpoint_dir(workdir)}")
        return step, manager.restore(step, args=ocp.args.Composite(**items))
    finally:
        manager.close()


def restore_meta(workdir: str, step: Optional[int] = None) -> tuple[int, dict]:
    """The step and the JSON metadata of the latest (or the given) checkpoint."""
    step, restored = _restore(workdir, step, meta=ocp.args.JsonRestore())
    return step, restored.meta


def restore_state(workdir: str, target: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores the state into the structure, shapes and shardings of `target` (arrays or
    jax.ShapeDtypeStruct leaves), and the metadata."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    _, restored = _restore(workdir, step, state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    return restored.state, restored.meta
