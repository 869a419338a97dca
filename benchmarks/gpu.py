"""The billion_word recipe and ELMo's original size on one GPU, in one prepared run (issue #28):

  bash benchmarks/gpu.sh --out DIR            # on the GPU machine (gpu.sh installs what travels)
  bash benchmarks/gpu.sh --smoke --out DIR    # the same parts, small, on the CPU (under a minute)

Each part runs in a process of its own with a time limit of its own (a part that fails or runs
out of time is recorded as such, and the next one runs), so that the whole fits in 8 minutes
with compilation:

  environment      nvidia-smi's device line, jax.print_environment_info(), JAX's devices
  train_fp32       train.py --config billion_word (random weights, the recipe's batch of 128 per
                   device, 8192 negatives, a vocabulary of 793,471 as the real one's), 200 steps
                   after compiling: tokens/s, compile time, the device's peak memory, and the mean
                   loss of the last 10 steps
  train_highest    the same in fp32 with matmul precision "highest", 30 steps
  train_bf16       the same as train_fp32 with compute_dtype=bfloat16, from the same start on
                   the same batches: its loss after 200 steps against fp32's (bf16_loss_ratio)
  inference_64     inference.py --size original --batch 64: tokens/s
  inference_256    the same at batch 256

--smoke runs the same parts on the CPU at small sizes (small_char, the fixture's size, a few
steps), with JAX_PLATFORMS=cpu. Writes DIR/gpu.json (one object: every part's result, its
seconds and status) and DIR/gpu.log (every part's output); prints the JSON's last line on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ENVIRONMENT = r"""
import io, contextlib, json, jax
out = io.StringIO()
with contextlib.redirect_stdout(out):
    jax.print_environment_info()
devices = jax.devices()
print(json.dumps({"platform": devices[0].platform, "devices": [str(d) for d in devices],
                  "device_kind": devices[0].device_kind, "environment_info": out.getvalue()}))
"""


def parts(smoke: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed) of each part, in order."""
    python = sys.executable
    if smoke:
        train = [python, os.path.join(HERE, "train.py"), "--config", "small_char", "--batch", "2", "--unroll", "5",
                 "--negatives", "16", "--vocab-size", "3000", "--peak-gflops", "50"]
        infer = [python, os.path.join(HERE, "inference.py"), "--size", "fixture", "--runs", "2", "--peak-gflops", "50"]
        steps, few, limit, infer_limit = "10", "3", 60, 60
    else:
        # JAX's own platform (the environment part checks that it is the GPU); the peak each
        # benchmark reports is its own measured fp32 matmul rate at the default precision
        train = [python, os.path.join(HERE, "train.py"), "--config", "billion_word"]
        infer = [python, os.path.join(HERE, "inference.py"), "--size", "original", "--runs", "10"]
        steps, few, limit, infer_limit = "200", "30", 100, 70
    return [
        ("environment", [python, "-c", ENVIRONMENT], 60),
        ("train_fp32", train + ["--runs", steps], limit),
        ("train_highest", train + ["--runs", few, "--precision", "highest"], limit),
        ("train_bf16", train + ["--runs", steps, "--dtype", "bfloat16"], limit),
        ("inference_64", infer + ["--batch", "64"], infer_limit),
        ("inference_256", infer + ["--batch", "256"], infer_limit),
    ]


def run_part(name: str, command: list[str], seconds: int, env: dict, log) -> dict:
    """One part in a process of its own: its JSON result (the last stdout line), or why none."""
    log.write(f"\n=== {name}: {' '.join(command)} (limit {seconds} s)\n")
    log.flush()
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired as e:
        log.write(_text(e.stdout) + _text(e.stderr))
        return {"status": f"timed out after {seconds} s", "seconds": time.perf_counter() - start}
    log.write(done.stdout + done.stderr)
    out = {"seconds": time.perf_counter() - start}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {**out, "status": f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"}
    return {**out, "status": "ok", **json.loads(lines[-1])}


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def nvidia_smi() -> str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi: not found"
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return (done.stdout or done.stderr).strip()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the same parts, small, on the CPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, ".cache", "gpu"),
                        help="the folder gpu.json and gpu.log go to (default: $OUT, else benchmarks/.cache/gpu)")
    parser.add_argument("--only", default="", help="comma-separated parts to run (default: all)")
    args = parser.parse_args(argv)
    todo = parts(args.smoke)
    known = [name for name, _, _ in todo]
    only = [name for name in args.only.split(",") if name]
    unknown = [name for name in only if name not in known]
    if unknown:
        parser.error(f"--only: unknown part {unknown[0]!r}; the parts are {', '.join(known)}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    os.makedirs(args.out, exist_ok=True)
    result = {"benchmark": "gpu", "smoke": args.smoke, "nvidia_smi": nvidia_smi(), "date": time.strftime("%Y-%m-%d"),
              "parts": {}}
    with open(os.path.join(args.out, "gpu.log"), "w", encoding="utf-8") as log:
        for name, command, seconds in todo:
            if only and name not in only:
                continue
            result["parts"][name] = part = run_part(name, command, seconds, env, log)
            print(f"{name}: {part['status']} ({part['seconds']:.0f} s)", file=sys.stderr, flush=True)
            if name == "environment" and not args.smoke and part.get("platform") != "gpu":
                print("gpu.py: JAX sees no GPU here (see gpu.log); nothing else was run", file=sys.stderr)
                break
    result["summary"] = summary(result["parts"])
    path = os.path.join(args.out, "gpu.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(json.dumps(result["summary"]))
    return result


def summary(parts: dict) -> dict:
    """The figures the issue's targets are about, from the parts that ran."""
    out = {}
    for name, part in parts.items():
        if part.get("status") != "ok" or "tokens_per_second" not in part:
            continue
        out[name] = {"tokens_per_second": part["tokens_per_second"]["median"],
                     "compile_seconds": part.get("compile_seconds"), "device_peak_mib": part.get("device_peak_mib")}
    fp32, bf16 = parts.get("train_fp32", {}), parts.get("train_bf16", {})
    if "last_10_mean_loss" in fp32 and "last_10_mean_loss" in bf16:
        out["bf16_loss_ratio"] = bf16["last_10_mean_loss"] / fp32["last_10_mean_loss"]
    return out


if __name__ == "__main__":
    main()
