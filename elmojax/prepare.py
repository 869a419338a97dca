"""Turn tokenized text into training shards, heldout shards and a vocabulary file.

    elmojax prepare --input corpus.txt --output data/ [--heldout_fraction 0.01]
        [--shard_lines 100000] [--min_count 1] [--max_vocab N] [--lowercase] [--tokenize] [--seed 0]

(or python -m elmojax.prepare; the older hyphens, --heldout-fraction, still work, with a note).

Input: one sentence per line, whitespace-separated tokens, UTF-8 (plain or .gz; --input takes
files or glob patterns and may be repeated). Blank lines are dropped. The lines are shuffled with
the seed; the first fraction becomes the heldout split. A byte-order mark at a file's start and
Windows line ends (CRLF) are read as plain text, with a note. Output (written to a temporary
directory beside DIR, renamed onto DIR only when complete; SIGTERM or Ctrl-C before then leave
DIR as it was and no temporary directory, as does the next run after a kill -9):

    DIR/train/shard-00000.txt ...     training sentences, --shard_lines per file
    DIR/heldout/shard-00000.txt ...   heldout sentences (none when the fraction gives none)
    DIR/vocab.txt                     <S>, </S>, <UNK>, then training words by descending
                                      count (ties alphabetical), count >= --min_count,
                                      at most --max_vocab lines in all

The library behind it is elmojax.data.corpus.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

from elmojax.cli import HelpFormatter, note_respelled, options, respell
from elmojax.data.corpus import CorpusSettings, prepare
from elmojax.process import runtime


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


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--input", action="append", required=True, metavar="FILE_OR_GLOB",
                        help="tokenized text, one sentence per line (.gz too); repeatable")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to create")
    parser.add_argument("--heldout_fraction", type=float, default=0.01, help="share of sentences held out")
    parser.add_argument("--shard_lines", type=int, default=100_000, help="sentences per shard file")
    parser.add_argument("--min_count", type=int, default=1, help="keep words seen at least this often")
    parser.add_argument("--max_vocab", type=int, default=None, help="at most this many vocab.txt lines in all")
    parser.add_argument("--lowercase", action="store_true", help="lowercase the text")
    parser.add_argument("--tokenize", action="store_true", help="split punctuation from words")
    parser.add_argument("--seed", type=int, default=0, help="shuffling seed")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m elmojax.prepare") -> None:
    """Runs the command line `argv` (default: sys.argv's, less the program's name)."""
    parser = _parser(prog)
    argv, changed = respell(list(sys.argv[1:] if argv is None else argv), options(parser))
    args = parser.parse_args(argv)
    note_respelled(prog, changed)
    try:
        settings = CorpusSettings(heldout_fraction=args.heldout_fraction, shard_lines=args.shard_lines,
                                  min_count=args.min_count, max_vocab=args.max_vocab, lowercase=args.lowercase,
                                  split_punctuation=args.tokenize, seed=args.seed)
        with runtime.stop_on_signals():  # SIGTERM, Ctrl-C: no temporary directory left, the output untouched
            summary = prepare(args.input, args.output, settings, overwrite=args.overwrite)
    except runtime.Stopped as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        runtime.exit_command(e.exit_status)
    except (ValueError, OSError) as e:
        sys.exit(f"{parser.prog}: error: {e}")
    print(format_summary(summary))


if __name__ == "__main__":
    main()
