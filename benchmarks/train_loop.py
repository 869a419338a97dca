"""Training speed through the whole loop (data, step, checks, logging, the final checkpoint),
this checkout side by side with another (an earlier commit, say), in one run.

  python benchmarks/train_loop.py --baseline /path/to/other/checkout --pairs 3

Each measurement trains the small char model (benchmarks/train.py's small_char: LSTM 256/64 x 2,
batch 32 x 20, 256 negatives, the bundled sample with its vocabulary padded to 5,000) twice in
fresh workdirs, for --short and --long steps, in a fresh process each, and reports
(long - short) steps' tokens over the difference in wall time: startup, compilation and the final
checkpoint cancel out. No heldout evaluation, one checkpoint at the end. The two checkouts
alternate, baseline first in odd pairs. Prints a table on stderr and one JSON object on stdout.
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


def run(checkout: str, config: dict, steps: int) -> float:
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
    tokens = (args.long - args.short) * c["batch"] * 20
    rates: dict[str, list[float]] = {name: [] for name in checkouts}
    for pair in range(args.pairs):
        names = list(checkouts) if pair % 2 else list(reversed(checkouts))
        for name in names:
            seconds = run(checkouts[name], config, args.long) - run(checkouts[name], config, args.short)
            rates[name].append(tokens / seconds)
    result = {"benchmark": "train_loop", "config": "small_char", "batch": c["batch"], "unroll_steps": 20,
              "steps": [args.short, args.long], "tokens_per_second": {k: common.summarize(v) for k, v in rates.items()},
              "runs": rates, "checkouts": checkouts, "environment": common.environment()}
    if "baseline" in rates:
        result["median_ratio"] = statistics.median(rates["this"]) / statistics.median(rates["baseline"])
    rows = [(name, f"{statistics.median(r):,.0f} tok/s median ({', '.join(f'{x:,.0f}' for x in r)})")
            for name, r in rates.items()]
    if "median_ratio" in result:
        rows.append(("this / baseline", f"{result['median_ratio']:.3f}"))
    common.report(result, rows)
    return result


if __name__ == "__main__":
    main()
