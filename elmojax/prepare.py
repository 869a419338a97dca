"""Turn tokenized text into training shards, heldout shards and a vocabulary file.

    python -m elmojax.prepare --input corpus.txt --output data/ [--heldout-fraction 0.01]
        [--shard-lines 100000] [--min-count 1] [--max-vocab N] [--lowercase] [--tokenize] [--seed 0]

Input: one sentence per line, whitespace-separated tokens, UTF-8 (plain or .gz; --input takes
files or glob patterns and may be repeated). Blank lines are dropped. The lines are shuffled with
the seed; the first fraction becomes the heldout split. A byte-order mark at a file's start and
Windows line ends (CRLF) are read as plain text, with a note. Output (written to a temporary
directory beside DIR, renamed onto DIR only when complete; SIGTERM or Ctrl-C before then leave
DIR as it was and no temporary directory, as does the next run after a kill -9):

    DIR/train/shard-00000.txt ...     training sentences, --shard-lines per file
    DIR/heldout/shard-00000.txt ...   heldout sentences (none when the fraction gives none)
    DIR/vocab.txt                     <S>, </S>, <UNK>, then training words by descending
                                      count (ties alphabetical), count >= --min-count,
                                      at most --max-vocab lines in all
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import logging
import os
import shlex
import shutil
import sys
import unicodedata
import zlib
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from elmojax.formats import files
from elmojax.formats.vocab import BOS, EOS, UNK
from elmojax.process import runtime

log = logging.getLogger(__name__)

SPECIALS = (BOS, EOS, UNK)
_NOT_WORDS = set(SPECIALS) | {"!!!MAXTERMID"}  # Vocabulary skips the marker line; keep it out
_WORD_JOINERS = {"'", "\u2019", "-"}  # kept inside a word: don't, l'homme, non-linear
_NUMBER_JOINERS = {".", ","}  # kept inside a number: 3.14, 1,000


def read_text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 file, gzip-compressed when it ends in .gz (read
    as files.read_lines reads text: a byte-order mark and CRLF line ends noted and ignored)."""
    if not path.endswith(".gz"):
        yield from files.read_lines(path)
        return
    try:
        yield from files.read_lines(path, opener=gzip.open)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable gzip file ({e})") from None


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
    """The non-blank sentences of the input files, tokens joined by single spaces."""
    sentences = []
    for path in paths:
        for _, line in read_text_lines(path):
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


def prepare(inputs: Sequence[str], output: str, heldout_fraction: float = 0.01, shard_lines: int = 100_000,
            min_count: int = 1, max_vocab: Optional[int] = None, lowercase: bool = False,
            split_punctuation: bool = False, seed: int = 0, overwrite: bool = False) -> dict:
    """Writes the train/heldout shards and vocab.txt under `output`; returns counts and paths.

    Stopped (runtime.stop_on_signals) before the output is complete, it leaves no temporary
    directory and `output` as it was, and the Stopped's message says so ("nothing was written");
    the output's last renames are not cut in two."""
    written: list[bool] = []
    try:
        return _prepare(inputs, output, heldout_fraction, shard_lines, min_count, max_vocab, lowercase,
                        split_punctuation, seed, overwrite, written)
    except runtime.Stopped as e:
        done = any(written)
        raise runtime.Stopped(f"{e}; {os.path.abspath(output)} was written all the same" if done
                              else f"{e}; nothing was written") from None


