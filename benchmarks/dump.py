"""Whole-dataset dump speed: elmojax's dump_bilm_embeddings over a file of sentences.

  python benchmarks/dump.py --size original --lines 5000

The dataset, --lines sentences of --min-length to --max-length tokens cut from the bundled
corpus sample (seeded, so every run and every implementation dumps the same file), is written
once into benchmarks/.cache/dump/; the random weights of the size into benchmarks/.cache/SIZE/
(as inference.py writes them). Each run is the whole dump as a user runs it: loading the model,
compiling, embedding every line (in chunks of --chunk-lines, --batch at a time, over all of the
process's devices) and writing the file (into a temporary directory, removed afterwards).
--stateful runs bilm-tf's way, one line at a time with the state carried along, which is what
`bilm_tf.py dump` times of bilm-tf's own dump_bilm_embeddings. Tokens are real tokens.
Prints a table on stderr and one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(common.SIZES), default="original")
    parser.add_argument("--lines", type=int, default=5000, help="sentences in the dataset")
    parser.add_argument("--min-length", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="which sentences")
    parser.add_argument("--batch", type=int, default=64, help="sentences per call")
    parser.add_argument("--chunk-lines", type=int, default=1000, help="lines a chunk of the dump's work directory")
    parser.add_argument("--stateful", action="store_true", help="one line at a time, state carried (bilm-tf's way)")
    parser.add_argument("--runs", type=int, default=1, help="whole dumps")
    parser.add_argument("--device", choices=["cpu", "gpu", "default"], default="default",
                        help="JAX platform (default: JAX's choice)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.lines < 1:
        parser.error("--runs and --lines must be positive")
    import elmojax

    elmojax.setup()  # the process-wide settings the command lines apply
    if args.device != "default":
        os.environ["JAX_PLATFORMS"] = args.device
    import jax

    from elmojax import dump_bilm_embeddings

    options_file, weight_file = common.model_files(args.size)
    dataset = common.dump_dataset(args.lines, args.min_length, args.max_length, args.seed)
    n_lines, n_tokens = common.dataset_counts(dataset)
    vocab_file = os.path.join(common.SAMPLE, "vocab.txt")
    seconds = []
    directory = tempfile.mkdtemp(prefix="elmojax-dump-benchmark-")
    try:
        for run in range(args.runs):
            out = os.path.join(directory, f"run{run}.hdf5")
            start = time.perf_counter()
            dump_bilm_embeddings(vocab_file, dataset, options_file, weight_file, out, batch_size=args.batch,
                                 stateful=args.stateful, progress=False, chunk_lines=args.chunk_lines)
            seconds.append(time.perf_counter() - start)
            output_mib = os.path.getsize(out) / 2**20
            os.remove(out)
    finally:
        shutil.rmtree(directory)
    result = {
        "benchmark": "dump", "implementation": "elmojax", "size": args.size, "lines": n_lines, "tokens": n_tokens,
        "sentence_lengths": [args.min_length, args.max_length], "seed": args.seed, "batch": args.batch,
        "chunk_lines": args.chunk_lines, "stateful": args.stateful, "runs": args.runs,
        "seconds": common.summarize(seconds),
        "sentences_per_second": common.summarize([n_lines / s for s in seconds]),
        "tokens_per_second": common.summarize([n_tokens / s for s in seconds]),
        "peak_rss_mib": common.peak_rss_mib(), "output_mib": output_mib, "devices": jax.local_device_count(),
        "environment": common.environment(),
    }
    common.report(result, dump_rows(result, f"{args.batch} a call" if not args.stateful else "one a call, stateful"))
    return result


def dump_rows(result: dict, how: str) -> list[tuple[str, str]]:
    """The table of a dump benchmark's result (elmojax's or bilm-tf's)."""
    return [
        ("size / dataset", f"{result['size']} / {result['lines']} sentences of {result['sentence_lengths'][0]}-"
                           f"{result['sentence_lengths'][1]} tokens, {result['tokens']} tokens, {how}"),
        ("sentences/s (min/median/max)", "{min:.1f} / {median:.1f} / {max:.1f}".format(**result["sentences_per_second"])),
        ("tokens/s (min/median/max)", "{min:.0f} / {median:.0f} / {max:.0f}".format(**result["tokens_per_second"])),
        ("seconds a dump (median)", f"{result['seconds']['median']:.2f} s, loading and compiling included"),
        ("output file", f"{result['output_mib']:.1f} MiB"),
        ("peak RSS", f"{result['peak_rss_mib']:.0f} MiB"),
    ]


if __name__ == "__main__":
    main()
