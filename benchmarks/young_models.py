"""What the heldout health check says of young models: elmojax trained with bilm-tf's recipe
from one options.json, evaluated along the way, from the zero LSTM state and from the training
carry, each evaluation diagnosed (elmojax.train.evaluation.diagnose) as `--mode=evaluate` on the
run's workdir and the end of training do.

  python benchmarks/young_models.py --options benchmarks/small_char_options.json \\
      --corpus /tmp/parity/kjv5k --seeds 0-4 --steps 25,50,100,200,400 --out young.jsonl \\
      [--elmojax train.state_reset_probability=0.05]

A run trains to each step in turn (a resumed run equals a straight one), so one seed's steps
cost one run. Appends a JSON line per (seed, step) to --out: the perplexities both ways, the
training data's unigram baseline and the verdict with the carry and without it (as for an
export, which has none); prints how many evaluations got each verdict.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # noqa: E402
import training_seeds  # noqa: E402  (beside this file)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--options", required=True, help="a bilm-tf training options.json")
    parser.add_argument("--corpus", required=True, help="a directory written by python -m elmojax.prepare")
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--steps", default="25,50,100,200,400", help="where to evaluate, in steps")
    parser.add_argument("--elmojax", action="append", default=[], metavar="SECTION.FIELD=JSON")
    parser.add_argument("--out", required=True, help="JSON lines (appended)")
    args = parser.parse_args(argv)
    import elmojax

    elmojax.setup()
    import jax

    from elmojax.train import config as config_lib
    from elmojax.formats import files
    from elmojax.train import evaluation, loop, trained_models

    options = files.read_json(args.options)
    with open(os.path.join(args.corpus, "vocab.txt"), encoding="utf-8") as f:
        options["n_tokens_vocab"] = sum(1 for line in f if line.strip())
    overrides = tuple((field, json.loads(value)) for field, _, value in (item.partition("=") for item in args.elmojax))
    steps = [int(s) for s in args.steps.split(",")]
    counts: dict = collections.Counter()
    for seed in training_seeds.seeds(args.seeds):
        config = training_seeds.corpus_config(options, args.corpus, seed, args.options, overrides)
        config.train.n_epochs = 10**6  # the steps say how long
        workdir = tempfile.mkdtemp(prefix="elmojax_young_")
        for step in steps:
            config.train.max_steps = step
            state = loop.train(config, workdir)
            params = jax.tree.map(np.asarray, jax.device_get(state.params))
            vocab = trained_models.load_vocab(config)
            result = training_seeds.evaluate(config, args.corpus, params, config_lib.options_json(config, vocab.size),
                                             jax.device_get(state.lstm_state))
            alone = evaluation.diagnose(evaluation.HeldoutResult.from_json(result))
            record = {"options": os.path.basename(args.options), "corpus": os.path.basename(args.corpus.rstrip("/")),
                      "set": sorted(args.elmojax), "seed": seed, "step": step,
                      **{k: result[k] for k in ("perplexity", "forward_perplexity", "backward_perplexity",
                                                "carry_forward_perplexity", "carry_backward_perplexity",
                                                "unigram_perplexity", "vocab_size", "trap_ratio", "health")},
                      "health_without_carry": alone.verdict}
            counts[(record["health"], record["health_without_carry"])] += 1
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
            ratios = ", ".join(f"{d} {r:.3f}" for d, r in record["trap_ratio"].items())
            print(f"seed {seed} step {step}: forward {record['forward_perplexity']:.1f} (carry "
                  f"{record['carry_forward_perplexity']:.1f}), backward {record['backward_perplexity']:.1f} (carry "
                  f"{record['carry_backward_perplexity']:.1f}), unigram {record['unigram_perplexity']:.1f}, "
                  f"zero / carry after the cold start: {ratios}: {record['health']} / without the carry "
                  f"{alone.verdict}", file=sys.stderr)
    summary = {f"{with_carry} / {without}": n for (with_carry, without), n in sorted(counts.items())}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
