"""Training and evaluation batches of a sharded text corpus, with bilm-tf's semantics.

A dataset is a glob pattern of shard files, one whitespace-tokenized sentence per line (UTF-8;
blank lines are skipped). Shards are taken in sorted path order for indexing, so a pattern
always means the same shard list.

Training (`test=False`) runs forever: each pass visits the shards in a fresh random order and
each shard's sentences are shuffled when it is loaded, as bilm-tf's LMDataset does. Evaluation
(`test=True`) reads each shard once, in sorted order, unshuffled; the stream then ends after the
last real token (bilm-tf drops the final partial batch; here it is padded, so every heldout
token counts exactly once).

Batches follow bilm-tf's `_get_batch`: each of the `batch_size` rows is a stream of sentences
cut into windows of `unroll_steps` tokens; a sentence cut at a window's end goes on in the same
row of the next batch, and a row whose sentence is used up takes the next sentence of the shared
stream (rows filled in order 0..batch_size-1). A sentence of n words is [<S>, w1..wn, </S>] and
gives n + 1 (input, target) pairs; the backward stream reads [</S>, wn..w1, <S>].

Ids use the prediction layout of the model inputs: `token_ids` and `char_ids` are vocabulary /
character ids + 1 with 0 = padding; `next_token_id` are plain vocabulary ids (softmax classes),
0 where padded; `weights` is 1.0 on real positions and 0.0 on padding.

`state_dict()` / `load_state_dict()` resume a stream exactly: the batches after a restore equal
those that would have followed. The state holds positions and the random generator's state,
never the sentences, which are read again from the shards.
"""

from __future__ import annotations

import glob
import os
from bisect import bisect_left
from collections import OrderedDict
from itertools import chain
from typing import Iterator, Optional, Union

import numpy as np

from elmojax import config as config_lib, files
from elmojax.vocab import UNK, UnicodeCharsVocabulary, Vocabulary

STATE_VERSION = 1

Batch = dict[str, np.ndarray]


