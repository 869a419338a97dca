"""Command line for the dumps (elmojax.infer.dumps): `elmojax dump` or `python -m elmojax.dump`.

  elmojax dump tokens --vocab V --options O --weights W --output token_embeddings.hdf5
  elmojax dump bilm --vocab V --input D --options O --weights W --output elmo.hdf5 [--stateful]
  elmojax dump elmo --input IN --output OUT (--all | --top | --average) --options O --weights W
      [--batch_size 64] [--use_sentence_keys] [--forget_sentences]      (AllenNLP's `allennlp elmo`)
  elmojax dump sentences --input IN --output OUT --options O --weights W [--layers average|top|K]
      [--pooling mean|max]
  elmojax dump score --input IN --output OUT.jsonl --options O --weights W --softmax S

The older spellings still work, with a one-line note naming the new one: hyphens (--batch-size),
bilm's --dataset and --out, elmo's, sentences' and score's positional INPUT OUTPUT.

bilm and elmo go in chunks of --chunk_lines lines through OUT.parts/ beside their output: run
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

from elmojax.cli import HelpFormatter, note_respelled, options, respell
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


def _model_arguments(p: argparse.ArgumentParser, vocab: bool = True) -> None:
    """The arguments every command takes: the biLM's files, the output, the multi-process runtime."""
    if vocab:
        p.add_argument("--vocab", required=True, help="vocabulary file, one token per line")
    p.add_argument("--options", help="the biLM's options.json (default: the one beside the weights)")
    p.add_argument("--model", "--weights", dest="weights", required=True,
                   help="the biLM: a published name (small, medium, original, original_5.5B, pubmed), an hdf5 weight "
                        "file (or a bilm-tf checkpoint) or its http(s) URL")
    p.add_argument("--quiet", action="store_true", help="no progress report")
    p.add_argument("--coordinator_address", help="multi-process: HOST:PORT of process 0")
    p.add_argument("--num_processes", type=int, help="multi-process: how many processes")
    p.add_argument("--process_id", type=int, help="multi-process: this process's index")


def _chunk_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk_lines", type=_positive, default=CHUNK_LINES,
                   help="lines a chunk: what a restart keeps, and a process's unit of work")


def _lines_to_file(commands, name: str, help: str) -> argparse.ArgumentParser:
    """A command from a text file of sentences (--input, or the older positional INPUT OUTPUT) to a file."""
    p = commands.add_parser(name, help=help, formatter_class=HelpFormatter)
    p.add_argument("input_file", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("output_file", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--input", help="text file, one whitespace-tokenized sentence per line, none blank")
    p.add_argument("--output", help="file to write (atomically)")
    _model_arguments(p, vocab=False)
    p.add_argument("--batch_size", type=_positive, default=64, help="sentences per call")
    return p


def _parser(prog: str) -> tuple[_Parser, dict]:
    """The command line's parser, and its commands' parsers by name."""
    parser = _Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    tokens = commands.add_parser("tokens", help="char CNN embedding of every vocabulary token",
                                 formatter_class=HelpFormatter)
    _model_arguments(tokens)
    tokens.add_argument("--output", required=True, help="hdf5 file to write (atomically)")
    bilm = commands.add_parser("bilm", help="all biLM layers for every line of a dataset", formatter_class=HelpFormatter)
    _model_arguments(bilm)
    bilm.add_argument("--input", required=True, help="text file, one whitespace-tokenized sentence per line")
    bilm.add_argument("--output", required=True, help="hdf5 file to write (atomically)")
    bilm.add_argument("--batch_size", type=_positive, default=64, help="sentences per call")
    bilm.add_argument("--stateful", action="store_true",
                      help="carry LSTM state from line to line, one line at a time, as bilm-tf does")
    _chunk_argument(bilm)
    elmo = _lines_to_file(commands, "elmo", "AllenNLP's `allennlp elmo`: a dataset per line, and sentence_to_index")
    layers = elmo.add_mutually_exclusive_group(required=True)
    for name, what in (("all", "every layer"), ("top", "the top layer"), ("average", "the layers' average")):
        layers.add_argument(f"--{name}", dest="output_format", action="store_const", const=name, help=what)
    elmo.add_argument("--use_sentence_keys", action="store_true", help="key each dataset by its sentence")
    elmo.add_argument("--forget_sentences", action="store_true", help="no sentence_to_index dataset")
    _chunk_argument(elmo)
    sentences = _lines_to_file(commands, "sentences", "one vector per line (dataset sentence_vectors)")
    sentences.add_argument("--layers", type=_layers, default="average", help="average, top or a layer K")
    sentences.add_argument("--pooling", choices=["mean", "max"], default="mean", help="over a sentence's tokens")
    score = _lines_to_file(commands, "score", "each line's tokens' log-probabilities and perplexity, as JSON lines")
    score.add_argument("--softmax", help="the softmax file (softmax/W, softmax/b, vocabulary; default: the one "
                                         "beside the weights)")
    return parser, dict(commands.choices)


def parse(argv, prog: str = "python -m elmojax.dump") -> argparse.Namespace:
    """The command line's arguments, older spellings in the new (with a note on stderr naming them):
    hyphens for underscores, --dataset and --out for --input and --output, positional INPUT OUTPUT."""
    parser, commands = _parser(prog)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    changed = []
    if command in commands:
        argv, changed = respell(argv, options(commands[command]), {"--dataset": "--input", "--out": "--output"})
    args = parser.parse_args(argv)
    if getattr(args, "input_file", None) is not None:  # elmo, sentences, score: INPUT [OUTPUT]
        sub = commands[args.command]
        if args.input is not None or (args.output_file is not None and args.output is not None):
            sub.error("give the input and output once: --input IN --output OUT (or the older INPUT OUTPUT)")
        args.input = args.input_file
        args.output = args.output if args.output_file is None else args.output_file
        changed.insert(0, ("INPUT OUTPUT" if args.output_file is not None else "INPUT",
                        "--input INPUT --output OUTPUT" if args.output_file is not None else "--input INPUT"))
    missing = [f"--{name}" for name in ("input", "output") if hasattr(args, name) and getattr(args, name) is None]
    if missing:
        commands[args.command].error(f"the following arguments are required: {', '.join(missing)}")
    note_respelled(f"{prog} {args.command}", changed)
    return args


def main(argv=None, prog: str = "python -m elmojax.dump") -> int:
    """Runs the command line `argv` (default: sys.argv's, less the program's name); its exit status."""
    args = parse(list(sys.argv[1:] if argv is None else argv), prog)
    setup()
    handler = LogHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    out = args.output
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
        dump_token_embeddings(args.vocab, args.options, args.weights, args.output, progress=not args.quiet)
    elif args.command == "bilm":
        dump_bilm_embeddings(args.vocab, args.input, args.options, args.weights, args.output,
                             batch_size=args.batch_size, stateful=args.stateful, progress=not args.quiet,
                             chunk_lines=args.chunk_lines)
    elif args.command == "elmo":
        dump_elmo(args.input, args.output, args.output_format, args.options, args.weights,
                  batch_size=args.batch_size, forget_sentences=args.forget_sentences,
                  use_sentence_keys=args.use_sentence_keys, progress=not args.quiet,
                  chunk_lines=args.chunk_lines)
    elif args.command == "score":
        dump_scores(args.input, args.output, args.options, args.weights, args.softmax, args.batch_size)
    else:
        dump_sentence_vectors(args.input, args.output, args.options, args.weights, args.layers,
                              args.pooling, args.batch_size)


if __name__ == "__main__":
    runtime.exit_command(main())
