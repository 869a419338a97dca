"""What reaches a train or eval step: a typed batch, and the one function that builds it.

The datasets (elmojax.data) yield host batches, dicts of NumPy arrays named as bilm-tf names
them (`token_ids`, `char_ids`, `next_token_id`, `weights`, with `_reverse` for the backward
stream: elmojax.formats.directions). `host_arrays` lays one out as the step takes it, in NumPy
(the prefetching thread's work), and `to_device` puts it on the devices as a `Batch`: each
direction's `Stream`, and for character inputs the batch's distinct tokens, so that the char CNN
runs once per distinct token.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import numpy as np
from jax.sharding import NamedSharding

from elmojax.formats.directions import DIRECTIONS, FORWARD, host_suffix
from elmojax.model.char_ids import CharShapes, full_shapes, pack_chars


class Stream(flax.struct.PyTreeNode):
    """One direction's inputs and targets, (batch, unroll_steps) each."""
    weights: jax.Array                  # 1.0 on real positions, 0.0 on padding
    next_token_id: jax.Array            # softmax classes (vocabulary ids), 0 where padded
    token_ids: Optional[jax.Array] = None    # word inputs: vocabulary ids + 1, 0 = padding
    token_index: Optional[jax.Array] = None  # character inputs: rows of Batch.distinct_char_ids


class Batch(flax.struct.PyTreeNode):
    forward: Stream
    backward: Optional[Stream] = None
    distinct_char_ids: Optional[jax.Array] = None   # (n short, width): character ids + 1
    distinct_tail_ids: Optional[jax.Array] = None   # (n short,): see trim_char_ids; None at full width
    distinct_long_char_ids: Optional[jax.Array] = None  # (n long, max characters): tokens too long to cut

    def stream(self, direction: str) -> Stream:
        return self.forward if direction == FORWARD else self.backward


def stacked_char_ids(host: dict) -> np.ndarray:
    """A host batch's char ids, both streams stacked: what its distinct tokens come from."""
    return np.stack([np.asarray(host["char_ids" + host_suffix(d)]) for d in DIRECTIONS
                     if "char_ids" + host_suffix(d) in host])


def host_arrays(host: dict, shapes: Optional[CharShapes], max_width: Optional[int], n_local_devices: int,
                n_processes: int = 1) -> dict:
    """A host batch as to_device takes it (NumPy): each direction's stream, and for character
    inputs (`max_width`, the char CNN's widest filter, not None) the batch's distinct tokens in
    `shapes`' layout (char_ids.pack_chars) if they fit it, else in full_shapes, which every batch
    of its size fits. So a step meets two shapes at most, compiled once. With several processes,
    full_shapes always (every process's part must have the same shape), its index into the
    global table."""
    suffixes = {direction: host_suffix(direction) for direction in DIRECTIONS if "weights" + host_suffix(direction) in host}
    arrays: dict = {}
    if max_width is not None:
        stacked = stacked_char_ids(host)
        packed = None if shapes is None or n_processes > 1 else pack_chars(stacked, shapes, max_width)
        if packed is None:
            full = full_shapes(int(np.prod(stacked.shape[:-1])), stacked.shape[-1], n_local_devices)
            packed = pack_chars(stacked, full, max_width)
        index = packed.index
        if n_processes > 1:  # index into the global table: this process's part comes at its offset
            index = index + jax.process_index() * len(packed.short)
        arrays.update(distinct_char_ids=packed.short, distinct_tail_ids=packed.tails,
                      distinct_long_char_ids=packed.long)
    for k, (direction, suffix) in enumerate(suffixes.items()):
        stream = {"weights": host["weights" + suffix], "next_token_id": host["next_token_id" + suffix]}
        if max_width is None:
            stream["token_ids"] = host["token_ids" + suffix]
        else:
            stream["token_index"] = index[k]
        arrays[direction] = {name: np.asarray(value) for name, value in stream.items()}
    return arrays


def to_device(arrays: dict, sharding: NamedSharding) -> Batch:
    """host_arrays' batch as a Batch sharded along the batch axis (`sharding`, over a 'data'
    mesh); with several processes, each passes its own rows of the global batch."""
    mesh = sharding.mesh
    if mesh.devices.size == len(mesh.local_devices):
        arrays = jax.device_put(arrays, sharding)
    else:
        arrays = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), arrays)
    streams = {d: Stream(**arrays.pop(d)) for d in DIRECTIONS if d in arrays}
    return Batch(**streams, **arrays)
