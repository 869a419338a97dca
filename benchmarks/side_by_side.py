"""Runs benchmark commands alternately and reports medians and pairwise ratios.

  python benchmarks/side_by_side.py --pairs 4 \
      --run "elmojax=.venv/bin/python benchmarks/inference.py --size small --runs 10" \
      --run "bilm-tf=/tmp/tf/bin/python benchmarks/bilm_tf.py inference --size small --runs 10"

Each round runs every command once, in fresh processes, the order reversed every other round
(A B, B A, A B, ...), so that a drift in the machine's speed falls on both alike. Each command
must print one JSON object on its last stdout line with tokens_per_second.median (all of
benchmarks/ do); peak_rss_mib is reported where given. The ratio column is each command's
median over the first one's, pair by pair, then the median of those. A table on stderr, one
JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time


def run_once(command: str) -> dict:
    done = subprocess.run(shlex.split(command), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"side_by_side: `{command}` failed ({done.returncode}):\n{done.stderr[-2000:]}")
    lines = [line for line in done.stdout.splitlines() if line.strip().startswith("{")]
    if not lines:
        sys.exit(f"side_by_side: `{command}` printed no JSON object")
    return json.loads(lines[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="NAME=COMMAND (at least two)")
    parser.add_argument("--pairs", type=int, default=4, help="rounds of all the commands")
    args = parser.parse_args(argv)
    named = [r.split("=", 1) for r in args.run]
    if len(named) < 2 or any(len(n) != 2 for n in named):
        parser.error("give at least two --run NAME=COMMAND")
    results = {name: [] for name, _ in named}
    started = time.strftime("%Y-%m-%d %H:%M")
    for round_ in range(args.pairs):
        order = named if round_ % 2 == 0 else named[::-1]
        for name, command in order:
            result = run_once(command)
            results[name].append({"tokens_per_second": result["tokens_per_second"]["median"],
                                  "peak_rss_mib": result.get("peak_rss_mib")})
            print(f"round {round_ + 1} {name}: {results[name][-1]['tokens_per_second']:,.0f} tok/s", file=sys.stderr)
    first = named[0][0]
    summary = {}
    for name, command in named:
        rates = [r["tokens_per_second"] for r in results[name]]
        ratios = [r / f for r, f in zip(rates, (x["tokens_per_second"] for x in results[first]))]
        rss = [r["peak_rss_mib"] for r in results[name] if r["peak_rss_mib"] is not None]
        summary[name] = {"command": command, "tokens_per_second": rates, "median": statistics.median(rates),
                         "ratio_to_first": ratios, "median_ratio": statistics.median(ratios),
                         "peak_rss_mib": rss, "median_peak_rss_mib": statistics.median(rss) if rss else None}
    for name, s in summary.items():
        rss = f", {s['median_peak_rss_mib']:.0f} MiB" if s["median_peak_rss_mib"] else ""
        print(f"{name:<20} median {s['median']:>10,.0f} tok/s, x{s['median_ratio']:.3f} of {first} "
              f"(pairs: {', '.join(f'{r:.2f}' for r in s['ratio_to_first'])}){rss}", file=sys.stderr)
    out = {"benchmark": "side_by_side", "started": started, "pairs": args.pairs, "results": summary}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
