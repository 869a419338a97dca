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
from typing import Iterator, Optional, Union

import numpy as np

from elmojax import files
from elmojax.vocab import UNK, UnicodeCharsVocabulary, Vocabulary

STATE_VERSION = 1

Batch = dict[str, np.ndarray]


def list_shards(pattern: str) -> list[str]:
    """The files matching a glob pattern, sorted; an error naming the pattern if there are none."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no files match the dataset pattern {pattern!r}")
    return paths


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


class _SentenceSource:
    """The shared sentence stream of one dataset: shards in pass order, sentences in shard order.

    `next()` gives (shard index, sentence index within the shard) or None once an evaluation
    stream is used up. The random generator is used, in this order, for each pass's shard order
    and for each shard's sentence order when it is loaded; saving its state from just before the
    current shard was loaded lets a restore rebuild that shard's order by drawing it again.
    """

    def __init__(self, shards: list[str], test: bool, rng: np.random.Generator):
        self.shards = shards
        self.test = test
        self.rng = rng
        self.passes = 0  # passes started
        self.order: Optional[list[int]] = None  # shard indices of the current pass
        self.position = -1  # index in `order` of the loaded shard
        self.sentence_position = 0  # next entry of the loaded shard's sentence order
        self.sentences_in_pass = 0
        self.exhausted = False
        self.load_rng_state: Optional[dict] = None
        self.sentences: list[str] = []
        self.line_numbers: list[int] = []
        self.permutation: Optional[np.ndarray] = None

    @property
    def shard(self) -> Optional[int]:
        return None if self.position < 0 else self.order[self.position]

    def _start_pass(self) -> None:
        n = len(self.shards)
        self.order = list(range(n)) if self.test else self.rng.permutation(n).tolist()
        self.passes += 1
        self.position = -1
        self.sentences_in_pass = 0

    def _load(self, position: int) -> None:
        self.position = position
        self.load_rng_state = self.rng.bit_generator.state
        self.sentences, self.line_numbers = _read_sentences(self.shards[self.order[position]])
        self.permutation = None if self.test else self.rng.permutation(len(self.sentences))
        self.sentence_position = 0

    def next(self) -> Optional[tuple[int, int]]:
        if self.exhausted:
            return None
        while self.order is None or self.sentence_position >= len(self.sentences):
            if self.order is None or self.position + 1 >= len(self.order):
                if self.order is not None:
                    if self.test:
                        self.exhausted = True
                        return None
                    if self.sentences_in_pass == 0:
                        raise ValueError(f"the shards {self.shards} hold no sentences (all lines are blank)")
                self._start_pass()
            self._load(self.position + 1)
        k = self.sentence_position
        index = k if self.permutation is None else int(self.permutation[k])
        self.sentence_position += 1
        self.sentences_in_pass += 1
        return self.order[self.position], index

    def text(self, shard: int, index: int) -> tuple[str, str, int]:
        """(sentence, shard path, line number) of a sentence, read again if its shard is not loaded."""
        if shard != self.shard:
            sentences, line_numbers = _read_sentences(self.shards[shard])
        else:
            sentences, line_numbers = self.sentences, self.line_numbers
        if index >= len(sentences):
            raise ValueError(f"{self.shards[shard]} has {len(sentences)} sentences, fewer than the saved "
                             f"state refers to; the dataset changed since the state was saved")
        return sentences[index], self.shards[shard], line_numbers[index]

    def state_dict(self) -> dict:
        return {
            "passes": self.passes,
            "shard_order": None if self.order is None else list(self.order),
            "shard_position": self.position,
            "sentence_position": self.sentence_position,
            "sentences_in_pass": self.sentences_in_pass,
            "shard_sentences": len(self.sentences) if self.position >= 0 else None,
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
        self.sentences, self.line_numbers, self.permutation = [], [], None
        self.load_rng_state = None
        self.position = -1
        self.sentence_position = 0
        if int(state["shard_position"]) >= 0:
            # Draw the loaded shard's sentence order again from the generator state it came from.
            self.rng.bit_generator.state = state["shard_rng_state"]
            self._load(int(state["shard_position"]))
            if len(self.sentences) != state["shard_sentences"]:
                raise ValueError(f"{self.shards[self.shard]} has {len(self.sentences)} sentences, the saved state "
                                 f"{state['shard_sentences']}; the dataset changed since the state was saved")
            self.sentence_position = int(state["sentence_position"])
        self.rng.bit_generator.state = state["rng_state"]


class _Row:
    """A batch row's current sentence: ids, char ids and how many of its pairs are used."""

    __slots__ = ("shard", "index", "ids", "chars", "offset")

    def __init__(self, shard: int, index: int, ids: np.ndarray, chars: Optional[np.ndarray], offset: int = 0):
        self.shard, self.index, self.ids, self.chars, self.offset = shard, index, ids, chars, offset

    @property
    def remaining(self) -> int:
        return len(self.ids) - 1 - self.offset


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


