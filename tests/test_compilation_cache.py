"""The command lines keep compiled programs on disk for every later process (JAX's persistent
compilation cache, elmojax.process.runtime.setup): a second run of the same model compiles
nothing new; ELMOJAX_COMPILATION_CACHE=off keeps nothing."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, python_env
from elmojax.process import runtime


def test_the_cache_directory_follows_the_environment(monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv(runtime.COMPILATION_CACHE_VARIABLE, raising=False)
    assert runtime.compilation_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "elmojax", "jax")
    monkeypatch.setenv(runtime.COMPILATION_CACHE_VARIABLE, "/somewhere")
    assert runtime.compilation_cache_dir() == "/somewhere"
    monkeypatch.setenv(runtime.COMPILATION_CACHE_VARIABLE, "off")
    assert runtime.compilation_cache_dir() is None
    monkeypatch.delenv(runtime.COMPILATION_CACHE_VARIABLE)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/jax/own")  # JAX's own setting is JAX's to apply
    assert runtime.compilation_cache_dir() is None


@pytest.mark.slow  # two training processes
def test_a_second_run_of_the_same_model_reuses_the_first_runs_programs(tmp_path):
    cache = tmp_path / "cache"

    def train(workdir, cache_setting):
        env = python_env(**{runtime.COMPILATION_CACHE_VARIABLE: cache_setting})
        for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):  # (the tests' own)
            env.pop(name, None)
        done = subprocess.run([sys.executable, "-m", "elmojax.main", "--config=configs/tiny.py",
                               f"--workdir={tmp_path / workdir}", "--config.train.max_steps=2"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    train("first", str(cache))
    kept = sorted(os.listdir(cache))
    assert kept  # the train step at least (a compile of over a second)
    train("second", str(cache))
    assert sorted(os.listdir(cache)) == kept  # found there: nothing compiled anew
    train("third", "off")
    assert sorted(os.listdir(cache)) == kept