def _prepare(inputs, output, heldout_fraction, shard_lines, min_count, max_vocab, lowercase, split_punctuation,
             seed, overwrite, written: list[bool]) -> dict:
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    if shard_lines < 1:
        raise ValueError(f"--shard-lines must be at least 1, got {shard_lines}")
    if min_count < 1:
        raise ValueError(f"--min-count must be at least 1, got {min_count}")
    if max_vocab is not None and max_vocab < len(SPECIALS):
        raise ValueError(f"--max-vocab must be at least {len(SPECIALS)} (the special tokens), got {max_vocab}")
    if seed < 0:
        raise ValueError(f"--seed must be non-negative, got {seed}")
    output = os.path.abspath(output)
    _restore_interrupted(output)
    files.remove_leftovers(output)  # the temporary directories of prepares killed outright (kill -9)
    _check_output(output, overwrite)
    paths = expand_inputs(inputs)

    sentences = read_corpus(paths, lowercase=lowercase, split_punctuation=split_punctuation)
    if not sentences:
        raise ValueError(f"no sentences in {', '.join(paths)} (all lines are blank)")
    order = np.random.default_rng(seed).permutation(len(sentences))
    n_heldout = heldout_size(len(sentences), heldout_fraction)
    heldout = [sentences[i] for i in order[:n_heldout]]
    train = [sentences[i] for i in order[n_heldout:]]
    vocab = build_vocab(train, min_count=min_count, max_vocab=max_vocab)

    os.makedirs(os.path.dirname(output), exist_ok=True)
    tmp = files.temporary_path(output)
    committed = False
    try:
        os.mkdir(tmp)
        n_train_shards = _write_shards(os.path.join(tmp, "train"), train, shard_lines)
        n_heldout_shards = _write_shards(os.path.join(tmp, "heldout"), heldout, shard_lines) if heldout else 0
        with open(os.path.join(tmp, "vocab.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.writelines(w + "\n" for w in vocab)
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
    except BaseException:
        if not committed:
            with files.uninterrupted():
                shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        written.append(committed)

    known = set(vocab)
    heldout_tokens = [w for s in heldout for w in s.split()]
    return {
        "inputs": paths,
        "output": output,
        "train_sentences": len(train),
        "train_tokens": sum(len(s.split()) for s in train),
        "train_shards": n_train_shards,
        "heldout_sentences": len(heldout),
        "heldout_tokens": len(heldout_tokens),
        "heldout_shards": n_heldout_shards,
        "heldout_oov": sum(w not in known for w in heldout_tokens),
        "vocab_size": len(vocab),
        "train_pattern": os.path.join(output, "train", "shard-*.txt"),
        "heldout_pattern": os.path.join(output, "heldout", "shard-*.txt") if heldout else None,
        "vocab_file": os.path.join(output, "vocab.txt"),
    }


def config_flags(summary: dict) -> list[str]:
    """The flags that point `python -m elmojax.main` at the prepared data (elmojax/train/config.py's names),
    all of them: without a heldout split, an empty heldout_prefix, so that no config's own heldout
    data (another corpus, another vocabulary) is scored instead."""
    flags = [f"--config.data.train_prefix={shlex.quote(summary['train_pattern'])}",
             f"--config.data.heldout_prefix={shlex.quote(summary['heldout_pattern'] or '')}"]
    flags.append(f"--config.data.vocab_file={shlex.quote(summary['vocab_file'])}")
    flags.append(f"--config.train.n_train_tokens={summary['train_tokens']}")
    return flags


def format_summary(summary: dict) -> str:
    s = summary
    oov = f", {100 * s['heldout_oov'] / s['heldout_tokens']:.2f}% out of vocabulary" if s["heldout_tokens"] else ""
    lines = [
        f"read {len(s['inputs'])} file(s); wrote {s['output']}",
        f"  train:   {s['train_sentences']} sentences, {s['train_tokens']} tokens, {s['train_shards']} shard(s)",
        f"  heldout: {s['heldout_sentences']} sentences, {s['heldout_tokens']} tokens, "
        f"{s['heldout_shards']} shard(s){oov}",
        f"  vocab:   {s['vocab_size']} entries (<S>, </S>, <UNK> and {s['vocab_size'] - 3} words)",
        "flags for python -m elmojax.main:",
        "  " + " ".join(config_flags(s)),
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m elmojax.prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", action="append", required=True, metavar="FILE_OR_GLOB",
                        help="tokenized text, one sentence per line (.gz too); repeatable")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to create")
    parser.add_argument("--heldout-fraction", type=float, default=0.01, help="share of sentences held out")
    parser.add_argument("--shard-lines", type=int, default=100_000, help="sentences per shard file")
    parser.add_argument("--min-count", type=int, default=1, help="keep words seen at least this often")
    parser.add_argument("--max-vocab", type=int, default=None, help="at most this many vocab.txt lines in all")
    parser.add_argument("--lowercase", action="store_true", help="lowercase the text")
    parser.add_argument("--tokenize", action="store_true", help="split punctuation from words")
    parser.add_argument("--seed", type=int, default=0, help="shuffling seed")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    args = parser.parse_args(argv)
    try:
        with runtime.stop_on_signals():  # SIGTERM, Ctrl-C: no temporary directory left, the output untouched
            summary = prepare(args.input, args.output, heldout_fraction=args.heldout_fraction,
                              shard_lines=args.shard_lines, min_count=args.min_count, max_vocab=args.max_vocab,
                              lowercase=args.lowercase, split_punctuation=args.tokenize, seed=args.seed,
                              overwrite=args.overwrite)
    except runtime.Stopped as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        runtime.exit_command(e.exit_status)
    except (ValueError, OSError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
    print(format_summary(summary))


if __name__ == "__main__":
    main()
