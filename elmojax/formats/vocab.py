"""Vocabularies and batchers with bilm-tf's file format and id layout.

A vocabulary file has one token per line (UTF-8), including <S> and </S> (and <UNK> for
training). `Batcher` and `TokenBatcher` give exactly bilm-tf's arrays: <S> and </S> added
around each sentence, ids + 1, 0 = padding.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from elmojax.formats import files

log = logging.getLogger(__name__)

BOS, EOS, UNK = "<S>", "</S>", "<UNK>"

# Character ids: UTF-8 bytes are 0-255; then the specials.
BOS_CHAR, EOS_CHAR, BOW_CHAR, EOW_CHAR, PAD_CHAR = 256, 257, 258, 259, 260


def _check_token(word: str, filename: str, number: int) -> None:
    """A vocabulary line is one token: a blank line, or one with whitespace inside (spaces, tabs,
    any Unicode whitespace: what str.split() splits a corpus line at), could never match a
    corpus token."""
    parts = word.split()
    if len(parts) == 1:
        return
    if not parts:
        raise ValueError(f"{filename}, line {number}: a blank line; a vocabulary has one token per line")
    raise ValueError(f"{filename}, line {number}: {word!r} holds whitespace; a vocabulary has one token per line")


class Vocabulary:
    """A token vocabulary: maps tokens to line numbers of the vocabulary file.

    <S> and </S> must be in the file (every sentence is wrapped in them); <UNK> is needed only
    to encode tokens the file lacks (`validate_file=True` requires it up front, as for training).
    A line is one token: a blank line, or one with whitespace inside, is an error naming it. The
    file is read as elmojax.formats.files reads text (a byte-order mark and CRLF line ends noted and
    ignored).
    """

    def __init__(self, filename: str, validate_file: bool = False):
        self.filename = filename
        self._id_to_word: list[str] = []
        self._word_to_id: dict[str, int] = {}
        line_of: dict[str, int] = {}
        for number, line in files.read_lines(filename):
            word = line.strip()
            if word == "!!!MAXTERMID":  # a marker some vocab dumps carry; not a token
                continue
            _check_token(word, filename, number)
            if validate_file and word in line_of:
                raise ValueError(f"{filename}, line {number}: '{word}' is already on line {line_of[word]}; "
                                 f"a vocabulary lists each token once")
            line_of.setdefault(word, number)
            self._word_to_id[word] = len(self._id_to_word)
            self._id_to_word.append(word)
        required = (BOS, EOS, UNK) if validate_file else (BOS, EOS)
        missing = [t for t in required if t not in self._word_to_id]
        if missing:
            raise ValueError(f"{filename}: vocabulary file has no line {' or '.join(missing)}; "
                             f"it must contain the special tokens {', '.join(required)}")
        self._bos = self._word_to_id[BOS]
        self._eos = self._word_to_id[EOS]
        self._unk = self._word_to_id.get(UNK, -1)
        if validate_file and max(self._bos, self._eos, self._unk) > 2:
            # the sampled softmax's log-uniform sampler takes ids as frequency ranks
            log.warning("warning: %s: %s are not its first three lines; bilm-tf's vocabularies put them first, "
                        "then the tokens by descending count (python -m elmojax.prepare writes one so)",
                        filename, ", ".join((BOS, EOS, UNK)))

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def eos(self) -> int:
        return self._eos

    @property
    def unk(self) -> int:
        return self._unk

    @property
    def size(self) -> int:
        return len(self._id_to_word)

    def __len__(self) -> int:
        return self.size

    def word_to_id(self, word: str) -> int:
        found = self._word_to_id.get(word)
        if found is not None:
            return found
        if self._unk < 0:
            raise KeyError(f"token {word!r} is not in {self.filename}, which has no {UNK} line to stand for it")
        return self._unk

    def id_to_word(self, cur_id: int) -> str:
        return self._id_to_word[cur_id]

    def decode(self, cur_ids: Sequence[int]) -> str:
        return " ".join(self.id_to_word(i) for i in cur_ids)

    def encode(self, sentence, reverse: bool = False, split: bool = True) -> np.ndarray:
        """Token ids of a sentence with <S> and </S> added (swapped when `reverse`)."""
        words = sentence.split() if split else sentence
        ids = [self.word_to_id(w) for w in words]
        first, last = (self.eos, self.bos) if reverse else (self.bos, self.eos)
        return np.array([first] + ids + [last], dtype=np.int32)


def spell(word: str, max_word_length: int) -> np.ndarray:
    """A token's character ids (max_word_length,): [bow, UTF-8 bytes cut to max_word_length - 2,
    eow, pad, ...]; <S> and </S> are [bow, bos|eos, eow, pad, ...]."""
    code = np.full(max_word_length, PAD_CHAR, dtype=np.int32)
    code[0] = BOW_CHAR
    if word in (BOS, EOS):
        code[1:3] = (BOS_CHAR if word == BOS else EOS_CHAR), EOW_CHAR
        return code
    encoded = word.encode("utf-8", "ignore")[: max_word_length - 2]
    code[1 : len(encoded) + 1] = np.frombuffer(encoded, dtype=np.uint8)
    code[len(encoded) + 1] = EOW_CHAR
    return code


class UnicodeCharsVocabulary(Vocabulary):
    """A vocabulary that also spells tokens as character ids (UTF-8 bytes plus specials).

    Each token is spelled by `spell` in max_word_length character ids; tokens of the file once
    up front, others on demand.
    """

    def __init__(self, filename: str, max_word_length: int, **kwargs):
        if isinstance(max_word_length, bool) or not isinstance(max_word_length, (int, np.integer)) or \
                max_word_length < 3:
            raise ValueError(f"max_word_length (max_characters_per_token) must be an integer of at least 3, got "
                             f"{max_word_length!r}")
        super().__init__(filename, **kwargs)
        self._max_word_length = max_word_length
        self.bos_char, self.eos_char = BOS_CHAR, EOS_CHAR
        self.bow_char, self.eow_char, self.pad_char = BOW_CHAR, EOW_CHAR, PAD_CHAR
        self.bos_chars = spell(BOS, max_word_length)
        self.eos_chars = spell(EOS, max_word_length)
        self._word_char_ids = np.stack([spell(w, max_word_length) for w in self._id_to_word])

    @property
    def word_char_ids(self) -> np.ndarray:
        return self._word_char_ids

    @property
    def max_word_length(self) -> int:
        return self._max_word_length

    def word_to_char_ids(self, word: str) -> np.ndarray:
        found = self._word_to_id.get(word)
        if found is not None:
            return self._word_char_ids[found]
        return spell(word, self._max_word_length)

    def encode_chars(self, sentence, reverse: bool = False, split: bool = True) -> np.ndarray:
        """Character ids (n_tokens + 2, max_word_length) with <S> and </S> (swapped when `reverse`)."""
        words = sentence.split() if split else sentence
        first, last = (self.eos_chars, self.bos_chars) if reverse else (self.bos_chars, self.eos_chars)
        return np.vstack([first] + [self.word_to_char_ids(w) for w in words] + [last])


def check_tokens(tokens, name: str) -> list[str]:
    """The tokens as a list, from any iterable of str; a TypeError naming `name` (and the
    token's place) for one that is not a str or for something not iterable."""
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"{name} must be a list of str tokens, got one {type(tokens).__name__}")
    try:
        out = list(tokens)
    except TypeError:
        raise TypeError(f"{name} must be a list of str tokens, got {type(tokens).__name__}") from None
    for t, token in enumerate(out):
        if not isinstance(token, str):
            raise TypeError(f"{name}[{t}] must be a str token, got {type(token).__name__} {token!r:.60}")
    return out


