"""Training checkpoints with orbax, one step a directory of three items:

  state   the TrainState (params, optimizer state, step, PRNG key, LSTM carry)
  meta    JSON: the config, options.json, the global batch size, the char batches' layout
  data    each process's data stream position, data/process_<k>.json: it is saved and removed
          with the step it belongs to, so a restart reads on from exactly where that step was

Saves are synchronous: when `save` returns, the step is on disk, so a kill loses at most what
was trained since. A newest step that cannot be read (a damaged disk, a copy cut short) is
passed over with a warning for the one before it. A step that reads but holds another model
(its arrays' shapes, from orbax's metadata, are not this run's) is not damaged: restore raises
a CheckpointError naming the first differing array before reading any, and changes nothing.

meta records the params' layout (PARAMS_LAYOUT). Checkpoints written before the LSTM's
directions were stacked on a leading axis (no `params_layout`: forward_lstm/ and backward_lstm/
params) are restored in their own layout and stacked as they are read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shutil
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint._src import asyncio_utils

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
DAMAGED_PREFIX = "damaged-"  # a damaged step's directory is renamed so, out of orbax's sight
SAVE_MARGIN_BYTES = 256 << 10  # a checkpoint's metadata beyond its arrays, about
PARAMS_LAYOUT = "lstm-directions-stacked"  # meta's params_layout; absent: one LSTM stack per direction
_PER_DIRECTION = ("forward_lstm", "backward_lstm")


@dataclasses.dataclass(frozen=True)
class Meta:
    """A checkpoint's metadata: the run's config (as JSON text), its options.json, the global
    batch size it trained with, the params' layout (None: one LSTM stack per direction) and the
    char batches' layout its train step was compiled for (char_ids.CharShapes; a resumed run
    keeps it, and so compiles nothing new)."""
    config: str
    options: dict
    global_batch_size: int
    params_layout: Optional[str] = PARAMS_LAYOUT
    data: Optional[dict] = None  # older checkpoints kept the data position here, not in their data item
    char_shapes: Optional[list] = None

    def to_json(self) -> dict:
        out = {"config": self.config, "options": self.options, "global_batch_size": self.global_batch_size,
               "params_layout": self.params_layout}
        if self.char_shapes is not None:
            out["char_shapes"] = list(self.char_shapes)
        return out if self.data is None else {**out, "data": self.data}

    @classmethod
    def from_json(cls, d: dict) -> "Meta":
        """The metadata a checkpoint holds; a ValueError if it holds none that reads."""
        if not isinstance(d, dict) or "config" not in d:
            raise ValueError("its metadata has no config")
        return cls(d["config"], d.get("options", {}), d.get("global_batch_size"), d.get("params_layout"), d.get("data"),
                   d.get("char_shapes"))


class CheckpointError(ValueError):
    """A checkpoint could not be written or read; the message is one line for the user."""


def _run_until_all_done(coro):
    """orbax's way of running a coroutine in a fresh event loop, except that the loop is closed
    only once every task in it has finished. orbax's own closes it as soon as the first array
    read fails, and the reads still in flight then report "Event loop is closed" from
    TensorStore's threads, hundreds of traceback lines for one damaged file."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            asyncio.set_event_loop(None)
            loop.close()


if hasattr(asyncio_utils, "_run_sync_via_new_loop"):  # (orbax 0.12; elsewhere nothing to mend)
    asyncio_utils._run_sync_via_new_loop = _run_until_all_done


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def _data_handler() -> ocp.JsonCheckpointHandler:
    # every process writes its own file (orbax's JSON items are otherwise written by process 0)
    return ocp.JsonCheckpointHandler(filename=f"process_{jax.process_index()}.json",
                                     multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None))


