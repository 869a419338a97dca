"""Command line for the dumps (elmojax.infer.dumps).

  python -m elmojax.dump tokens --vocab V --options O --weights W --out token_embeddings.hdf5
  python -m elmojax.dump bilm --vocab V --dataset D --options O --weights W --out elmo.hdf5 [--stateful]
  python -m elmojax.dump elmo INPUT OUTPUT (--all | --top | --average) --options O --weights W
      [--batch-size 64] [--use-sentence-keys] [--forget-sentences]      (AllenNLP's `allennlp elmo`)
  python -m elmojax.dump sentences INPUT OUTPUT --options O --weights W [--layers average|top|K]
      [--pooling mean|max]
  python -m elmojax.dump score INPUT OUTPUT.jsonl --options O --weights W --softmax S

bilm and elmo go in chunks of --chunk-lines lines through OUT.parts/ beside their output: run
again with the same arguments, a stopped dump continues where it stopped. They run as several
processes on JAX's multi-controller runtime, each embedding its share of the chunks, with
training's flags (--coordinator_address HOST:PORT --num_processes N --process_id I) or as the
tasks of a SLURM job step; process 0 merges the chunks into the one output file.

What goes wrong is one line on stderr: a bad argument (exit 2), a missing or wrong file, a full
disk, a work directory in use by another dump (exit 1); SIGINT or SIGTERM stop a dump with a
line saying what is done and kept (exit 130 or 143), leaving no temporary file behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading

import jax

from elmojax.infer.dumps import (CHUNK_LINES, dump_bilm_embeddings, dump_elmo, dump_scores, dump_sentence_vectors,
                           dump_token_embeddings)
from elmojax.process import runtime
from elmojax.process.runtime import LogHandler, Stopped, initialize_distributed, setup, stop_on_signals


def _layers(value: str):
    return int(value) if value.isdigit() else value


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {number}")
    return number


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (and exit status 2), the usage left to --help."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _identity(path: str):
    """Which file is at `path` (None: none)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _model_arguments(p: argparse.ArgumentParser, vocab: bool = True, out: bool = True) -> None:
    """The arguments every command takes: the biLM's files, the output, the multi-process runtime."""
    if vocab:
        p.add_argument("--vocab", required=True, help="vocabulary file, one token per line")
    p.add_argument("--options", help="the biLM's options.json (default: the one beside the weights)")
    p.add_argument("--model", "--weights", dest="weights", required=True,
                   help="the biLM: a published name (small, medium, original, original_5.5B, pubmed), an hdf5 weight "
                        "file (or a bilm-tf checkpoint) or its http(s) URL")
    if out:
        p.add_argument("--out", required=True, help="hdf5 file to write (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress report")
    p.add_argument("--coordinator_address", "--coordinator-address", help="multi-process: HOST:PORT of process 0")
    p.add_argument("--num_processes", "--num-processes", type=int, help="multi-process: how many processes")
    p.add_argument("--process_id", "--process-id", type=int, help="multi-process: this process's index")


def _chunk_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-lines", type=_positive, default=CHUNK_LINES,
                   help=f"lines a chunk: what a restart keeps, and a process's unit of work (default {CHUNK_LINES})")


def _lines_to_file(commands, name: str, help: str) -> argparse.ArgumentParser:
    """A command from a text file of sentences to an output file."""
    p = commands.add_parser(name, help=help)
    p.add_argument("input_file", help="text file, one whitespace-tokenized sentence per line, none blank")
    p.add_argument("output_file", help="file to write (atomically)")
    _model_arguments(p, vocab=False, out=False)
    p.add_argument("--batch-size", type=_positive, default=64, help="sentences per call (default 64)")
    return p