def _check_sentences(sentences, name: str = "sentences") -> list[list[str]]:
    """The sentences as a list of token lists, from any iterable of sentences (a list, a
    generator, ...), each an iterable of str tokens (a list, a tuple). A str where the sentences
    or a sentence should be, a token that is not a str, or something not iterable is a
    TypeError naming it; no sentence at all a ValueError."""
    shape = "an iterable of sentences, each a list of str tokens (e.g. [line.split() for line in lines])"
    if isinstance(sentences, (str, bytes)):
        raise TypeError(f"{name} must be {shape}; got one {type(sentences).__name__}")
    try:
        items = iter(sentences)
    except TypeError:
        raise TypeError(f"{name} must be {shape}; got {type(sentences).__name__}") from None
    out = []
    for k, sentence in enumerate(items):
        if isinstance(sentence, (str, bytes)):
            raise TypeError(f"{name}[{k}] is a {type(sentence).__name__}; give each sentence as a list of tokens "
                            f"(e.g. line.split())")
        out.append(check_tokens(sentence, f"{name}[{k}]"))
    if not out:
        raise ValueError(f"{name}: batch_sentences needs at least one sentence")
    return out


def batch_char_ids(sentences: Sequence[Sequence[str]], max_token_length: int = 50,
                   vocab: Optional[UnicodeCharsVocabulary] = None) -> np.ndarray:
    """Batcher's ids (n, max_len + 2, max_token_length): char ids + 1, 0 = padding, <S> and </S>
    around each sentence, as elmojax's Elmo and BidirectionalLanguageModel take them. A token's
    spelling does not depend on a vocabulary; `vocab`, if given, only has its tokens spelled
    already."""
    sentences = _check_sentences(sentences)
    if isinstance(max_token_length, (bool, np.bool_)) or not isinstance(max_token_length, (int, np.integer)):
        raise TypeError(f"max_token_length must be an integer, got {max_token_length!r}")
    if max_token_length < 3:
        raise ValueError(f"max_token_length must be at least 3 (<bow>, a character, <eow>), got {max_token_length}")
    if vocab is not None and vocab.max_word_length != max_token_length:
        raise ValueError(f"vocab spells tokens in {vocab.max_word_length} characters, but max_token_length is "
                         f"{max_token_length}")
    char_ids = np.zeros((len(sentences), max(len(s) for s in sentences) + 2, max_token_length), dtype=np.int64)
    for k, sentence in enumerate(sentences):
        if vocab is not None:
            char_ids[k, : len(sentence) + 2] = vocab.encode_chars(sentence, split=False) + 1
        else:
            char_ids[k, : len(sentence) + 2] = np.stack([spell(w, max_token_length) for w in [BOS, *sentence, EOS]]) + 1
    return char_ids