def _manager(workdir: str, keep: Optional[int] = None, read_only: bool = False) -> ocp.CheckpointManager:
    # read_only: nothing is created (orbax's own read_only option logs at every use). orbax's
    # clean-up of unfinished saves runs in a thread that outlives a run stopped at once (a
    # traceback at exit); Checkpointer does it itself instead.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, cleanup_tmp_directories=False,
                                           enable_async_checkpointing=False)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(), "data": _data_handler()}
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def steps(workdir: str) -> list[int]:
    """The workdir's finished checkpoint steps, oldest first (none if it has no checkpoints).
    Read from the directory, without a CheckpointManager, whose making waits on the other
    processes: each process may ask at another moment (a workdir another one just made)."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return []
    return sorted(ocp.utils.checkpoint_steps(checkpoint_dir(workdir)))


class Checkpointer:
    """Saves the train state, its metadata and this process's data position at the steps it is
    given, keeping the last `keep`."""

    def __init__(self, workdir: str, keep: int = 3):
        self.workdir = workdir
        self._manager = _manager(workdir, keep)
        if jax.process_index() == 0:
            self._remove_unfinished()  # a save cut short by a kill

    def save(self, step: int, state: Any, meta: Meta, data_position: dict) -> None:
        """Writes the step; on failure (a full disk, say) removes what it wrote and raises a
        CheckpointError, the earlier steps untouched."""
        needed = int(1.1 * sum(x.nbytes for x in jax.tree.leaves(state))) + SAVE_MARGIN_BYTES
        free = shutil.disk_usage(checkpoint_dir(self.workdir)).free
        if free < needed:  # found before writing anything (tensorstore fails a full disk noisily)
            raise CheckpointError(f"{checkpoint_dir(self.workdir)}: no room for the checkpoint of step {step} "
                                  f"(it needs about {_megabytes(needed)}, {_megabytes(free)} are free); the "
                                  f"earlier checkpoints are intact")
        absl_log = logging.getLogger("absl")  # orbax logs its writer threads' failures with tracebacks
        level = absl_log.level
        absl_log.setLevel(logging.CRITICAL)
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta.to_json()),
                data=ocp.args.JsonSave(data_position)), force=True)
            self._manager.wait_until_finished()
        except Exception as e:  # tensorstore reports I/O failures as ValueError, the rest as OSError
            self._remove_unfinished()
            raise CheckpointError(f"{checkpoint_dir(self.workdir)}: could not write the checkpoint of step {step} "
                                  f"({_reason(e)}); the earlier checkpoints are intact") from None
        finally:
            absl_log.setLevel(level)

    def _remove_unfinished(self) -> None:
        """Removes what a failed save left (orbax writes a step under a temporary name first)."""
        directory = checkpoint_dir(self.workdir)
        for name in os.listdir(directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)

    def set_aside(self, step: int) -> str:
        """Renames a damaged step's directory (to DAMAGED_PREFIX + step, or + step.N if that is
        taken): kept for a look, and out of the way of the step's next save. Returns its new path."""
        directory = checkpoint_dir(self.workdir)
        target = os.path.join(directory, f"{DAMAGED_PREFIX}{step}")
        n = 1
        while os.path.exists(target):
            target = os.path.join(directory, f"{DAMAGED_PREFIX}{step}.{n}")
            n += 1
        if jax.process_index() == 0:
            os.replace(os.path.join(directory, str(step)), target)
        self._manager.reload()
        return target

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _reason(error: Exception) -> str:
    """What went wrong, briefly: the operating system's words where it says, else TensorStore's
    innermost error (orbax wraps it in a message holding the whole TensorStore spec)."""
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if code:
        return os.strerror(int(code.group(1)))
    innermost = error
    while innermost.__cause__ is not None or innermost.__context__ is not None:
        innermost = innermost.__cause__ or innermost.__context__
    text = " ".join(str(innermost if "TensorStore" in str(error) else error).split())
    text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
    return text[:300] or type(error).__name__


def _paths(tree: Any) -> dict[str, tuple]:
    """{'params/softmax/W': shape} for every array of a tree (abstract or orbax's metadata)."""
    def name(entry) -> str:
        return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))

    return {"/".join(map(name, path)): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if hasattr(leaf, "shape")}


def _mismatch(manager: ocp.CheckpointManager, step: int, abstract: Any) -> Optional[str]:
    """The first array whose shape in the checkpoint's metadata differs from the abstract
    state's (or that only one of them has), as one phrase; None if all agree."""
    stored = manager.item_metadata(step)["state"]
    saved, ours = _paths(getattr(stored, "tree", stored)), _paths(abstract)
    for path in sorted(set(saved) | set(ours)):
        if saved.get(path) != ours.get(path):
            then = saved[path] if path in saved else "nothing"
            now = ours[path] if path in ours else "nothing"
            return f"{path} is {then} in the checkpoint and {now} in this run"
    return None


def read_meta(workdir: str) -> Optional[Meta]:
    """The metadata (config, options.json, global batch size) of the workdir's newest checkpoint
    whose metadata reads; None if there is none. Reads no arrays."""
    found = steps(workdir)
    if not found:
        return None
    manager = _manager(workdir, read_only=True)
    try:
        for step in reversed(found):
            try:
                return _read_meta(manager, step)
            except Exception:  # a damaged step: the one before it may do
                continue
    finally:
        manager.close()
    return None