class LMDataset:
    """One direction of a language-model data stream (bilm-tf's LMDataset + _get_batch).

    vocab: a Vocabulary / UnicodeCharsVocabulary, or a vocabulary file path (then loaded with
    `max_characters_per_token`). Char ids are produced when the vocabulary is a
    UnicodeCharsVocabulary (`max_characters_per_token`, if given, must match its width).
    reverse: the backward stream ([</S>, wn..w1, <S>]). test: evaluation (one sorted pass, no
    shuffle, padded end). seed: the random stream; forward and reverse datasets of the same seed
    draw from independent generators.
    """

    def __init__(self, pattern: str, vocab: Union[str, Vocabulary], batch_size: int, unroll_steps: int,
                 reverse: bool = False, test: bool = False, seed: int = 0,
                 max_characters_per_token: Optional[int] = None):
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
        self.shards = list_shards(pattern)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(int(self.reverse),))))
        self._source = _SentenceSource(self.shards, self.test, rng)
        self._rows: list[Optional[_Row]] = [None] * self.batch_size
        self._batches = 0
        self._sentences = 0
        self._tokens = 0
        self._ended = False

    # --- batches -------------------------------------------------------------------------

    def _make_row(self, shard: int, index: int, offset: int = 0) -> _Row:
        text, path, line = self._source.text(shard, index)
        words = text.split()
        if self.reverse:
            words.reverse()
        try:
            ids = self.vocab.encode(words, reverse=self.reverse, split=False)
        except KeyError as e:
            raise ValueError(f"{path}, line {line}: {e.args[0]}") from None
        chars = self._encode_chars(words, ids) if self.use_chars else None
        if not 0 <= offset < len(ids) - 1:
            raise ValueError(f"{path}, line {line}: saved offset {offset} does not fit the sentence's "
                             f"{len(ids) - 1} pairs; the dataset changed since the state was saved")
        return _Row(shard, index, ids, chars, offset)

    def _encode_chars(self, words: list[str], ids: np.ndarray) -> np.ndarray:
        """vocab.encode_chars(words, reverse), faster: table rows for known words, spelled unknowns."""
        chars = self.vocab.word_char_ids[ids]
        if self.vocab.unk >= 0:
            for k in np.flatnonzero(ids[1:-1] == self.vocab.unk):
                if words[k] != UNK:
                    chars[k + 1] = self.vocab.word_to_char_ids(words[k])
        return chars

    def empty_batch(self) -> Batch:
        """An all-padding batch (zeros, weights 0)."""
        shape = (self.batch_size, self.unroll_steps)
        batch = {"token_ids": np.zeros(shape, np.int32)}
        if self.use_chars:
            batch["char_ids"] = np.zeros(shape + (self.max_characters_per_token,), np.int32)
        batch["next_token_id"] = np.zeros(shape, np.int32)
        batch["weights"] = np.zeros(shape, np.float32)
        return batch

    def next_batch(self) -> Optional[Batch]:
        """The next batch, or None once an evaluation stream has given its last token."""
        if self._ended:
            return None
        batch = self.empty_batch()
        token_ids, next_ids, weights = batch["token_ids"], batch["next_token_id"], batch["weights"]
        char_ids = batch.get("char_ids")
        steps = self.unroll_steps
        for i in range(self.batch_size):
            pos = 0
            while pos < steps:
                row = self._rows[i]
                if row is None or row.remaining == 0:
                    self._rows[i] = None
                    item = self._source.next()
                    if item is None:
                        break
                    row = self._rows[i] = self._make_row(*item)
                    self._sentences += 1
                n = min(row.remaining, steps - pos)
                a = row.offset
                token_ids[i, pos:pos + n] = row.ids[a:a + n] + 1
                next_ids[i, pos:pos + n] = row.ids[a + 1:a + n + 1]
                if char_ids is not None:
                    char_ids[i, pos:pos + n] = row.chars[a:a + n] + 1
                weights[i, pos:pos + n] = 1.0
                row.offset += n
                pos += n
            if self._rows[i] is not None and self._rows[i].remaining == 0:
                self._rows[i] = None
        n_real = int(np.count_nonzero(weights))
        if n_real == 0 and self._source.exhausted:
            self._ended = True
            return None
        self._batches += 1
        self._tokens += n_real
        return batch

    def iter_batches(self) -> Iterator[Batch]:
        """Batches from the current position: forever when training, to the end when testing."""
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    __iter__ = iter_batches

    # --- resume ----------------------------------------------------------------------------

    @property
    def counters(self) -> dict:
        """batches and sentences given so far, tokens = real (input, target) pairs, passes started."""
        return {"batches": self._batches, "sentences": self._sentences, "tokens": self._tokens,
                "passes": self._source.passes}

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
            "rows": [None if r is None else [r.shard, r.index, r.offset] for r in self._rows],
            "batches": self._batches,
            "sentences": self._sentences,
            "tokens": self._tokens,
            "ended": self._ended,
        }

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
        self._source.load_state_dict(state["source"])
        rows: list[Optional[_Row]] = []
        for entry in state["rows"]:
            if entry is None:
                rows.append(None)
            else:
                shard, index, offset = (int(v) for v in entry)
                if not 0 <= shard < len(self.shards):
                    raise ValueError(f"data state refers to shard {shard} of {len(self.shards)}")
                rows.append(self._make_row(shard, index, offset))
        self._rows = rows
        self._batches = int(state["batches"])
        self._sentences = int(state["sentences"])
        self._tokens = int(state["tokens"])
        self._ended = bool(state["ended"])


class BidirectionalLMDataset:
    """A forward and a backward LMDataset over the same shards, batched together.

    Each batch holds the forward arrays ('token_ids', 'char_ids', 'next_token_id', 'weights')
    and the backward ones with the suffix '_reverse'. The two streams shuffle independently
    (as in bilm-tf). When testing, both read the same sentences in the same order, so they end
    together; should one end first, its arrays are padding until the other ends.
    """

    def __init__(self, pattern: str, vocab: Union[str, Vocabulary], batch_size: int, unroll_steps: int,
                 test: bool = False, seed: int = 0, max_characters_per_token: Optional[int] = None):
        vocab = _resolve_vocab(vocab, max_characters_per_token)
        kwargs = dict(batch_size=batch_size, unroll_steps=unroll_steps, test=test, seed=seed)
        self.forward = LMDataset(pattern, vocab, reverse=False, **kwargs)
        self.backward = LMDataset(pattern, vocab, reverse=True, **kwargs)
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

    def iter_batches(self) -> Iterator[Batch]:
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    __iter__ = iter_batches

    def state_dict(self) -> dict:
        return {"forward": self.forward.state_dict(), "backward": self.backward.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.forward.load_state_dict(state["forward"])
        self.backward.load_state_dict(state["backward"])
