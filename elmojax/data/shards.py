"""Shards: the files of a dataset, and each one read and encoded as arrays of vocabulary ids.

A shard is read and encoded once when it is loaded: the words of its sentences become one flat
array of vocabulary ids (`Shard`); `ShardCache` keeps the last ones loaded, so that a small
corpus is not encoded again every pass.
"""

from __future__ import annotations

import glob
import os
from collections import OrderedDict
from itertools import chain
from typing import Optional

import numpy as np

from elmojax.formats import files
from elmojax.formats.vocab import UNK, Vocabulary

def list_shards(pattern: str) -> list[str]:
    """The files matching a glob pattern, sorted; an error naming the pattern if there are none."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no files match the dataset pattern {pattern!r}")
    return paths


def subset(shards: list[str], pattern: str, subset: tuple[int, int]) -> list[str]:
    """Shards index, index + count, ...: one process's share when several read the data."""
    index, count = subset
    if not 0 <= index < count:
        raise ValueError(f"shard_subset {subset}: need 0 <= index < count")
    if len(shards) < count:
        raise ValueError(f"the dataset pattern {pattern!r} matches {len(shards)} shard(s), fewer than the "
                         f"{count} processes that share them; split the data into at least {count} shards")
    return shards[index::count]


def count_tokens(pattern: str) -> int:
    """Number of words in a dataset (no <S>/</S>), as bilm-tf's n_train_tokens counts them."""
    return sum(len(line.split()) for path in list_shards(pattern) for _, line in files.read_lines(path))


def read_sentences(path: str) -> tuple[list[str], list[int]]:
    """The non-blank lines of a shard and their 1-based line numbers."""
    sentences: list[str] = []
    line_numbers: list[int] = []
    for number, line in files.read_lines(path):
        if line.strip():
            sentences.append(line)
            line_numbers.append(number)
    return sentences, line_numbers


_LINES_PER_CHUNK = 8192  # lines split at a time while encoding, to bound the memory of word strings


class WordIds(dict):
    """word -> vocabulary id, looked up with vocab.word_to_id the first time a word is seen.

    -1 stands for a word the vocabulary cannot encode (it has no <UNK>). With `spell`, each word
    that becomes <UNK> (other than a literal <UNK>) is spelled once: `spelled` maps it to its row
    in `rows` (vocab.word_to_char_ids, as the character inputs must spell the real word).
    """

    def __init__(self, vocab: Vocabulary, spell: bool):
        super().__init__()
        self.vocab = vocab
        self.unk = vocab.unk
        self.spell = spell
        self.spelled: dict[str, int] = {}
        self.rows: list[np.ndarray] = []

    def __missing__(self, word: str) -> int:
        try:
            index = self.vocab.word_to_id(word)
        except KeyError:
            index = -1
        if self.spell and index >= 0 and index == self.unk and word != UNK:
            self.spelled[word] = len(self.rows)
            self.rows.append(self.vocab.word_to_char_ids(word))
        self[word] = index
        return index


class Shard:
    """A shard's sentences (its non-blank lines, in file order) as flat vocabulary ids.

    words: the ids of all words, sentence after sentence, then one spare 0 (so that reading one
    past either end of a sentence stays in bounds); sentence s is words[starts[s]:starts[s + 1]].
    bad: sentences with a word the vocabulary cannot encode. spelled_at / spelled_rows: the word
    positions that are <UNK> as ids but spelled as themselves, and their rows of `spelled` (char
    ids + 1).
    """

    __slots__ = ("words", "starts", "lengths", "line_numbers", "bad", "spelled_at", "spelled_rows", "spelled")

    @property
    def n(self) -> int:
        return len(self.lengths)


