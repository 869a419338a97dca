"""The window packer: one direction's batches, bilm-tf's `_get_batch`.

Each of the `batch_size` rows is a stream of sentences cut into windows of `unroll_steps`
tokens. A sentence cut at a window's end goes on in the same row of the next batch; a row whose
sentence is used up takes the next sentence of the shared stream (rows filled in order
0..batch_size-1). A sentence of n words is [<S>, w1..wn, </S>] and gives n + 1 (input, target)
pairs; the backward stream reads [</S>, wn..w1, <S>]. Evaluation pads the last batch, so every
heldout token counts once (bilm-tf drops it).

A shard is read and encoded once when it is loaded (elmojax.data.shards); each direction lays
its sentences out in stream order as (input, target) pairs (elmojax.data.pairs), from which a
row's window is at most two contiguous runs and a whole batch one gather.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import Iterator, Optional, Union

import numpy as np

from elmojax.data.order import SentenceSource
from elmojax.data.pairs import NO_BAD, PairBuffer, Placed
from elmojax.data.shards import Shard, ShardCache, list_shards, subset
from elmojax.formats.vocab import UnicodeCharsVocabulary, Vocabulary

STATE_VERSION = 1

Batch = dict[str, np.ndarray]  # a host batch: bilm-tf's arrays by name (elmojax.train.batch.to_device sends it)


def resolve_vocab(vocab: Union[str, Vocabulary], max_characters_per_token: Optional[int]) -> Vocabulary:
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


def check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Batches:
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


class LMDataset(Batches):
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
        self.vocab = resolve_vocab(vocab, max_characters_per_token)
        self.use_chars = isinstance(self.vocab, UnicodeCharsVocabulary)
        self.max_characters_per_token = self.vocab.max_word_length if self.use_chars else None
        self.batch_size = check_positive("batch_size", batch_size)
        self.unroll_steps = check_positive("unroll_steps", unroll_steps)
        self.reverse = bool(reverse)
        self.test = bool(test)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.shards = subset(list_shards(pattern), pattern, shard_subset)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(int(self.reverse),))))
        self._shard_cache = ShardCache(self.vocab, self.use_chars)
        self._char_rows = np.asarray(self.vocab.word_char_ids, dtype=np.int32) if self.use_chars else None
        self._source = SentenceSource(self.shards, self.test, rng, self._read_shard)
        self._steps = np.arange(self.unroll_steps, dtype=np.int64)[None, :]
        self._reset_rows()
        self._batches = 0
        self._sentences = 0
        self._tokens = 0
        self._ended = False

    def _read_shard(self, shard: int) -> Shard:
        return self._shard_cache.shard(self.shards[shard])

    def _reset_rows(self) -> None:
        """No rows and an empty pair buffer. Row i's current sentence is the sentence
        `_row_sentence[i]` of `_row_stream[i]`; its pairs not used yet are at the buffer's
        addresses `_pos[i]` .. `_end[i]` - 1 (none: the row takes the next sentence of the stream)."""
        b = self.batch_size
        self._pos = np.zeros(b, np.int64)
        self._end = np.zeros(b, np.int64)
        self._row_sentence = np.zeros(b, np.int64)
        self._row_stream: list[Optional[Placed]] = [None] * b
        self._stream: Optional[Placed] = None  # the loaded shard's sentences
        self._buffer = PairBuffer(self.vocab, self.reverse, self.max_characters_per_token)

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
        self._stream = self._buffer.place(source.shard, source.encoded, source.order_of_loaded(), keep_from)
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
            off, n, limit, bad = [self._buffer.end], 0, -1, NO_BAD
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
        buffer = self._buffer
        base = buffer.base
        cols = self._steps
        index = np.where(cols < kept[:, None], (pos - base)[:, None] + cols,
                         (draw_start - base - kept)[:, None] + cols)
        padded = n_real < b * steps
        if padded:
            index[cols >= filled[:, None]] = buffer.padding
        token_ids = buffer.inputs.take(index)
        batch = {"token_ids": token_ids}
        if self.use_chars:
            char_ids = self._char_rows.take(token_ids - 1, axis=0)  # padding: fixed below
            char_ids += 1
            if padded:
                char_ids[token_ids == 0] = 0
            buffer.spell(char_ids, token_ids, index)
            batch["char_ids"] = char_ids
        batch["next_token_id"] = buffer.targets.take(index)
        if padded:
            batch["weights"] = (token_ids != 0).astype(np.float32)
        else:
            batch["weights"] = np.ones((b, steps), np.float32)
        self._batches += 1
        self._tokens += n_real
        return batch

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

    def _restore_row(self, shard: int, index: int, offset: int) -> Placed:
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
        stream = self._buffer.place(shard, encoded, np.array([canonical]), self._buffer.base)
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
            self._stream = self._buffer.place(source.shard, source.encoded, source.order_of_loaded(),
                                              self._buffer.base)
        self._batches = int(state["batches"])
        self._sentences = int(state["sentences"])
        self._tokens = int(state["tokens"])
        self._ended = bool(state["ended"])

    def _share_with(self, other: "LMDataset") -> None:
        """Use `other`'s encoded shards (same vocabulary, nothing loaded yet)."""
        self._shard_cache = other._shard_cache