def list_shards(pattern: str) -> list[str]:
    """The files matching a glob pattern, sorted; an error naming the pattern if there are none."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no files match the dataset pattern {pattern!r}")
    return paths


def _subset(shards: list[str], pattern: str, subset: tuple[int, int]) -> list[str]:
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


def _read_sentences(path: str) -> tuple[list[str], list[int]]:
    """The non-blank lines of a shard and their 1-based line numbers."""
    sentences: list[str] = []
    line_numbers: list[int] = []
    for number, line in files.read_lines(path):
        if line.strip():
            sentences.append(line)
            line_numbers.append(number)
    return sentences, line_numbers


# --- shards as arrays ------------------------------------------------------------------------
#
# A shard is read and encoded once when it is loaded: the words of its sentences become one
# flat array of vocabulary ids. Each direction then lays the loaded shard's sentences out in
# stream order as (input, target) pairs in a flat buffer, so a row's window is at most two
# contiguous runs of that buffer (the rest of its current sentence, then the next sentences of
# the stream, which follow one another there) and a whole batch is a few gathers.

_LINES_PER_CHUNK = 8192  # lines split at a time while encoding, to bound the memory of word strings
_NO_BAD = 1 << 62


class _WordIds(dict):
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


class _Shard:
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


def _encode_shard(path: str, vocab: Vocabulary, spell: bool) -> _Shard:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        for _ in files.read_lines(path):  # the error that names the line
            pass
        raise
    del raw
    lines = text.split("\n")  # the lines read_lines gives (line.split() ignores a trailing \r)
    del text
    word_ids = _WordIds(vocab, spell)
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
    shard = _Shard()
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


class _ShardCache:
    """The encoded shards last loaded, shared by the datasets of one vocabulary (each kept while
    its file is unchanged, so that a small corpus is not encoded again every pass)."""

    CAPACITY = 2

    def __init__(self, vocab: Vocabulary, use_chars: bool):
        self.vocab = vocab
        self.use_chars = use_chars
        self._shards: OrderedDict = OrderedDict()

    def shard(self, path: str) -> _Shard:
        st = os.stat(path)
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        cached = self._shards.get(path)
        if cached is not None and cached[0] == stamp:
            self._shards.move_to_end(path)
            return cached[1]
        self._shards.pop(path, None)
        shard = _encode_shard(path, self.vocab, self.use_chars)
        self._shards[path] = (stamp, shard)
        while len(self._shards) > self.CAPACITY:
            self._shards.popitem(last=False)
        return shard


class _SentenceSource:
    """The shared sentence stream of one dataset: shards in pass order, sentences in shard order.

    `advance()` loads shards until the loaded one has a sentence not yet drawn (False once an
    evaluation stream is used up); the caller draws sentences by moving `sentence_position`
    (the sentence drawn k-th from the loaded shard is `order_of_loaded()[k]`). The random
    generator is used, in this order, for each pass's shard order and for each shard's sentence
    order when it is loaded; saving its state from just before the current shard was loaded lets
    a restore rebuild that shard's order by drawing it again.
    """

    def __init__(self, shards: list[str], test: bool, rng: np.random.Generator, read):
        self.shards = shards
        self.test = test
        self.rng = rng
        self.read = read  # shard index -> _Shard
        self.passes = 0  # passes started
        self.order: Optional[list[int]] = None  # shard indices of the current pass
        self.position = -1  # index in `order` of the loaded shard
        self.sentence_position = 0  # next entry of the loaded shard's sentence order
        self.sentences_in_pass = 0
        self.exhausted = False
        self.load_rng_state: Optional[dict] = None
        self.encoded: Optional[_Shard] = None
        self.n_sentences = 0
        self.permutation: Optional[np.ndarray] = None

    @property
    def shard(self) -> Optional[int]:
        return None if self.position < 0 else self.order[self.position]

    def order_of_loaded(self) -> np.ndarray:
        return np.arange(self.n_sentences) if self.permutation is None else self.permutation

    def _start_pass(self) -> None:
        n = len(self.shards)
        self.order = list(range(n)) if self.test else self.rng.permutation(n).tolist()
        self.passes += 1
        self.position = -1
        self.sentences_in_pass = 0

    def _load(self, position: int) -> None:
        self.position = position
        self.load_rng_state = self.rng.bit_generator.state
        self.encoded = self.read(self.order[position])
        self.n_sentences = self.encoded.n
        self.permutation = None if self.test else self.rng.permutation(self.n_sentences)
        self.sentence_position = 0

    def advance(self) -> bool:
        if self.exhausted:
            return False
        while self.order is None or self.sentence_position >= self.n_sentences:
            if self.order is None or self.position + 1 >= len(self.order):
                if self.order is not None:
                    if self.test:
                        self.exhausted = True
                        return False
                    if self.sentences_in_pass == 0:
                        raise ValueError(f"the shards {self.shards} hold no sentences (all lines are blank)")
                self._start_pass()
            self._load(self.position + 1)
        return True

    def text(self, shard: int, index: int) -> tuple[str, str, int]:
        """(sentence, shard path, line number) of a sentence, read again from its shard."""
        sentences, line_numbers = _read_sentences(self.shards[shard])
        return sentences[index], self.shards[shard], line_numbers[index]

    def state_dict(self) -> dict:
        return {
            "passes": self.passes,
            "shard_order": None if self.order is None else list(self.order),
            "shard_position": self.position,
            "sentence_position": self.sentence_position,
            "sentences_in_pass": self.sentences_in_pass,
            "shard_sentences": self.n_sentences if self.position >= 0 else None,
            "exhausted": self.exhausted,
            "shard_rng_state": self.load_rng_state,
            "rng_state": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        order = state["shard_order"]
        if order is not None and sorted(order) != list(range(len(self.shards))):
            raise ValueError(f"saved shard order {order} does not fit the {len(self.shards)} shards found")
        self.passes = int(state["passes"])
        self.order = None if order is None else [int(i) for i in order]
        self.sentences_in_pass = int(state["sentences_in_pass"])
        self.exhausted = bool(state["exhausted"])
        self.encoded, self.n_sentences, self.permutation = None, 0, None
        self.load_rng_state = None
        self.position = -1
        self.sentence_position = 0
        if int(state["shard_position"]) >= 0:
            # Draw the loaded shard's sentence order again from the generator state it came from.
            self.rng.bit_generator.state = state["shard_rng_state"]
            self._load(int(state["shard_position"]))
            if self.n_sentences != state["shard_sentences"]:
                raise ValueError(f"{self.shards[self.shard]} has {self.n_sentences} sentences, the saved state "
                                 f"{state['shard_sentences']}; the dataset changed since the state was saved")
            self.sentence_position = int(state["sentence_position"])
        self.rng.bit_generator.state = state["rng_state"]


class _Stream:
    """Sentences of one shard (`order`: their indices, in stream order) placed in a dataset's
    buffer: the pairs of the k-th are at addresses off[k] .. off[k + 1] - 1."""

    __slots__ = ("shard", "order", "off", "n", "bad")

    def __init__(self, shard: int, order: np.ndarray, off: list[int], bad: np.ndarray):
        self.shard, self.order, self.off, self.n, self.bad = shard, order, off, len(order), bad

    def first_bad(self, k: int) -> int:
        """The first position >= k of a sentence the vocabulary cannot encode (_NO_BAD if none)."""
        if not len(self.bad):
            return _NO_BAD
        i = int(np.searchsorted(self.bad, k))
        return int(self.bad[i]) if i < len(self.bad) else _NO_BAD


def _resolve_vocab(vocab: Union[str, Vocabulary], max_characters_per_token: Optional[int]) -> Vocabulary:
    if isinstance(vocab, (str, os.PathLike)):
        if max_characters_per_token is None:
            return Vocabulary(os.fspath(vocab), validate_file=True)
        return UnicodeCharsVocabulary(os.fspath(vocab), max_characters_per_token, validate_file=True)
    if not isinstance(vocab, Vocabulary):
        raise TypeError(f"vocab must be a vocabulary file path or a Vocabulary, got {type(vocab).__name__}")
    if max_characters_per_token is not None:
        if not isinstance(vocab, UnicodeCharsVocabulary):
            raise ValueError("max_characters_per_token is set but vocab is not a UnicodeCharsVocabulary; "
                             "pass the vocabulary file path instead")
        if vocab.max_word_length != max_characters_per_token:
            raise ValueError(f"max_characters_per_token={max_characters_per_token} but the vocabulary spells "
                             f"tokens with max_word_length={vocab.max_word_length}")
    return vocab


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class _Batches:
    """Iteration over `next_batch()`, which returns None once an evaluation stream has ended."""

    def next_batch(self) -> Optional[Batch]:
        raise NotImplementedError

    def iter_batches(self) -> Iterator[Batch]:
        """Batches from the current position: forever when training, to the end when testing."""
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    __iter__ = iter_batches


class LMDataset(_Batches):
    """One direction of a language-model data stream (bilm-tf's LMDataset + _get_batch).

    vocab: a Vocabulary / UnicodeCharsVocabulary, or a vocabulary file path (then loaded with
    `max_characters_per_token`). Char ids are produced when the vocabulary is a
    UnicodeCharsVocabulary (`max_characters_per_token`, if given, must match its width).
    reverse: the backward stream ([</S>, wn..w1, <S>]). test: evaluation (one sorted pass, no
    shuffle, padded end). shard_subset (index, count): read only shards index, index + count, ...
    (a process's share of the data). seed: the random stream; forward and reverse datasets of the same seed
    draw from independent generators.
    """

    def __init__(self, pattern: str, vocab: Union[str, Vocabulary], batch_size: int, unroll_steps: int,
                 reverse: bool = False, test: bool = False, seed: int = 0,
                 max_characters_per_token: Optional[int] = None, shard_subset: tuple[int, int] = (0, 1)):
        self.pattern = pattern
        self.vocab = _resolve_vocab(vocab, max_characters_per_token)
        self.use_chars = isinstance(self.vocab, UnicodeCharsVocabulary)
        self.max_characters_per_token = self.vocab.max_word_length if self.use_chars else None
        self.batch_size = _check_positive("batch_size", batch_size)
        self.unroll_steps = _check_positive("unroll_steps", unroll_steps)
        self.reverse = bool(reverse)
        self.test = bool(test)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.shards = _subset(list_shards(pattern), pattern, shard_subset)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(int(self.reverse),))))
        self._shard_cache = _ShardCache(self.vocab, self.use_chars)
        self._char_rows = np.asarray(self.vocab.word_char_ids, dtype=np.int32) if self.use_chars else None
        self._source = _SentenceSource(self.shards, self.test, rng, self._read_shard)
        self._steps = np.arange(self.unroll_steps, dtype=np.int64)[None, :]
        self._reset_rows()
        self._batches = 0
        self._sentences = 0
        self._tokens = 0
        self._ended = False

    def _read_shard(self, shard: int) -> _Shard:
        return self._shard_cache.shard(self.shards[shard])

    def _reset_rows(self) -> None:
        """No rows and an empty buffer. Row i's current sentence is the sentence
        `_row_sentence[i]` of `_row_stream[i]`; its pairs not used yet are at addresses
        `_pos[i]` .. `_end[i]` - 1 (none: the row takes the next sentence of the stream)."""
        b = self.batch_size
        self._pos = np.zeros(b, np.int64)
        self._end = np.zeros(b, np.int64)
        self._row_sentence = np.zeros(b, np.int64)
        self._row_stream: list[Optional[_Stream]] = [None] * b
        self._stream: Optional[_Stream] = None  # the loaded shard's sentences
        # The buffer: inputs (ids + 1) and targets of the pairs at addresses _base, _base + 1, ...,
        # then one padding pair (0, 0); the pairs spelled unlike their token id: addresses and
        # char ids + 1.
        self._base = 0
        self._inputs = np.zeros(1, np.int32)
        self._targets = np.zeros(1, np.int32)
        self._spelled_at = np.zeros(0, np.int64)
        self._spelled = np.zeros((0, self.max_characters_per_token or 0), np.int32)

    def _buffer_end(self) -> int:
        return self._base + len(self._inputs) - 1

    def _place(self, shard: int, encoded: _Shard, order: np.ndarray, keep_from: int) -> _Stream:
        """Appends the pairs of sentences `order` of a shard to the buffer, dropping the pairs
        before address `keep_from` (none of which may be used again)."""
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
        start = self._buffer_end()
        drop = keep_from - self._base
        self._inputs = np.concatenate([self._inputs[drop:-1], inputs, np.zeros(1, np.int32)])
        self._targets = np.concatenate([self._targets[drop:-1], targets, np.zeros(1, np.int32)])
        if self.use_chars:
            kept = int(np.searchsorted(self._spelled_at, keep_from))
            if len(encoded.spelled_at):
                row = np.full(len(encoded.words), -1, np.int64)
                row[encoded.spelled_at] = encoded.spelled_rows
                row = row[input_word]
                row[heads] = -1
                at = np.flatnonzero(row >= 0)
                self._spelled_at = np.concatenate([self._spelled_at[kept:], at + start])
                self._spelled = np.concatenate([self._spelled[kept:], encoded.spelled[row[at]]])
            elif kept:
                self._spelled_at, self._spelled = self._spelled_at[kept:], self._spelled[kept:]
        self._base = keep_from
        bad = np.flatnonzero(np.isin(order, encoded.bad)) if len(encoded.bad) else encoded.bad
        return _Stream(shard, order, (off + start).tolist(), bad)

    def _raise_unencodable(self, shard: int, index: int) -> None:
        """The error the vocabulary gives for a sentence with a word it cannot encode."""
        text, path, line = self._source.text(shard, index)
        words = text.split()
        if self.reverse:
            words.reverse()
        try:
            self.vocab.encode(words, reverse=self.reverse, split=False)
        except KeyError as e:
            raise ValueError(f"{path}, line {line}: {e.args[0]}") from None
        raise ValueError(f"{path}, line {line}: the vocabulary cannot encode this sentence")

    def _next_shard(self, keep_from: int) -> bool:
        """Loads the next shard that has sentences into the buffer; False at the end of an
        evaluation stream."""
        if not self._source.advance():
            return False
        source = self._source
        self._stream = self._place(source.shard, source.encoded, source.order_of_loaded(), keep_from)
        return True

    # --- batches -------------------------------------------------------------------------

    def empty_batch(self) -> Batch:
        """An all-padding batch (zeros, weights 0)."""
        shape = (self.batch_size, self.unroll_steps)
        batch = {"token_ids": np.zeros(shape, np.int32)}
        if self.use_chars:
            batch["char_ids"] = np.zeros(shape + (self.max_characters_per_token,), np.int32)
        batch["next_token_id"] = np.zeros(shape, np.int32)
        batch["weights"] = np.zeros(shape, np.float32)
        return batch

    def _draw(self, rows: np.ndarray, needs: np.ndarray, pos: np.ndarray, end: np.ndarray,
              draw_start: np.ndarray, drawn: np.ndarray, new_pos: np.ndarray, new_end: np.ndarray) -> None:
        """Rows `rows` (in order) take `needs` more pairs each from the sentence stream: a
        contiguous run of the buffer from the stream's next sentence on, whose last sentence,
        if cut, becomes the row's current one. Fills draw_start / drawn (the run) and the rows'
        new current sentences."""
        source = self._source
        stream = self._stream
        row_stream = self._row_stream
        k = source.sentence_position
        if stream is None:
            off, n, limit, bad = [self._buffer_end()], 0, -1, _NO_BAD
        else:
            off, n, bad = stream.off, stream.n, stream.first_bad(k)
            limit = off[n]
        cursor = off[k]  # pairs before it, and before the rows' current ones, are not used again
        keep_from = None
        taken_sentences = 0
        done_rows, starts, counts, positions, ends, sentences = [], [], [], [], [], []
        for i, need in zip(rows.tolist(), needs.tolist()):
            start = off[k]
            e = start + need
            if e <= limit:  # within the loaded shard: the usual case
                k2 = bisect_left(off, e, k + 1)
                if k2 > bad:
                    self._raise_unencodable(stream.shard, int(stream.order[bad]))
                taken_sentences += k2 - k
                done_rows.append(i)
                starts.append(start)
                counts.append(need)
                positions.append(e)
                ends.append(off[k2])
                sentences.append(k2 - 1)
                row_stream[i] = stream
                k = k2
                continue
            # The row needs more than the loaded shard has left: load the next ones (exactly when
            # the sentence-at-a-time stream would), whose pairs follow in the buffer.
            if keep_from is None:
                live = pos[end > pos]
                keep_from = min(int(live.min()), cursor) if len(live) else cursor
            taken = 0
            tail = None
            while True:
                if k >= n:
                    source.sentence_position = k
                    source.sentences_in_pass += taken_sentences
                    self._sentences += taken_sentences
                    taken_sentences = 0
                    if not self._next_shard(keep_from):
                        break
                    stream = self._stream
                    off, n, k, bad = stream.off, stream.n, 0, stream.first_bad(0)
                    limit = off[n]
                    if taken == 0:
                        start = off[0]
                e = off[k] + need - taken
                if e <= limit:
                    k2 = bisect_left(off, e, k + 1)
                    if k2 > bad:
                        self._raise_unencodable(stream.shard, int(stream.order[bad]))
                    taken_sentences += k2 - k
                    taken = need
                    tail = (e, off[k2], k2 - 1)
                    k = k2
                    break
                if bad < n:
                    self._raise_unencodable(stream.shard, int(stream.order[bad]))
                taken_sentences += n - k
                taken += limit - off[k]
                k = n
            done_rows.append(i)
            starts.append(start)
            counts.append(taken)
            if tail is None:  # the evaluation stream ended
                positions.append(0)
                ends.append(0)
                sentences.append(0)
                row_stream[i] = None
            else:
                positions.append(tail[0])
                ends.append(tail[1])
                sentences.append(tail[2])
                row_stream[i] = stream
        source.sentence_position = k
        source.sentences_in_pass += taken_sentences
        self._sentences += taken_sentences
        draw_start[done_rows] = starts
        drawn[done_rows] = counts
        new_pos[done_rows] = positions
        new_end[done_rows] = ends
        self._row_sentence[done_rows] = sentences

    def next_batch(self) -> Optional[Batch]:
        """The next batch, or None once an evaluation stream has given its last token."""
        if self._ended:
            return None
        b, steps = self.batch_size, self.unroll_steps
        pos, end = self._pos, self._end
        kept = np.minimum(end - pos, steps)  # pairs from each row's current sentence
        needs = steps - kept
        draw_start = np.zeros(b, np.int64)
        drawn = np.zeros(b, np.int64)
        new_pos = pos + kept
        new_end = end.copy()
        rows = np.flatnonzero(needs)
        if len(rows):
            self._draw(rows, needs[rows], pos, end, draw_start, drawn, new_pos, new_end)
        self._pos, self._end = new_pos, new_end
        filled = kept + drawn
        n_real = int(filled.sum())
        if n_real == 0 and self._source.exhausted:
            self._ended = True
            return None
        # Buffer indices of each (row, step): the current sentence, then the drawn run, then padding.
        base = self._base
        cols = self._steps
        index = np.where(cols < kept[:, None], (pos - base)[:, None] + cols,
                         (draw_start - base - kept)[:, None] + cols)
        padded = n_real < b * steps
        if padded:
            index[cols >= filled[:, None]] = len(self._inputs) - 1
        token_ids = self._inputs.take(index)
        batch = {"token_ids": token_ids}
        if self.use_chars:
            char_ids = self._char_rows.take(token_ids - 1, axis=0)  # padding: fixed below
            char_ids += 1
            if padded:
                char_ids[token_ids == 0] = 0
            if len(self._spelled_at):
                self._spell(char_ids, token_ids, index)
            batch["char_ids"] = char_ids
        batch["next_token_id"] = self._targets.take(index)
        if padded:
            batch["weights"] = (token_ids != 0).astype(np.float32)
        else:
            batch["weights"] = np.ones((b, steps), np.float32)
        self._batches += 1
        self._tokens += n_real
        return batch

    def _spell(self, char_ids: np.ndarray, token_ids: np.ndarray, index: np.ndarray) -> None:
        """Char ids of the <UNK> inputs that spell their own word."""
        unknown = np.flatnonzero(token_ids == self.vocab.unk + 1)
        if not len(unknown):
            return
        address = index.ravel()[unknown] + self._base
        found = np.searchsorted(self._spelled_at, address)
        np.minimum(found, len(self._spelled_at) - 1, out=found)
        hit = self._spelled_at[found] == address
        char_ids.reshape(-1, char_ids.shape[-1])[unknown[hit]] = self._spelled[found[hit]]


    # --- resume ----------------------------------------------------------------------------

    @property
    def counters(self) -> dict:
        """batches and sentences given so far, tokens = real (input, target) pairs, passes started."""
        return {"batches": self._batches, "sentences": self._sentences, "tokens": self._tokens,
                "passes": self._source.passes}

    def _rows_state(self) -> list:
        rows = []
        for i, stream in enumerate(self._row_stream):
            p = int(self._pos[i])
            if stream is None or p >= int(self._end[i]):
                rows.append(None)
            else:
                k = int(self._row_sentence[i])
                rows.append([stream.shard, int(stream.order[k]), p - stream.off[k]])
        return rows

    def state_dict(self) -> dict:
        """The stream's position after the last batch given, as a small JSON-serializable dict."""
        return {
            "version": STATE_VERSION,
            "reverse": self.reverse,
            "test": self.test,
            "batch_size": self.batch_size,
            "unroll_steps": self.unroll_steps,
            "n_shards": len(self.shards),
            "source": self._source.state_dict(),
            "rows": self._rows_state(),
            "batches": self._batches,
            "sentences": self._sentences,
            "tokens": self._tokens,
            "ended": self._ended,
        }

    def _restore_row(self, shard: int, index: int, offset: int) -> _Stream:
        """Places a saved row's sentence in the buffer (with the checks and errors of reading it)."""
        path = self.shards[shard]
        encoded = self._read_shard(shard)
        if index >= encoded.n:
            raise ValueError(f"{path} has {encoded.n} sentences, fewer than the saved "
                             f"state refers to; the dataset changed since the state was saved")
        canonical = range(encoded.n)[index]
        if np.isin(canonical, encoded.bad):
            self._raise_unencodable(shard, index)
        pairs = int(encoded.lengths[canonical]) + 1
        if not 0 <= offset < pairs:
            line = int(encoded.line_numbers[canonical])
            raise ValueError(f"{path}, line {line}: saved offset {offset} does not fit the sentence's "
                             f"{pairs} pairs; the dataset changed since the state was saved")
        stream = self._place(shard, encoded, np.array([canonical]), self._base)
        stream.order = np.array([index])
        return stream

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the dataset that gave `state` was."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = {"reverse": self.reverse, "test": self.test, "batch_size": self.batch_size,
                "unroll_steps": self.unroll_steps, "n_shards": len(self.shards)}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(f"data state has {key}={state[key]!r} but this dataset has {key}={value!r}"
                                 + (f" (pattern {self.pattern!r})" if key == "n_shards" else ""))
        if len(state["rows"]) != self.batch_size:
            raise ValueError(f"data state has {len(state['rows'])} rows, expected {self.batch_size}")
        source = self._source
        source.load_state_dict(state["source"])
        self._reset_rows()
        for i, entry in enumerate(state["rows"]):
            if entry is None:
                continue
            shard, index, offset = (int(v) for v in entry)
            if not 0 <= shard < len(self.shards):
                raise ValueError(f"data state refers to shard {shard} of {len(self.shards)}")
            stream = self._restore_row(shard, index, offset)
            self._row_stream[i] = stream
            self._pos[i] = stream.off[0] + offset
            self._end[i] = stream.off[1]
        if source.shard is not None:
            self._stream = self._place(source.shard, source.encoded, source.order_of_loaded(), self._base)
        self._batches = int(state["batches"])
        self._sentences = int(state["sentences"])
        self._tokens = int(state["tokens"])
        self._ended = bool(state["ended"])

    def _share_with(self, other: "LMDataset") -> None:
        """Use `other`'s encoded shards (same vocabulary, nothing loaded yet)."""
        self._shard_cache = other._shard_cache


class BidirectionalLMDataset(_Batches):
    """A forward and a backward LMDataset over the same shards, batched together.

    Each batch holds the forward arrays ('token_ids', 'char_ids', 'next_token_id', 'weights')
    and the backward ones with the suffix '_reverse'. The two streams shuffle independently
    (as in bilm-tf). When testing, both read the same sentences in the same order, so they end
    together; should one end first, its arrays are padding until the other ends.
    """

    def __init__(self, pattern: str, vocab: Union[str, Vocabulary], batch_size: int, unroll_steps: int,
                 test: bool = False, seed: int = 0, max_characters_per_token: Optional[int] = None,
                 shard_subset: tuple[int, int] = (0, 1)):
        vocab = _resolve_vocab(vocab, max_characters_per_token)
        kwargs = dict(batch_size=batch_size, unroll_steps=unroll_steps, test=test, seed=seed,
                      shard_subset=shard_subset)
        self.forward = LMDataset(pattern, vocab, reverse=False, **kwargs)
        self.backward = LMDataset(pattern, vocab, reverse=True, **kwargs)
        self.backward._share_with(self.forward)
        self.pattern = pattern
        self.vocab = vocab
        self.batch_size = self.forward.batch_size
        self.unroll_steps = self.forward.unroll_steps
        self.test = self.forward.test
        self.use_chars = self.forward.use_chars
        self.max_characters_per_token = self.forward.max_characters_per_token

    def next_batch(self) -> Optional[Batch]:
        forward, backward = self.forward.next_batch(), self.backward.next_batch()
        if forward is None and backward is None:
            return None
        batch = dict(forward if forward is not None else self.forward.empty_batch())
        backward = backward if backward is not None else self.backward.empty_batch()
        batch.update({f"{key}_reverse": value for key, value in backward.items()})
        return batch


    def state_dict(self) -> dict:
        return {"forward": self.forward.state_dict(), "backward": self.backward.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.forward.load_state_dict(state["forward"])
        self.backward.load_state_dict(state["backward"])


def make_dataset(config, vocab, prefix: str, batch_size: int, unroll_steps: int, test: bool, seed: int = 0,
                 shard_subset: tuple[int, int] = (0, 1)):
    if not prefix:
        raise ValueError("no data: set --config.data.train_prefix=GLOB (and heldout_prefix for evaluation)")
    chars = config.model.char_cnn.max_characters_per_token if config_lib.use_character_inputs(config) else None
    cls = BidirectionalLMDataset if config.model.bidirectional else LMDataset
    return cls(prefix, vocab, batch_size, unroll_steps, test=test, seed=seed, max_characters_per_token=chars,
               shard_subset=shard_subset)