def _read_meta(manager: ocp.CheckpointManager, step: int) -> Meta:
    return Meta.from_json(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def restore(workdir: str, abstract_state: Callable[[Meta], Any], on_damaged: Optional[Callable[[int], str]] = None
            ) -> tuple[int, Any, Meta, Optional[dict]]:
    """(step, state, meta, this process's data position) of the newest checkpoint that reads.

    `abstract_state(meta)` gives the structure, shapes and shardings to restore the state into
    (jax.ShapeDtypeStruct leaves); it may raise a CheckpointError to refuse the checkpoint. A
    step whose arrays have other shapes (another model or vocabulary) is refused the same way,
    before anything is read. A step that fails to read (proven damage) is passed over for the
    one before it; once one reads, each step passed over is named in a warning and given to
    `on_damaged(step)` (which returns where it put it). If none reads, a CheckpointError names
    the first failure, and nothing is changed.
    """
    found = steps(workdir)
    if not found:
        raise CheckpointError(f"{workdir}: no checkpoint found in {checkpoint_dir(workdir)}")
    manager = _manager(workdir, read_only=True)
    failures = []
    try:
        for step in reversed(found):
            try:
                meta = _read_meta(manager, step)
                abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state(meta))
                per_direction = meta.params_layout != PARAMS_LAYOUT
                if per_direction:
                    abstract = split_directions(abstract)
                mismatch = _mismatch(manager, step, abstract)
                if mismatch:
                    raise CheckpointError(f"{checkpoint_dir(workdir)}: checkpoint step {step} holds another model "
                                          f"than this run's ({mismatch}); nothing was changed")
                items = {"state": ocp.args.StandardRestore(abstract)}
                has_data = os.path.isdir(os.path.join(checkpoint_dir(workdir), str(step), "data"))
                if has_data:
                    items["data"] = ocp.args.JsonRestore()
                restored = manager.restore(step, args=ocp.args.Composite(**items))
            except CheckpointError:
                raise
            except Exception as e:  # orbax and tensorstore raise many kinds; each means this step is unusable
                failures.append((step, _reason(e)))
                continue
            for damaged, reason in failures:  # set aside only once an older step has read
                moved = on_damaged(damaged) if on_damaged is not None else None
                log.warning("warning: checkpoint step %d in %s cannot be read (%s)%s; using step %d", damaged,
                            checkpoint_dir(workdir), reason, f"; set aside as {moved}" if moved else "", step)
            data_position = restored.data if has_data else meta.data
            state = stack_directions(restored.state) if per_direction else restored.state
            if per_direction:
                log.info("checkpoint step %d in %s has one LSTM param tree per direction (elmojax before "
                         "they were stacked); read into the stacked layout", step, checkpoint_dir(workdir))
            return step, state, meta, data_position
    finally:
        manager.close()
    step, reason = failures[0]
    raise CheckpointError(f"{checkpoint_dir(workdir)}: no checkpoint can be read (steps {', '.join(map(str, found))}; "
                          f"step {step}: {reason}); nothing was changed")


def _map_bilm_params(tree: Any, key: str, f: Callable[[dict], dict]) -> Any:
    """`tree` with f applied to every dict node holding `key` (the biLM's params, in the train
    state's params and in each of the optimizer's trees shaped like them)."""
    return jax.tree.map(lambda node: f(node) if isinstance(node, dict) and key in node else node, tree,
                        is_leaf=lambda node: isinstance(node, dict) and key in node)


def split_directions(tree: Any) -> Any:
    """The params' stacked LSTM (lstm/layer_i/*, a leading direction axis) as the per-direction
    trees older checkpoints hold (forward_lstm/, backward_lstm/); leaves may be abstract."""
    def unstack(leaf, d):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=leaf.sharding)
        return leaf[d]

    def split(node: dict) -> dict:
        lstm = node["lstm"]
        n = jax.tree.leaves(lstm)[0].shape[0]
        rest = {k: v for k, v in node.items() if k != "lstm"}
        return {**rest, **{_PER_DIRECTION[d]: jax.tree.map(lambda leaf: unstack(leaf, d), lstm) for d in range(n)}}

    return _map_bilm_params(tree, "lstm", split)


def stack_directions(tree: Any) -> Any:
    """The inverse of split_directions (on arrays)."""
    def stack(node: dict) -> dict:
        present = [node[k] for k in _PER_DIRECTION if k in node]
        rest = {k: v for k, v in node.items() if k not in _PER_DIRECTION}
        return {**rest, "lstm": jax.tree.map(lambda *xs: jnp.stack(xs), *present)}

    return _map_bilm_params(tree, "forward_lstm", stack)
