"""Inference speed: ELMo layers from characters for one batch of sentences.

  python benchmarks/inference.py --size original --batch 64 --runs 10
  python benchmarks/inference.py --size original --latency    # one sentence a call: median, worst

Random weights for the size are written once in bilm-tf's hdf5 format (benchmarks/.cache/SIZE/),
so other implementations can be timed on the same files. Sentences of 20-30 tokens are cut from
the bundled corpus sample. Tokens are real tokens (no <S>, </S>, no padding). FLOPs are nominal: every token through the
char CNN (elmojax runs the CNN once per distinct token, so the nominal fraction can exceed 1).
Prints a table on
stderr and one JSON object on stdout.
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
    parser.add_argument("--size", choices=sorted(common.SIZES), default="original")
    parser.add_argument("--batch", type=int, default=64, help="sentences per call")
    parser.add_argument("--min-length", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=30)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--device", choices=["cpu", "gpu", "default"], default="default",
                        help="JAX platform (default: JAX's choice)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype of the matrix products (bfloat16: for GPUs)")
    parser.add_argument("--peak-gflops", type=float, default=0.0,
                        help="the machine's fp32 matmul rate; measured when 0")
    parser.add_argument("--latency", action="store_true",
                        help="instead: 60 sentences of 1-50 tokens, one call each, after warm_up(max_length=50)")
    args = parser.parse_args(argv)
    import elmojax

    elmojax.setup()  # the process-wide settings the command lines apply
    if args.device != "default":
        os.environ["JAX_PLATFORMS"] = args.device

    from elmojax import Batcher, BidirectionalLanguageModel

    options_file, weight_file = common.model_files(args.size)
    if args.latency:
        return latency(args, options_file, weight_file)
    sentences = common.sample_sentences(args.batch, args.min_length, args.max_length)
    ids = Batcher(os.path.join(common.SAMPLE, "vocab.txt"), 50).batch_sentences(sentences)
    n_tokens = sum(len(s) for s in sentences)
    model = BidirectionalLanguageModel(options_file, weight_file, max_batch_size=max(args.batch, 1),
                                       compute_dtype=args.dtype)

    start = time.perf_counter()
    model(ids)
    compile_seconds = time.perf_counter() - start
    rates = []
    for _ in range(args.runs):
        start = time.perf_counter()
        model(ids)
        rates.append(n_tokens / (time.perf_counter() - start))

    flops = common.inference_flops(common.SIZES[args.size])
    peak = args.peak_gflops or common.measure_matmul_gflops()
    result = {
        "benchmark": "inference", "size": args.size, "batch": args.batch, "tokens_per_batch": n_tokens,
        "sentence_lengths": [args.min_length, args.max_length], "runs": args.runs, "compute_dtype": args.dtype,
        **common.speed_result(rates, compile_seconds, flops, peak), "environment": common.environment(),
    }
    common.report(result, [("size / batch", f"{args.size} / {args.batch} sentences, {n_tokens} tokens, {args.dtype}")]
                  + common.speed_rows(result, "compile + first call"))
    return result


def latency(args, options_file: str, weight_file: str) -> dict:
    """Each of LATENCY_SENTENCES's sentences in a call of its own, as a user embedding one
    sentence at a time does, after the model's warm_up (timed apart)."""
    from elmojax import Batcher, BidirectionalLanguageModel

    batcher = Batcher(os.path.join(common.SAMPLE, "vocab.txt"), 50)
    n, shortest, longest = common.LATENCY_SENTENCES
    sentences = common.sample_sentences(n, shortest, longest)
    model = BidirectionalLanguageModel(options_file, weight_file, compute_dtype=args.dtype)
    start = time.perf_counter()
    model.warm_up(max_length=longest)
    warm_up_seconds = time.perf_counter() - start
    seconds = []
    for sentence in sentences:
        ids = batcher.batch_sentences([sentence])
        start = time.perf_counter()
        model(ids)
        seconds.append(time.perf_counter() - start)
    result = {"benchmark": "latency", "size": args.size, "compute_dtype": args.dtype, **common.latency_result(seconds),
              "warm_up_seconds": warm_up_seconds, "environment": common.environment()}
    common.report(result, [("size", f"{args.size}, {args.dtype}")] + common.latency_rows(result)
                  + [("warm_up(max_length=50)", f"{warm_up_seconds:.1f} s")])
    return result


if __name__ == "__main__":
    main()
