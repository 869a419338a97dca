"""The corpus tool's library: tokenized text in, training shards, heldout shards and a
vocabulary file out (`python -m elmojax.prepare` is its command line).

Input: one sentence per line, whitespace-separated tokens, UTF-8 (plain or .gz). Blank lines
are dropped. The lines are shuffled with the seed; the first fraction becomes the heldout split.
The output is written to a temporary directory beside it and renamed into place only when
complete; a Stopped (SIGTERM, Ctrl-C) before then leaves the output as it was and no temporary
directory, as does the next run after a kill -9.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import logging
import os
import shutil
import unicodedata
from typing import Iterable, Optional, Sequence

import numpy as np

from elmojax.formats import files
from elmojax.formats.vocab import BOS, EOS, UNK
from elmojax.process import runtime

log = logging.getLogger(__name__)

SPECIALS = (BOS, EOS, UNK)
_NOT_WORDS = set(SPECIALS) | {"!!!MAXTERMID"}  # Vocabulary skips the marker line; keep it out
_WORD_JOINERS = {"'", "\u2019", "-"}  # kept inside a word: don't, l'homme, non-linear
_NUMBER_JOINERS = {".", ","}  # kept inside a number: 3.14, 1,000


@dataclasses.dataclass(frozen=True)
class CorpusSettings:
    """How a corpus becomes shards and a vocabulary (the command line's flags of the same names;
    split_punctuation is --tokenize). The checks' messages name the flags."""
    heldout_fraction: float = 0.01
    shard_lines: int = 100_000
    min_count: int = 1
    max_vocab: Optional[int] = None
    lowercase: bool = False
    split_punctuation: bool = False
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"--heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.shard_lines < 1:
            raise ValueError(f"--shard_lines must be at least 1, got {self.shard_lines}")
        if self.min_count < 1:
            raise ValueError(f"--min_count must be at least 1, got {self.min_count}")
        if self.max_vocab is not None and self.max_vocab < len(SPECIALS):
            raise ValueError(f"--max_vocab must be at least {len(SPECIALS)} (the special tokens), "
                             f"got {self.max_vocab}")
        if self.seed < 0:
            raise ValueError(f"--seed must be non-negative, got {self.seed}")


@dataclasses.dataclass(frozen=True)
class Split:
    """A corpus's sentences shuffled and split, and the vocabulary of its training part."""
    inputs: list[str]
    train: list[str]
    heldout: list[str]
    vocab: list[str]


def _is_punctuation(char: str) -> bool:
    return unicodedata.category(char)[0] in "PS"


def tokenize(line: str) -> list[str]:
    """Whitespace tokens with punctuation and symbols split off as tokens of their own.

    "In the beginning, God's (first) day." -> In the beginning , God's ( first ) day .
    An apostrophe or hyphen between letters stays in the word, "." or "," between digits in
    the number. Letters, digits and combining marks are word characters (any script).
    """
    tokens: list[str] = []
    for chunk in line.split():
        word = ""
        for k, char in enumerate(chunk):
            if not _is_punctuation(char):
                word += char
                continue
            after = chunk[k + 1] if k + 1 < len(chunk) else ""
            inside = word and after and not _is_punctuation(after)
            if inside and char in _WORD_JOINERS:
                word += char
            elif inside and char in _NUMBER_JOINERS and word[-1].isdigit() and after.isdigit():
                word += char
            else:
                if word:
                    tokens.append(word)
                    word = ""
                tokens.append(char)
        if word:
            tokens.append(word)
    return tokens


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Each input is a file or a glob pattern (matches sorted); an error for one matching nothing."""
    paths: list[str] = []
    for pattern in inputs:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"--input {pattern!r}: no such file (or no file matches the pattern)")
        paths.extend(matches)
    return paths


def read_corpus(paths: Iterable[str], lowercase: bool = False, split_punctuation: bool = False) -> list[str]:
    """The non-blank sentences of the input files (gzip-compressed where the name ends in .gz),
    tokens joined by single spaces."""
    sentences = []
    for path in paths:
        for _, line in files.read_lines(path, gzipped=path.endswith(".gz")):
            if lowercase:
                line = line.lower()
            tokens = tokenize(line) if split_punctuation else line.split()
            if tokens:
                sentences.append(" ".join(tokens))
    return sentences


def build_vocab(sentences: Iterable[str], min_count: int = 1, max_vocab: Optional[int] = None) -> list[str]:
    """<S>, </S>, <UNK>, then words by descending count (ties alphabetical), at most max_vocab in all."""
    counts = collections.Counter(word for sentence in sentences for word in sentence.split())
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in _NOT_WORDS),
                   key=lambda w: (-counts[w], w))
    vocab = list(SPECIALS) + words
    return vocab if max_vocab is None else vocab[:max_vocab]


def heldout_size(n_sentences: int, fraction: float) -> int:
    """round(n * fraction), at least 1 when the fraction is positive, leaving at least 1 to train on."""
    if fraction <= 0 or n_sentences < 2:
        return 0
    return min(max(1, int(round(n_sentences * fraction))), n_sentences - 1)


def split_corpus(paths: list[str], settings: CorpusSettings) -> Split:
    """The input files' sentences, shuffled with the seed, the first fraction held out."""
    sentences = read_corpus(paths, lowercase=settings.lowercase, split_punctuation=settings.split_punctuation)
    if not sentences:
        raise ValueError(f"no sentences in {', '.join(paths)} (all lines are blank)")
    order = np.random.default_rng(settings.seed).permutation(len(sentences))
    n_heldout = heldout_size(len(sentences), settings.heldout_fraction)
    heldout = [sentences[i] for i in order[:n_heldout]]
    train = [sentences[i] for i in order[n_heldout:]]
    vocab = build_vocab(train, min_count=settings.min_count, max_vocab=settings.max_vocab)
    return Split(paths, train, heldout, vocab)