def batch_to_ids(sentences: Sequence[Sequence[str]]) -> np.ndarray:
    """AllenNLP's `batch_to_ids` (allennlp.modules.elmo), exactly: each token's 50 character ids
    + 1 (0 = padding), (n, T, 50), no <S> and </S> (AllenNLP's Elmo, and elmojax.allennlp's, add
    them). elmojax's own `Elmo` and BidirectionalLanguageModel take `batch_char_ids`' ids, which
    hold them; neither needs a vocabulary file."""
    ids = batch_char_ids(sentences, 50)  # <S>, the tokens, </S>, padding
    lengths = (ids > 0).any(axis=-1).sum(axis=1) - 2
    ids[np.arange(len(ids)), lengths + 1] = 0  # </S> off
    return ids[:, 1:-1]


class Batcher:
    """Batches tokenized sentences into character ids (n, max_len + 2, max_token_length)."""

    def __init__(self, lm_vocab_file: str, max_token_length: int):
        self._lm_vocab = UnicodeCharsVocabulary(lm_vocab_file, max_token_length)
        self._max_token_length = max_token_length

    def batch_sentences(self, sentences: Sequence[Sequence[str]]) -> np.ndarray:
        """[['The', 'first', '.'], ['Second', '.']] -> int64 char ids + 1, 0 = padding. Any
        iterable of sentences, each a list (or tuple) of str tokens."""
        return batch_char_ids(sentences, self._max_token_length, self._lm_vocab)


class TokenBatcher:
    """Batches tokenized sentences into token ids (n, max_len + 2), for cached token embeddings."""

    def __init__(self, lm_vocab_file: str):
        self._lm_vocab = Vocabulary(lm_vocab_file)

    def batch_sentences(self, sentences: Sequence[Sequence[str]]) -> np.ndarray:
        """[['The', 'first', '.'], ['Second', '.']] -> int64 token ids + 1, 0 = padding. Any
        iterable of sentences, each a list (or tuple) of str tokens."""
        sentences = _check_sentences(sentences)
        max_length = max(len(s) for s in sentences) + 2
        ids = np.zeros((len(sentences), max_length), dtype=np.int64)
        for k, sentence in enumerate(sentences):
            ids[k, : len(sentence) + 2] = self._lm_vocab.encode(sentence, split=False) + 1
        return ids