def encode_shard(path: str, vocab: Vocabulary, spell: bool) -> Shard:
    lines = files.read_text(path).split("\n")  # the lines read_lines gives (in one go: a shard is large)
    word_ids = WordIds(vocab, spell)
    lookup = word_ids.__getitem__
    id_parts, length_parts, number_parts = [], [], []
    spelled_at: list[int] = []
    spelled_rows: list[int] = []
    n_words = 0
    for first in range(0, len(lines), _LINES_PER_CHUNK):
        split = [line.split() for line in lines[first:first + _LINES_PER_CHUNK]]
        lengths = np.fromiter(map(len, split), np.int64, len(split))
        kept = np.flatnonzero(lengths)  # blank lines are skipped
        flat = list(chain.from_iterable(split))
        del split
        ids = np.fromiter(map(lookup, flat), np.int32, len(flat))
        if word_ids.spelled:
            for p in np.flatnonzero(ids == word_ids.unk).tolist():
                row = word_ids.spelled.get(flat[p])
                if row is not None:
                    spelled_at.append(n_words + p)
                    spelled_rows.append(row)
        id_parts.append(ids)
        length_parts.append(lengths[kept])
        number_parts.append(kept + first + 1)
        n_words += len(flat)
    shard = Shard()
    shard.words = np.concatenate(id_parts + [np.zeros(1, np.int32)])
    shard.lengths = np.concatenate(length_parts) if length_parts else np.zeros(0, np.int64)
    shard.line_numbers = np.concatenate(number_parts) if number_parts else np.zeros(0, np.int64)
    shard.starts = np.zeros(len(shard.lengths) + 1, np.int64)
    np.cumsum(shard.lengths, out=shard.starts[1:])
    unknown = np.flatnonzero(shard.words[:n_words] < 0)
    shard.bad = np.unique(np.searchsorted(shard.starts, unknown, side="right") - 1)
    shard.spelled_at = np.array(spelled_at, np.int64)
    shard.spelled_rows = np.array(spelled_rows, np.int64)
    if spell:
        width = vocab.max_word_length
        shard.spelled = (np.stack(word_ids.rows).astype(np.int32) + 1 if word_ids.rows
                         else np.zeros((0, width), np.int32))
    return shard


class ShardCache:
    """The encoded shards last loaded, shared by the datasets of one vocabulary (each kept while
    its file is unchanged, so that a small corpus is not encoded again every pass)."""

    CAPACITY = 2

    def __init__(self, vocab: Vocabulary, use_chars: bool):
        self.vocab = vocab
        self.use_chars = use_chars
        self._shards: OrderedDict = OrderedDict()

    def shard(self, path: str) -> Shard:
        st = os.stat(path)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        cached = self._shards.get(path)
        if cached is not None and cached[0] == stamp:
            self._shards.move_to_end(path)
            return cached[1]
        self._shards.pop(path, None)
        shard = encode_shard(path, self.vocab, self.use_chars)
        self._shards[path] = (stamp, shard)
        while len(self._shards) > self.CAPACITY:
            self._shards.popitem(last=False)
        return shard


def count_order_warning(vocab: Vocabulary, path: str, top: int = 1000) -> Optional[str]:
    """A warning line when the vocabulary's tokens are far from descending count in the shard
    at `path` (the sampled softmax's log-uniform sampler takes ids as frequency ranks, so an
    alphabetical vocabulary, say, samples the wrong negatives); None when they follow it, or
    when the shard is too small to tell. The order is compared by rank correlation over the
    `top` first tokens."""
    specials = {vocab.bos, vocab.eos, vocab.unk}
    ids = encode_shard(path, vocab, spell=False).words[:-1]
    counts = np.bincount(ids[ids >= 0], minlength=vocab.size)
    tokens = np.array([i for i in range(min(vocab.size, top + 3)) if i not in specials])
    if len(tokens) < 10 or counts[tokens].sum() < 1000:
        return None
    by_count = np.argsort(np.argsort(-counts[tokens], kind="stable"))  # each token's rank by count
    correlation = float(np.corrcoef(np.arange(len(tokens)), by_count)[0, 1])
    if correlation >= COUNT_ORDER_MIN_CORRELATION:
        return None
    return (f"warning: {vocab.filename}: its tokens are not in descending order of count in {path} (rank "
            f"correlation {correlation:.2f}); the sampled softmax draws ids as frequency ranks, so build the "
            f"vocabulary by count (python -m elmojax.prepare does)")


COUNT_ORDER_MIN_CORRELATION = 0.3  # a vocabulary of another corpus of the language still scores about 0.6 or more