def _write_shards(directory: str, sentences: Sequence[str], shard_lines: int) -> int:
    os.mkdir(directory)
    n_shards = 0
    for start in range(0, len(sentences), shard_lines):
        with open(os.path.join(directory, f"shard-{n_shards:05d}.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.writelines(s + "\n" for s in sentences[start:start + shard_lines])
        n_shards += 1
    return n_shards


def _check_output(output: str, overwrite: bool) -> None:
    if os.path.isfile(output) or (os.path.lexists(output) and not os.path.isdir(output)):
        raise ValueError(f"--output {output!r} exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ValueError(f"--output {output!r} exists and is not empty; choose a new directory or pass --overwrite")


def _restore_interrupted(output: str) -> None:
    """An output that a prepare killed outright (kill -9) while replacing it left aside
    (.OUTPUT.<pid>.<host>-<random>.old): put back if nothing took its place, else removed."""
    for old, pid in files.leftovers(output, suffix=".old"):
        if os.path.lexists(output):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, output)
            log.warning("note: %s: put back the earlier output, which process %d (killed while replacing "
                        "it) had left as %s", output, pid, old)


def prepare(inputs: Sequence[str], output: str, settings: CorpusSettings = CorpusSettings(),
            overwrite: bool = False) -> dict:
    """Writes the train/heldout shards and vocab.txt under `output`; returns counts and paths.

    Stopped (runtime.stop_on_signals) before the output is complete, it leaves no temporary
    directory and `output` as it was, and the Stopped's message says so ("nothing was written");
    the output's last renames are not cut in two."""
    output = os.path.abspath(output)
    try:
        _restore_interrupted(output)
        files.remove_leftovers(output)  # the temporary directories of prepares killed outright (kill -9)
        _check_output(output, overwrite)
        split = split_corpus(expand_inputs(inputs), settings)
    except runtime.Stopped as e:
        raise _stopped(e, output, written=False) from None
    shards = _write_output(output, split, settings.shard_lines, overwrite)
    return _summary(output, split, shards)


def _stopped(e: runtime.Stopped, output: str, written: bool) -> runtime.Stopped:
    """The Stopped that says whether the output was written."""
    return runtime.Stopped(f"{e}; {output} was written all the same" if written else f"{e}; nothing was written")


def _write_output(output: str, split: Split, shard_lines: int, overwrite: bool) -> tuple[int, int]:
    """Writes the split's shards and vocabulary in a temporary directory renamed onto `output`
    when whole; the numbers of train and heldout shards written."""
    os.makedirs(os.path.dirname(output), exist_ok=True)
    tmp = files.temporary_path(output)
    committed = False
    try:
        os.mkdir(tmp)
        n_train_shards = _write_shards(os.path.join(tmp, "train"), split.train, shard_lines)
        n_heldout_shards = (_write_shards(os.path.join(tmp, "heldout"), split.heldout, shard_lines)
                            if split.heldout else 0)
        with open(os.path.join(tmp, "vocab.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.writelines(w + "\n" for w in split.vocab)
        with files.uninterrupted():  # a SIGTERM or Ctrl-C now waits for the output to be whole
            _check_output(output, overwrite)
            if os.path.isdir(output) and os.listdir(output):
                old = files.temporary_path(output, suffix=".old")
                os.rename(output, old)
                os.rename(tmp, output)
                committed = True
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, output)  # onto nothing or an empty directory
                committed = True
    except BaseException as e:
        try:
            if not committed:
                with files.uninterrupted():
                    shutil.rmtree(tmp, ignore_errors=True)
        except runtime.Stopped as late:  # a signal while removing it
            e = late
        if isinstance(e, runtime.Stopped):
            raise _stopped(e, output, committed) from None
        raise
    return n_train_shards, n_heldout_shards


def _summary(output: str, split: Split, shards: tuple[int, int]) -> dict:
    """What prepare wrote: counts and paths."""
    known = set(split.vocab)
    heldout_tokens = [w for s in split.heldout for w in s.split()]
    return {
        "inputs": split.inputs,
        "output": output,
        "train_sentences": len(split.train),
        "train_tokens": sum(len(s.split()) for s in split.train),
        "train_shards": shards[0],
        "heldout_sentences": len(split.heldout),
        "heldout_tokens": len(heldout_tokens),
        "heldout_shards": shards[1],
        "heldout_oov": sum(w not in known for w in heldout_tokens),
        "vocab_size": len(split.vocab),
        "train_pattern": os.path.join(output, "train", "shard-*.txt"),
        "heldout_pattern": os.path.join(output, "heldout", "shard-*.txt") if split.heldout else None,
        "vocab_file": os.path.join(output, "vocab.txt"),
    }
