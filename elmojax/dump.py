"""Command line for the dump functions.

  python -m elmojax.dump tokens --vocab V --options O --weights W --out token_embeddings.hdf5
  python -m elmojax.dump bilm --vocab V --dataset D --options O --weights W --out elmo.hdf5 [--stateful]
"""

from __future__ import annotations

import argparse
import logging
import sys

from elmojax.embed import dump_bilm_embeddings, dump_token_embeddings
from elmojax.runtime import setup


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elmojax.dump", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--vocab", required=True, help="vocabulary file, one token per line")
        p.add_argument("--options", required=True, help="the biLM's options.json")
        p.add_argument("--weights", required=True, help="the biLM's hdf5 weight file")
        p.add_argument("--out", required=True, help="hdf5 file to write (atomically)")
        p.add_argument("--quiet", action="store_true", help="no progress report")

    tokens = commands.add_parser("tokens", help="char CNN embedding of every vocabulary token")
    common(tokens)
    bilm = commands.add_parser("bilm", help="all biLM layers for every line of a dataset")
    common(bilm)
    bilm.add_argument("--dataset", required=True, help="text file, one whitespace-tokenized sentence per line")
    bilm.add_argument("--batch-size", type=int, default=64, help="sentences per call (default 64)")
    bilm.add_argument("--stateful", action="store_true",
                      help="carry LSTM state from line to line, one line at a time, as bilm-tf does")
    args = parser.parse_args(argv)
    setup()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "tokens":
            dump_token_embeddings(args.vocab, args.options, args.weights, args.out, progress=not args.quiet)
        else:
            dump_bilm_embeddings(args.vocab, args.dataset, args.options, args.weights, args.out,
                                 batch_size=args.batch_size, stateful=args.stateful, progress=not args.quiet)
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
