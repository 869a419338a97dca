"""The datasets a run reads: one direction (LMDataset) or both (BidirectionalLMDataset), as a
run's `Streams` ask for them (make_dataset).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from elmojax.data.windows import Batches, HostBatch, LMDataset, resolve_vocab
from elmojax.formats.directions import BACKWARD, FORWARD, REVERSE_SUFFIX
from elmojax.formats.vocab import Vocabulary


class BidirectionalLMDataset(Batches):
    """A forward and a backward LMDataset over the same shards, batched together.

    Each batch holds the forward arrays ('token_ids', 'char_ids', 'next_token_id', 'weights')
    and the backward ones with the suffix '_reverse'. The two streams shuffle independently
    (as in bilm-tf). When testing, both read the same sentences in the same order, so they end
    together; should one end first, its arrays are padding until the other ends.
    """

    def __init__(self, pattern: str, vocab: Union[str, Vocabulary], batch_size: int, unroll_steps: int,
                 test: bool = False, seed: int = 0, max_characters_per_token: Optional[int] = None,
                 shard_subset: tuple[int, int] = (0, 1)):
        vocab = resolve_vocab(vocab, max_characters_per_token)
        kwargs = dict(batch_size=batch_size, unroll_steps=unroll_steps, test=test, seed=seed,
                      shard_subset=shard_subset)
        self.forward = LMDataset(pattern, vocab, reverse=False, **kwargs)
        self.backward = LMDataset(pattern, vocab, reverse=True, **kwargs)
        self.backward._share_with(self.forward)
        self.pattern = pattern
        self.shards = self.forward.shards
        self.vocab = vocab
        self.batch_size = self.forward.batch_size
        self.unroll_steps = self.forward.unroll_steps
        self.test = self.forward.test
        self.use_chars = self.forward.use_chars
        self.max_characters_per_token = self.forward.max_characters_per_token

    def next_batch(self) -> Optional[HostBatch]:
        forward, backward = self.forward.next_batch(), self.backward.next_batch()
        if forward is None and backward is None:
            return None
        batch = dict(forward if forward is not None else self.forward.empty_batch())
        backward = backward if backward is not None else self.backward.empty_batch()
        batch.update({key + REVERSE_SUFFIX: value for key, value in backward.items()})
        return batch


    def state_dict(self) -> dict:
        return {FORWARD: self.forward.state_dict(), BACKWARD: self.backward.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.forward.load_state_dict(state[FORWARD])
        self.backward.load_state_dict(state[BACKWARD])


@dataclasses.dataclass(frozen=True)
class Streams:
    """What a run's batches hold: the backward stream too (bidirectional) or the forward one
    alone, and characters of max_characters_per_token a token or (None) word ids."""
    bidirectional: bool = True
    max_characters_per_token: Optional[int] = None


def make_dataset(streams: Streams, vocab, prefix: str, batch_size: int, unroll_steps: int, test: bool,
                 seed: int = 0, shard_subset: tuple[int, int] = (0, 1)):
    """The dataset of the files `prefix` matches, with the streams a run reads."""
    if not prefix:
        raise ValueError("no data: set --config.data.train_prefix=GLOB (and heldout_prefix for evaluation)")
    cls = BidirectionalLMDataset if streams.bidirectional else LMDataset
    return cls(prefix, vocab, batch_size, unroll_steps, test=test, seed=seed,
               max_characters_per_token=streams.max_characters_per_token, shard_subset=shard_subset)
