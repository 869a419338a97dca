"""What reaches a train or eval step: a typed batch, and the one function that builds it.

The datasets (elmojax.data) yield host batches, dicts of NumPy arrays named as bilm-tf names
them (`token_ids`, `char_ids`, `next_token_id`, `weights`, with `_reverse` for the backward
stream: elmojax.formats.directions). `to_device` turns one into a `Batch` on the devices: each
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
from elmojax.model.char_ids import distinct_tokens, trim_char_ids


class Stream(flax.struct.PyTreeNode):
    """One direction's inputs and targets, (batch, unroll_steps) each."""
    weights: jax.Array                  # 1.0 on real positions, 0.0 on padding
    next_token_id: jax.Array            # softmax classes (vocabulary ids), 0 where padded
    token_ids: Optional[jax.Array] = None    # word inputs: vocabulary ids + 1, 0 = padding
    token_index: Optional[jax.Array] = None  # character inputs: rows of Batch.distinct_char_ids


class Batch(flax.struct.PyTreeNode):
    forward: Stream
    backward: Optional[Stream] = None
    distinct_char_ids: Optional[jax.Array] = None   # (n distinct, width): character ids + 1
    distinct_tail_ids: Optional[jax.Array] = None   # see trim_char_ids

    def stream(self, direction: str) -> Stream:
        return self.forward if direction == FORWARD else self.backward


def to_device(host: dict, sharding: NamedSharding, max_width: Optional[int] = None) -> Batch:
    """The host batch as a Batch sharded along the batch axis (`sharding`, over a 'data' mesh);
    with several processes, each passes its own rows of the global batch. `max_width`, the char
    CNN's widest filter, is given for character inputs.

    Character inputs go as the batch's distinct tokens (both streams) and an index into them per
    position. Their number is padded to a power of two (few shapes to compile); with several
    processes, to one fixed size, so that every process's part has the same shape. With one
    process their char ids are also cut short past the longest word (trim_char_ids): the CNN
    does not convolve the padding characters.
    """
    mesh = sharding.mesh
    n_processes = mesh.devices.size // len(mesh.local_devices)  # does the mesh span other processes?
    suffixes = {direction: host_suffix(direction) for direction in DIRECTIONS if "weights" + host_suffix(direction) in host}
    arrays: dict = {}
    if max_width is not None:
        stacked = np.stack([np.asarray(host["char_ids" + s]) for s in suffixes.values()])
        fixed = int(np.prod(stacked.shape[:-1])) if n_processes > 1 else None
        distinct, index = distinct_tokens(stacked, size=fixed, multiple=len(mesh.local_devices))
        if n_processes > 1:  # index into the global table: this process's part comes at its offset
            index += jax.process_index() * len(distinct)
        else:  # with several, every process's part must have the same width
            distinct, tail_ids = trim_char_ids(distinct, max_width)
            if tail_ids is not None:
                arrays["distinct_tail_ids"] = tail_ids
        arrays["distinct_char_ids"] = distinct
    for k, (direction, suffix) in enumerate(suffixes.items()):
        stream = {"weights": host["weights" + suffix], "next_token_id": host["next_token_id" + suffix]}
        if max_width is None:
            stream["token_ids"] = host["token_ids" + suffix]
        else:
            stream["token_index"] = index[k]
        arrays[direction] = {name: np.asarray(value) for name, value in stream.items()}
    if n_processes == 1:
        arrays = jax.device_put(arrays, sharding)
    else:
        arrays = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), arrays)
    streams = {d: Stream(**arrays.pop(d)) for d in suffixes}
    return Batch(**streams, **arrays)
