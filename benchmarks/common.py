"""Shared pieces of the benchmarks: model sizes, random weights in bilm-tf's format, FLOP
counts, machine facts and the JSON/table report."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "elmojax", "resources", "kjv_sample")
CACHE = os.path.join(ROOT, "benchmarks", ".cache")

# Compile times are measured, and each process compiles afresh: no programs kept from earlier runs.
os.environ.setdefault("ELMOJAX_COMPILATION_CACHE", "off")

ELMO_FILTERS = [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]

# options.json of the model sizes; "fixture" is the tiny model of bilm-tf's tests.
SIZES = {
    "original": {"lstm": {"dim": 4096, "projection_dim": 512, "n_layers": 2, "cell_clip": 3, "proj_clip": 3,
                          "use_skip_connections": True},
                 "char_cnn": {"filters": ELMO_FILTERS, "embedding": {"dim": 16}, "n_highway": 2, "activation": "relu",
                              "n_characters": 262, "max_characters_per_token": 50}},
    "small": {"lstm": {"dim": 1024, "projection_dim": 128, "n_layers": 2, "cell_clip": 3, "proj_clip": 3,
                       "use_skip_connections": True},
              "char_cnn": {"filters": ELMO_FILTERS, "embedding": {"dim": 16}, "n_highway": 1, "activation": "relu",
                           "n_characters": 262, "max_characters_per_token": 50}},
    "fixture": {"lstm": {"dim": 64, "projection_dim": 16, "n_layers": 2, "cell_clip": 3, "proj_clip": 3,
                         "use_skip_connections": False},
                "char_cnn": {"filters": [[1, 4], [2, 8], [3, 16], [4, 32], [5, 64]], "embedding": {"dim": 4},
                             "n_highway": 2, "activation": "relu", "n_characters": 262,
                             "max_characters_per_token": 50}},
}


def model_files(size: str) -> tuple[str, str]:
    """options.json and random weights (bilm-tf's hdf5 schema, so other implementations can load
    the same files), written once into benchmarks/.cache/SIZE/."""
    import jax

    from elmojax.formats import hdf5
    from elmojax.formats.files import write_json
    from elmojax.formats.options import BiLMOptions
    from elmojax.model.bilm import BiLM, zero_state

    directory = os.path.join(CACHE, size)
    options_file = os.path.join(directory, "options.json")
    weight_file = os.path.join(directory, "lm_weights.hdf5")
    if not (os.path.exists(options_file) and os.path.exists(weight_file)):
        os.makedirs(directory, exist_ok=True)
        options = BiLMOptions.from_dict(SIZES[size])
        ids = np.ones((1, 1, options.char_cnn.max_characters_per_token), np.int32)
        params = jax.jit(BiLM(options).init)(jax.random.PRNGKey(0), ids, zero_state(options, 1))["params"]
        hdf5.save_weights(jax.device_get(params), options, weight_file)
        write_json(options_file, SIZES[size])
    return options_file, weight_file


def sample_sentences(n: int, min_len: int, max_len: int, seed: int = 0) -> list[list[str]]:
    """n sentences of min_len..max_len tokens cut from the bundled corpus sample."""
    with open(os.path.join(SAMPLE, "train", "shard-00000.txt"), encoding="utf-8") as f:
        words = f.read().split()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        start = int(rng.integers(0, len(words) - length))
        out.append(words[start : start + length])
    return out


LATENCY_SENTENCES = (60, 1, 50)  # one call each: how many, and their shortest and longest


def latency_result(seconds: list[float]) -> dict:
    """Per-call latency over LATENCY_SENTENCES's calls: median and worst in ms, and how many
    calls took more than 5 times the median (stalls: a compile, say)."""
    median = float(np.median(seconds))
    return {"calls": len(seconds), "sentence_lengths": list(LATENCY_SENTENCES[1:]),
            "median_ms": 1000 * median, "worst_ms": 1000 * max(seconds),
            "calls_over_5x_median": sum(s > 5 * median for s in seconds)}


def latency_rows(result: dict) -> list[tuple[str, str]]:
    return [("calls", f"{result['calls']} single sentences of {result['sentence_lengths'][0]}-"
                      f"{result['sentence_lengths'][1]} tokens"),
            ("latency median / worst", f"{result['median_ms']:.2f} / {result['worst_ms']:.2f} ms"),
            ("calls over 5x the median", str(result["calls_over_5x_median"]))]


def dump_dataset(n: int, min_len: int, max_len: int, seed: int = 0) -> str:
    """A text file of sample_sentences(n, min_len, max_len, seed), one a line, written once into
    benchmarks/.cache/dump/ (so other implementations dump the same file)."""
    path = os.path.join(CACHE, "dump", f"lines-{n}-{min_len}-{max_len}-seed{seed}.txt")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = "".join(" ".join(s) + "\n" for s in sample_sentences(n, min_len, max_len, seed))
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return path


def dataset_counts(path: str) -> tuple[int, int]:
    """(lines, tokens) of a dataset file."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return len(lines), sum(len(line.split()) for line in lines)