def _parser() -> _Parser:
    parser = _Parser(prog="python -m elmojax.dump", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    tokens = commands.add_parser("tokens", help="char CNN embedding of every vocabulary token")
    _model_arguments(tokens)
    bilm = commands.add_parser("bilm", help="all biLM layers for every line of a dataset")
    _model_arguments(bilm)
    bilm.add_argument("--dataset", required=True, help="text file, one whitespace-tokenized sentence per line")
    bilm.add_argument("--batch-size", type=_positive, default=64, help="sentences per call (default 64)")
    bilm.add_argument("--stateful", action="store_true",
                      help="carry LSTM state from line to line, one line at a time, as bilm-tf does")
    _chunk_argument(bilm)
    elmo = _lines_to_file(commands, "elmo", "AllenNLP's `allennlp elmo`: a dataset per line, and sentence_to_index")
    layers = elmo.add_mutually_exclusive_group(required=True)
    for name, what in (("all", "every layer"), ("top", "the top layer"), ("average", "the layers' average")):
        layers.add_argument(f"--{name}", dest="output_format", action="store_const", const=name, help=what)
    elmo.add_argument("--use-sentence-keys", action="store_true", help="key each dataset by its sentence")
    elmo.add_argument("--forget-sentences", action="store_true", help="no sentence_to_index dataset")
    _chunk_argument(elmo)
    sentences = _lines_to_file(commands, "sentences", "one vector per line (dataset sentence_vectors)")
    sentences.add_argument("--layers", type=_layers, default="average", help="average (default), top or a layer K")
    sentences.add_argument("--pooling", choices=["mean", "max"], default="mean")
    score = _lines_to_file(commands, "score", "each line's tokens' log-probabilities and perplexity, as JSON lines")
    score.add_argument("--softmax", help="the softmax file (softmax/W, softmax/b, vocabulary; default: the one "
                                         "beside the weights)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    setup()
    handler = LogHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    out = getattr(args, "out", None) or args.output_file
    before = _identity(out)
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {}
    try:
        # before the handlers (Ctrl-C meanwhile is a KeyboardInterrupt): the multi-controller runtime
        # (it may wait long for the other processes), so that they replace the SIGTERM handler of
        # JAX's preemption service, and JAX's backends, whose set-up catches any Exception
        if initialize_distributed(args.coordinator_address, args.num_processes, args.process_id) and \
                args.command not in ("bilm", "elmo") and jax.process_count() > 1:
            raise ValueError(f"{args.command} runs as one process (bilm and elmo run as several), "
                             f"not {jax.process_count()}")
        jax.local_devices()
        if main_thread:
            # ignored once stop_on_signals is left: a signal then cannot cut the report short
            handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        with stop_on_signals():
            _run(args)
    except Stopped as e:
        message = str(e)
        if re.fullmatch(r"stopped by \w+", message):  # not a dump's own account of what is left
            message += f" after {out} was written" if _identity(out) != before else f"; {out} was not written"
        print(message, file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print(f"stopped by SIGINT; {out} was not written", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a file system gone read-only, a missing file
        print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        for sig, previous in handlers.items():
            if previous is not None:
                signal.signal(sig, previous)
    print(f"wrote {out}")
    return 0


def _run(args) -> None:
    if args.command == "tokens":
        dump_token_embeddings(args.vocab, args.options, args.weights, args.out, progress=not args.quiet)
    elif args.command == "bilm":
        dump_bilm_embeddings(args.vocab, args.dataset, args.options, args.weights, args.out,
                             batch_size=args.batch_size, stateful=args.stateful, progress=not args.quiet,
                             chunk_lines=args.chunk_lines)
    elif args.command == "elmo":
        dump_elmo(args.input_file, args.output_file, args.output_format, args.options, args.weights,
                  batch_size=args.batch_size, forget_sentences=args.forget_sentences,
                  use_sentence_keys=args.use_sentence_keys, progress=not args.quiet,
                  chunk_lines=args.chunk_lines)
    elif args.command == "score":
        dump_scores(args.input_file, args.output_file, args.options, args.weights, args.softmax, args.batch_size)
    else:
        dump_sentence_vectors(args.input_file, args.output_file, args.options, args.weights, args.layers,
                              args.pooling, args.batch_size)


if __name__ == "__main__":
    runtime.exit_command(main())
