"""Input pipeline speed: packed bidirectional training batches (token ids, char ids, targets,
weights, both directions) produced per second on one CPU core, no model.

  python benchmarks/data_pipeline.py --batch 128 --unroll 20 --batches 200

Reads the bundled corpus sample (looping over it as training does). Tokens are batch x unroll
per batch. Prints a table on stderr and one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--max-characters", type=int, default=50)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    import elmojax

    elmojax.setup()  # the process-wide settings the command lines apply
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core

    from elmojax.data import BidirectionalLMDataset
    from elmojax.formats.vocab import UnicodeCharsVocabulary

    vocab = UnicodeCharsVocabulary(os.path.join(common.SAMPLE, "vocab.txt"), args.max_characters, validate_file=True)
    dataset = BidirectionalLMDataset(os.path.join(common.SAMPLE, "train", "shard-*.txt"), vocab, args.batch,
                                     args.unroll, max_characters_per_token=args.max_characters)
    batches = dataset.iter_batches()
    next(batches)  # the first shard load
    rates = []
    for _ in range(args.runs):
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(batches)
        rates.append(args.batches * args.batch * args.unroll / (time.perf_counter() - start))
    tokens_per_second = common.summarize(rates)
    result = {"benchmark": "data_pipeline", "batch": args.batch, "unroll_steps": args.unroll,
              "max_characters_per_token": args.max_characters, "batches_per_run": args.batches, "runs": args.runs,
              "keys": sorted(batch), "tokens_per_second": tokens_per_second, "cores": 1,
              "peak_rss_mib": common.peak_rss_mib(), "environment": common.environment()}
    common.report(result, [
        ("batches", f"{args.batch} x {args.unroll}, chars {args.max_characters}, bidirectional"),
        ("tokens/s (min/median/max)", "{min:.0f} / {median:.0f} / {max:.0f}".format(**tokens_per_second)),
    ])
    return result


if __name__ == "__main__":
    main()