def char_cnn_flops(c: dict, projection_dim: int) -> int:
    """Multiply-adds x 2 per token for the char CNN, highway layers and projection."""
    chars, dim = c["max_characters_per_token"], c["embedding"]["dim"]
    n_filters = sum(n for _, n in c["filters"])
    flops = sum(2 * (chars - w + 1) * w * dim * n for w, n in c["filters"])
    flops += c.get("n_highway", 0) * 2 * (2 * n_filters * n_filters)
    if n_filters != projection_dim:
        flops += 2 * n_filters * projection_dim
    return flops


def lstm_flops(lstm: dict, directions: int = 2) -> int:
    """Per token: every layer's input and recurrent products and the projection, all directions."""
    dim, proj, layers = lstm["dim"], lstm["projection_dim"], lstm.get("n_layers", 1)
    out = proj if proj < dim else dim
    total = 0
    for layer in range(layers):
        in_dim = proj if layer == 0 else out
        total += 2 * in_dim * 4 * dim + 2 * out * 4 * dim + (2 * dim * proj if proj < dim else 0)
    return directions * total


def inference_flops(options: dict) -> int:
    return char_cnn_flops(options["char_cnn"], options["lstm"]["projection_dim"]) + lstm_flops(options["lstm"])


def measure_matmul_gflops(n: int = 2048, runs: int = 5) -> float:
    """The machine's fp32 matrix-product rate with this JAX (the practical limit)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times) / 1e9


def machine() -> dict:
    """The machine and the date, for any implementation's results (no JAX needed)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"python": sys.version.split()[0], "numpy": np.__version__, "cpu": cpu, "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}


def environment() -> dict:
    import jax

    return {**machine(), "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def summarize(rates: list[float]) -> dict:
    return {"min": min(rates), "median": statistics.median(rates), "max": max(rates)}


def device_peak_mib() -> Optional[float]:
    """The first device's peak memory in use (its allocator's count: GPUs), None where JAX has
    no such count (CPUs: see peak_rss_mib)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def speed_result(rates: list[float], compile_seconds: float, flops: int, peak_gflops: float) -> dict:
    """The fields every model benchmark reports."""
    tokens_per_second = summarize(rates)
    return {"tokens_per_second": tokens_per_second, "compile_seconds": compile_seconds,
            "peak_rss_mib": peak_rss_mib(), "device_peak_mib": device_peak_mib(), "flops_per_token": flops,
            "machine_peak_gflops": peak_gflops,
            "fraction_of_peak_nominal": tokens_per_second["median"] * flops / (peak_gflops * 1e9)}


def speed_rows(result: dict, first_call: str) -> list[tuple[str, str]]:
    return [
        ("tokens/s (min/median/max)", "{min:.0f} / {median:.0f} / {max:.0f}".format(**result["tokens_per_second"])),
        (first_call, f"{result['compile_seconds']:.2f} s"),
        ("MFLOP per token", f"{result['flops_per_token'] / 1e6:.2f}"),
        ("nominal FLOPs / fp32 matmul peak",
         f"{result['fraction_of_peak_nominal']:.1%} of {result['machine_peak_gflops']:.1f} GFLOP/s"),
        ("peak RSS", f"{result['peak_rss_mib']:.0f} MiB"),
    ]


def report(result: dict, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=sys.stderr)
    print(json.dumps(result))
