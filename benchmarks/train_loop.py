"""Training speed through the whole loop (data, step, checks, logging, the final checkpoint),
this checkout side by side with another (an earlier commit, say), in one run.

  python benchmarks/train_loop.py --baseline /path/to/other/checkout --pairs 3
  python benchmarks/train_loop.py --bilm-tf /tmp/tf/bin/python --bare --pairs 4 --short 40 --long 440

Each measurement trains the small char model (benchmarks/train.py's small_char: LSTM 256/64 x 2,
batch 32 x 20, 256 negatives, the bundled sample with its vocabulary padded to 5,000) twice in
fresh workdirs, for --short and --long steps, in a fresh process each, and reports
(long - short) steps' tokens over the difference in wall time: startup, compilation and the final
checkpoint cancel out. No heldout evaluation, one checkpoint at the end. The two checkouts
alternate, baseline first in odd pairs. --bilm-tf adds bilm-tf's whole process (bilm_tf.py
train, as many batches) to each round, measured the same way; --bare, train.py's bare step. Prints a table on stderr and one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from train import CONFIGS, padded_vocab  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in the checkout under test: its own train() (elmojax.train.loop's, elmojax.loop's or train.py's before them).
WORKER = r"""
import json, os, sys, time
config = json.loads(sys.argv[1])
import elmojax
if hasattr(elmojax, "setup"):
    elmojax.setup()
from elmojax.config import base_config
package = os.path.dirname(elmojax.__file__)  # (an editable install would find a loop.py elsewhere)
if os.path.exists(os.path.join(package, "train", "loop.py")):
    from elmojax.train.loop import train
elif os.path.exists(os.path.join(package, "loop.py")):
    from elmojax.loop import train
else:
    from elmojax.train import train
c = base_config()
c.model.char_cnn.update(config["char_cnn"])
c.model.lstm.update(config["lstm"])
c.train.update(batch_size=config["batch"], unroll_steps=20, n_negative_samples_batch=config["negatives"],
               max_steps=config["steps"], n_epochs=1000, log_every=50, checkpoint_every=10**9)
if "eval_every" in c.train:
    c.train.eval_every = 0
c.data.update(train_prefix=config["train_prefix"], heldout_prefix="", vocab_file=config["vocab_file"])
start = time.perf_counter()
train(c, config["workdir"])
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def bare_step(steps: int, overall: bool = False) -> float:
    """train.py's bare step (its median over `steps` steps, or with `overall` all their tokens
    over all their time) in a process of its own, as tokens/s."""
    command = [sys.executable, os.path.join(HERE, "benchmarks", "train.py"), "--config", "small_char", "--runs",
               str(steps), "--peak-gflops", "1"]
    out = subprocess.run(command, cwd=HERE, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"train.py: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["tokens_per_second_overall"] if overall else result["tokens_per_second"]["median"]


def run(checkout: str, config: dict, steps: int) -> float:
    if checkout.startswith("bilm-tf:"):  # bilm-tf's python: its training graph, fed by its own dataset
        command = [checkout[len("bilm-tf:"):], os.path.join(HERE, "benchmarks", "bilm_tf.py"), "train",
                   "--config", "small_char", "--runs", str(steps)]
        start = time.perf_counter()
        out = subprocess.run(command, cwd=HERE, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"bilm-tf: {out.stderr[-2000:]}")
        return time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="elmojax_loop_") as workdir:
        payload = json.dumps({**config, "steps": steps, "workdir": workdir})
        env = dict(os.environ, PYTHONPATH=checkout, JAX_PLATFORMS="cpu")
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", WORKER, payload], cwd=checkout, env=env, capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{checkout}: {out.stderr[-2000:]}")
        return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="another checkout of elmojax to compare with (default: none)")
    parser.add_argument("--bilm-tf", default="", metavar="PYTHON",
                        help="also bilm-tf, in the environment of this python (bilm_tf.py's docstring): bilm_tf.py "
                             "train's whole process, the same configs and sample")
    parser.add_argument("--bare", action="store_true",
                        help="also this checkout's bare step (train.py, the median of --long - --short steps), "
                             "in the same rounds: the whole loop's fraction of it")
    parser.add_argument("--pairs", type=int, default=3, help="measurements of each checkout")
    parser.add_argument("--short", type=int, default=20, help="steps of the short run")
    parser.add_argument("--long", type=int, default=220, help="steps of the long run")
    args = parser.parse_args(argv)
    c = CONFIGS["small_char"]
    config = {"char_cnn": c["char_cnn"], "lstm": c["lstm"], "batch": c["batch"], "negatives": c["negatives"],
              "vocab_file": padded_vocab(c["vocab_size"]),
              "train_prefix": os.path.join(common.SAMPLE, "train", "shard-*.txt")}
    checkouts = {"this": HERE}
    if args.baseline:
        checkouts["baseline"] = os.path.abspath(args.baseline)
    if args.bilm_tf:
        checkouts["bilm-tf"] = "bilm-tf:" + args.bilm_tf
    if args.bare:
        checkouts["bare step"] = HERE
    tokens = (args.long - args.short) * c["batch"] * 20
    rates: dict[str, list[float]] = {name: [] for name in checkouts}
    for pair in range(args.pairs):
        names = list(checkouts) if pair % 2 else list(reversed(checkouts))
        for name in names:
            if name == "bare step":
                rates[name].append(bare_step(args.long - args.short))
                continue
            seconds = run(checkouts[name], config, args.long) - run(checkouts[name], config, args.short)
            rates[name].append(tokens / seconds)
    result = {"benchmark": "train_loop", "config": "small_char", "batch": c["batch"], "unroll_steps": 20,
              "steps": [args.short, args.long], "tokens_per_second": {k: common.summarize(v) for k, v in rates.items()},
              "runs": rates, "checkouts": checkouts, "environment": common.environment()}
    rows = [(name, f"{statistics.median(r):,.0f} tok/s median ({', '.join(f'{x:,.0f}' for x in r)})")
            for name, r in rates.items()]
    for other in [name for name in rates if name != "this"]:  # pair by pair, then the median
        ratios = [a / b for a, b in zip(rates["this"], rates[other])]
        result[f"ratio_to_{other}"] = {"pairs": ratios, "median": statistics.median(ratios)}
        rows.append((f"this / {other}", f"{statistics.median(ratios):.3f} median ({', '.join(f'{x:.2f}' for x in ratios)})"))
    common.report(result, rows)
    return result


if __name__ == "__main__":
    main()
