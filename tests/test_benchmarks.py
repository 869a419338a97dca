"""Smoke runs of the benchmarks so they never rot (tiny sizes; timings not asserted)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def _run(script, *args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_inference_benchmark():
    out = _run("inference.py", "--size", "fixture", "--batch", "4", "--runs", "2", "--peak-gflops", "50")
    assert out["tokens_per_second"]["min"] > 0 and out["flops_per_token"] == pytest.approx(392896)
    assert out["compile_seconds"] > 0 and out["peak_rss_mib"] > 0 and out["fraction_of_peak_nominal"] > 0


def test_latency_benchmark():
    out = _run("inference.py", "--size", "fixture", "--latency")
    assert out["calls"] == 60 and 0 < out["median_ms"] <= out["worst_ms"] and out["warm_up_seconds"] > 0


def test_train_benchmark():
    out = _run("train.py", "--config", "small_char", "--batch", "2", "--unroll", "5", "--runs", "2",
               "--negatives", "16", "--vocab-size", "3000", "--peak-gflops", "50", "--dtype", "bfloat16")
    assert out["tokens_per_second"]["median"] > 0 and out["vocab_size"] == 3000
    assert out["compute_dtype"] == "bfloat16"
    assert out["final_loss"] > 0


def test_loop_cores_benchmark():
    out = _run("loop_cores.py", "--iterations", "2", "--calls", "2", "--batch", "4", "--dim", "16", "--projection", "8")
    assert set(out["loops"]) == {"hidden product", "two chains", "products 128", "products 256"}
    assert all(v["us_per_iteration"] > 0 and v["cores_busy"] > 0 for v in out["loops"].values())


@pytest.mark.skipif(shutil.which("g++") is None, reason="the prototype kernel needs a C++ compiler")
def test_lstm_ffi_prototype_matches_the_scan():
    out = _run("lstm_ffi.py", "--shape", "3", "4", "16", "64", "--calls", "2", "--rounds", "1")
    assert out["max_abs_difference"] < 1e-5 and out["ms"]["kernel"] > 0 and out["ms"]["lax.scan"] > 0


def test_data_pipeline_benchmark():
    out = _run("data_pipeline.py", "--batch", "8", "--unroll", "5", "--batches", "3", "--runs", "1")
    assert out["tokens_per_second"]["median"] > 0
    assert "char_ids_reverse" in out["keys"] and "next_token_id_reverse" in out["keys"]


def test_dump_benchmark():
    out = _run("dump.py", "--size", "fixture", "--lines", "40", "--max-length", "12", "--batch", "8",
               "--chunk-lines", "16")
    with open(os.path.join(ROOT, "benchmarks", ".cache", "dump", "lines-40-1-12-seed0.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert out["lines"] == len(lines) == 40 and out["tokens"] == sum(len(line.split()) for line in lines)
    assert all(1 <= len(line.split()) <= 12 for line in lines)
    assert out["sentences_per_second"]["min"] > 0 and out["tokens_per_second"]["median"] > 0
    assert out["output_mib"] > 0 and out["peak_rss_mib"] > 0 and out["devices"] >= 1


def test_gpu_script_smoke(tmp_path):
    """benchmarks/gpu.sh --smoke: every part of the GPU run, small, on the CPU, into one JSON."""
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "gpu.json") as f:
        out = json.load(f)
    assert {name: part["status"] for name, part in out["parts"].items()} == dict.fromkeys(
        ["environment", "train_fp32", "train_highest", "train_bf16", "inference_64", "inference_256"], "ok")
    assert out["parts"]["environment"]["platform"] == "cpu" and (tmp_path / "gpu.log").stat().st_size > 0
    assert out["summary"]["train_fp32"]["tokens_per_second"] > 0
    assert abs(out["summary"]["bf16_loss_ratio"] - 1) < 0.05  # the same start, 10 steps


def test_gpu_script_stops_where_jax_sees_no_gpu(tmp_path):
    """Without --smoke on a machine without a GPU it says so and runs nothing more."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--out", str(tmp_path),
                             "--only", "environment,train_fp32"], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0 and "JAX sees no GPU here" in result.stderr, result.stderr[-3000:]
    with open(tmp_path / "gpu.json") as f:
        assert list(json.load(f)["parts"]) == ["environment"]
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--only", "trian"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown part 'trian'" in bad.stderr
