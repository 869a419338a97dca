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
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np

from elmojax.data.order import SentenceSource
from elmojax.data.pairs import NO_BAD, PairBuffer, Placed
from elmojax.data.shards import Shard, ShardCache, list_shards, subset
from elmojax.formats.checks import check_int
from elmojax.formats.vocab import UnicodeCharsVocabulary, Vocabulary

STATE_VERSION = 1

HostBatch = dict[str, np.ndarray]  # a host batch: bilm-tf's arrays by name (elmojax.train.batch.to_device sends it)


class Run(NamedTuple):
    """The pairs a row draws from the sentence stream: `count` of them from buffer address
    `start`; after them the row's current sentence is the `sentence`-th of `stream` with unused
    pairs at addresses `pos` .. `end` - 1 (stream None: an evaluation stream ended)."""
    start: int
    count: int
    pos: int
    end: int
    sentence: int
    stream: Optional[Placed]


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


class Batches:
    """Iteration over `next_batch()`, which returns None once an evaluation stream has ended."""

    def next_batch(self) -> Optional[HostBatch]:
        raise NotImplementedError

    def iter_batches(self) -> Iterator[HostBatch]:
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
        self.batch_size = check_int("batch_size", batch_size, 1, wrong_type=ValueError)
        self.unroll_steps = check_int("unroll_steps", unroll_steps, 1, wrong_type=ValueError)
        self.reverse = bool(reverse)
        self.test = bool(test)
        self.seed = check_int("seed", seed, 0, wrong_type=ValueError)
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

    def empty_batch(self) -> HostBatch:
        """An all-padding batch (zeros, weights 0)."""
        shape = (self.batch_size, self.unroll_steps)
        batch = {"token_ids": np.zeros(shape, np.int32)}
        if self.use_chars:
            batch["char_ids"] = np.zeros(shape + (self.max_characters_per_token,), np.int32)
        batch["next_token_id"] = np.zeros(shape, np.int32)
        batch["weights"] = np.zeros(shape, np.float32)
        return batch

    def _draw(self, needs: list[int], pos: np.ndarray, end: np.ndarray) -> list[Run]:
        """The runs that rows take, in order, of `needs` pairs each from the sentence stream: a
        contiguous run of the buffer from the stream's next sentence on, whose last sentence, if
        cut, becomes the row's current one. `pos`, `end`: the rows' current sentences before this
        batch, whose pairs the buffer keeps when it places the next shard."""
        stream, k = self._stream, self._source.sentence_position
        bad = NO_BAD if stream is None else stream.first_bad(k)
        cursor = self._buffer.end if stream is None else stream.off[k]  # pairs before it are not used again
        keep_from = None
        runs, first = [], k
        for need in needs:
            run = None if stream is None else self._run_within(stream, k, bad, need)
            if run is None:  # more than the loaded shard has left
                self._took(k, k - first)
                if keep_from is None:
                    live = pos[end > pos]
                    keep_from = min(int(live.min()), cursor) if len(live) else cursor
                start = self._buffer.end if stream is None else stream.off[k]
                run = self._run_across(start, k, need, keep_from)
                stream, k = self._stream, self._source.sentence_position
                bad = NO_BAD if stream is None else stream.first_bad(k)
                first = k
            else:
                k = run.sentence + 1
            runs.append(run)
        self._took(k, k - first)
        return runs

    def _run_within(self, stream: Placed, k: int, bad: int, need: int) -> Optional[Run]:
        """The run of `need` pairs from the k-th sentence of the loaded shard on, or None if the
        shard has fewer left. `bad`: the first sentence from k on that the vocabulary cannot encode."""
        off = stream.off
        start = off[k]
        e = start + need
        if e > off[stream.n]:
            return None
        k2 = bisect_left(off, e, k + 1)
        if k2 > bad:
            self._raise_unencodable(stream.shard, int(stream.order[bad]))
        return Run(start, need, e, off[k2], k2 - 1, stream)

    def _run_across(self, start: int, k: int, need: int, keep_from: int) -> Run:
        """The run of `need` pairs from address `start` (the k-th sentence of the loaded shard, or
        the buffer's end) on into the shards loaded next, loaded exactly when the
        sentence-at-a-time stream would load them; a shorter run, with no current sentence after
        it, where an evaluation stream ends."""
        stream = self._stream
        taken = 0
        while True:
            if stream is not None:  # the rest of the loaded shard
                n, bad = stream.n, stream.first_bad(k)
                if bad < n:
                    self._raise_unencodable(stream.shard, int(stream.order[bad]))
                self._took(n, n - k)
                taken += stream.off[n] - stream.off[k]
            if not self._next_shard(keep_from):
                return Run(start, taken, 0, 0, 0, None)
            stream, k = self._stream, 0
            if taken == 0:
                start = stream.off[0]
            run = self._run_within(stream, 0, stream.first_bad(0), need - taken)
            if run is not None:
                self._took(run.sentence + 1, run.sentence + 1)
                return run._replace(start=start, count=need)

    def _took(self, k: int, sentences: int) -> None:
        """The stream's next sentence is now the loaded shard's k-th, `sentences` more drawn."""
        source = self._source
        source.sentence_position = k
        source.sentences_in_pass += sentences
        self._sentences += sentences

    def _draw_rows(self, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Where the rows' windows go on after the `kept` pairs of their current sentences: the
        start and length of each row's run drawn from the stream, and each row's current
        sentence's unused pairs after the batch (pos, end)."""
        b, pos, end = self.batch_size, self._pos, self._end
        needs = self.unroll_steps - kept
        draw_start, drawn = np.zeros(b, np.int64), np.zeros(b, np.int64)
        new_pos, new_end = pos + kept, end.copy()
        rows = np.flatnonzero(needs)
        if len(rows):
            runs = self._draw(needs[rows].tolist(), pos, end)
            draw_start[rows], drawn[rows], new_pos[rows], new_end[rows], self._row_sentence[rows], streams = zip(*runs)
            for i, stream in zip(rows.tolist(), streams):
                self._row_stream[i] = stream
        return draw_start, drawn, new_pos, new_end

    def next_batch(self) -> Optional[HostBatch]:
        """The next batch, or None once an evaluation stream has given its last token."""
        if self._ended:
            return None
        b, steps = self.batch_size, self.unroll_steps
        pos = self._pos
        kept = np.minimum(self._end - pos, steps)  # pairs from each row's current sentence
        draw_start, drawn, self._pos, self._end = self._draw_rows(kept)
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
