"""The pair buffer behind a direction's windows: the loaded sentences' (input, target) pairs
laid out in stream order.

A sentence of n words gives n + 1 pairs: inputs [<S>, w1..wn] and targets [w1..wn, </S>]
forward, inputs [</S>, wn..w1] and targets [wn..w1, <S>] backward. Placing a shard's sentences
appends their pairs to flat arrays, one sentence after the other in the order the stream takes
them, so that a row's window is at most two contiguous runs (the rest of its current sentence,
then the next sentences of the stream) and a whole batch is one gather. Pairs no row can use
again are dropped from the front when the next shard is placed; addresses stay absolute.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from elmojax.data.shards import Shard
from elmojax.formats.vocab import Vocabulary

NO_BAD = 1 << 62  # Placed.first_bad's answer when no sentence ahead is unencodable


class Placed:
    """Sentences of one shard (`order`: their indices, in stream order) placed in a buffer:
    the pairs of the k-th are at addresses off[k] .. off[k + 1] - 1. `bad`: the positions (in
    `order`) of sentences the vocabulary cannot encode, sorted."""

    __slots__ = ("shard", "order", "off", "n", "bad")

    def __init__(self, shard: int, order: np.ndarray, off: list[int], bad: np.ndarray):
        self.shard, self.order, self.off, self.n, self.bad = shard, order, off, len(order), bad

    def first_bad(self, k: int) -> int:
        """The first position >= k of a sentence the vocabulary cannot encode (NO_BAD if none)."""
        if not len(self.bad):
            return NO_BAD
        i = int(np.searchsorted(self.bad, k))
        return int(self.bad[i]) if i < len(self.bad) else NO_BAD


class PairBuffer:
    """Inputs (vocabulary ids + 1) and targets of the pairs at addresses base, base + 1, ...,
    end - 1, then one padding pair (0, 0) at `padding` (an index into the arrays). For character
    inputs, the pairs whose input is <UNK> spelled as its own word (not as the vocabulary's
    <UNK> row) are kept aside: their addresses and char ids + 1."""

    def __init__(self, vocab: Vocabulary, reverse: bool, max_characters_per_token: Optional[int]):
        self.vocab = vocab
        self.reverse = reverse
        self.use_chars = max_characters_per_token is not None
        self.base = 0
        self.inputs = np.zeros(1, np.int32)
        self.targets = np.zeros(1, np.int32)
        self.spelled_at = np.zeros(0, np.int64)
        self.spelled = np.zeros((0, max_characters_per_token or 0), np.int32)

    @property
    def end(self) -> int:
        """The address after the last pair placed."""
        return self.base + len(self.inputs) - 1

    @property
    def padding(self) -> int:
        return len(self.inputs) - 1

    def place(self, shard: int, encoded: Shard, order: np.ndarray, keep_from: int) -> Placed:
        """Appends the pairs of sentences `order` of a shard, dropping the pairs before address
        `keep_from` (none of which may be used again)."""
        order = np.asarray(order, dtype=np.int64)
        lengths = encoded.lengths[order]
        pairs = lengths + 1
        off = np.zeros(len(order) + 1, np.int64)
        np.cumsum(pairs, out=off[1:])
        heads = off[:-1]
        within = np.arange(off[-1], dtype=np.int64) - np.repeat(heads, pairs)
        vocab = self.vocab
        if self.reverse:  # [</S>, wn .. w1, <S>]
            target_word = np.repeat(encoded.starts[order] + lengths - 1, pairs) - within
            input_word = target_word + 1
            first, last = vocab.eos, vocab.bos
        else:  # [<S>, w1 .. wn, </S>]
            target_word = np.repeat(encoded.starts[order], pairs) + within
            input_word = target_word - 1
            first, last = vocab.bos, vocab.eos
        # Out-of-sentence word positions (-1 or the next sentence's) are overwritten by <S>/</S>.
        targets = encoded.words[target_word]
        targets[off[1:] - 1] = last
        inputs = encoded.words[input_word]
        inputs[heads] = first
        inputs += 1
        start = self.end
        drop = keep_from - self.base
        self.inputs = np.concatenate([self.inputs[drop:-1], inputs, np.zeros(1, np.int32)])
        self.targets = np.concatenate([self.targets[drop:-1], targets, np.zeros(1, np.int32)])
        if self.use_chars:
            kept = int(np.searchsorted(self.spelled_at, keep_from))
            if len(encoded.spelled_at):
                row = np.full(len(encoded.words), -1, np.int64)
                row[encoded.spelled_at] = encoded.spelled_rows
                row = row[input_word]
                row[heads] = -1
                at = np.flatnonzero(row >= 0)
                self.spelled_at = np.concatenate([self.spelled_at[kept:], at + start])
                self.spelled = np.concatenate([self.spelled[kept:], encoded.spelled[row[at]]])
            elif kept:
                self.spelled_at, self.spelled = self.spelled_at[kept:], self.spelled[kept:]
        self.base = keep_from
        bad = np.flatnonzero(np.isin(order, encoded.bad)) if len(encoded.bad) else encoded.bad
        return Placed(shard, order, (off + start).tolist(), bad)

    def spell(self, char_ids: np.ndarray, token_ids: np.ndarray, index: np.ndarray) -> None:
        """Writes into `char_ids` the spelling of the <UNK> inputs that spell their own word;
        `index`: the arrays' indices the batch's `token_ids` were gathered from."""
        if not len(self.spelled_at):
            return
        unknown = np.flatnonzero(token_ids == self.vocab.unk + 1)
        if not len(unknown):
            return
        address = index.ravel()[unknown] + self.base
        found = np.searchsorted(self.spelled_at, address)
        np.minimum(found, len(self.spelled_at) - 1, out=found)
        hit = self.spelled_at[found] == address
        char_ids.reshape(-1, char_ids.shape[-1])[unknown[hit]] = self.spelled[found[hit]]
