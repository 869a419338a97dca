"""What the tests share: the fixtures' paths, a few test files, and the ways a test runs a
command: in a process of its own as a user would (slow), or in this process (fast)."""

import contextlib
import io
import json
import logging
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Many tests, in this process and the ones they start, compile the same small programs: JAX keeps
# them in a cache on disk (before jax is imported), which takes a sixth off the fast set cold.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

CONFIGS = os.path.join(ROOT, "configs")
TESTS = os.path.join(ROOT, "tests")
FIXTURES = os.path.join(TESTS, "fixtures")
MODEL = os.path.join(FIXTURES, "model")
OPTIONS_FILE = os.path.join(MODEL, "options.json")
WEIGHT_FILE = os.path.join(MODEL, "lm_weights.hdf5")
VOCAB_FILE = os.path.join(MODEL, "vocab_test.txt")
TRAIN_VOCAB_FILE = os.path.join(FIXTURES, "train", "vocab.txt")


def padded_vocab_file(directory, size: int) -> str:
    """The toy corpus's vocabulary with unused tokens appended up to `size` entries: softmax
    tables large enough for the train step's row update (elmojax.model.softmax.ROW_UPDATE_MIN_RATIO)."""
    with open(TRAIN_VOCAB_FILE, encoding="utf-8") as f:
        tokens = f.read().split()
    path = os.path.join(directory, "padded_vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens + [f"<unused{i}>" for i in range(size - len(tokens))]) + "\n")
    return path


@pytest.fixture(scope="session")
def fixture_sentences():
    """sentences[k][i] (k in 0..2, i in 0..9) as token lists, and the reference's top layers."""
    with open(os.path.join(MODEL, "lm_embeddings_sentences.json"), encoding="utf-8") as f:
        sentences = [[s.split() for s in row] for row in json.load(f)]
    expected = []
    for k in range(len(sentences)):
        with h5py.File(os.path.join(MODEL, f"lm_embeddings_{k}.hdf5"), "r") as f:
            # each dataset is (2, n_tokens, dim): forward and backward top layer
            expected.append([np.concatenate([f[str(i)][0], f[str(i)][1]], axis=-1) for i in range(10)])
    return sentences, expected


def short_lines(path, n: int) -> str:
    """A text file of n short lines (1 to 12 tokens) cut from the bundled corpus sample's heldout text."""
    sample = os.path.join(ROOT, "elmojax", "resources", "kjv_sample", "heldout", "shard-00000.txt")
    with open(sample, encoding="utf-8") as f:
        lines = [line.split() for line in f if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(" ".join(lines[i % len(lines)][: 1 + i % 12]) + "\n")
    return str(path)


# The config files import as modules (import tiny), here and in the processes tests start.
sys.path.insert(0, CONFIGS)


def python_env(devices: int = 0, **extra: str) -> dict:
    """The environment of a Python process a test starts: this one's, on CPU (with `devices`
    host devices if given), configs/ and tests/ importable (import tiny, from conftest import ...)."""
    path = os.pathsep.join([CONFIGS, TESTS] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path, **extra)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_python(code: str, *args: str, devices: int = 0, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """python -c CODE ARGS in the repository's root (python_env), its output captured as text."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=python_env(devices, **env),
                          capture_output=True, text=True, timeout=timeout)


def start_python(*args: str, **env: str) -> subprocess.Popen:
    """python ARGS started in the repository's root (python_env), stdout and stderr piped as text."""
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=python_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def dead_pid() -> int:
    """The process id of a process that has ended (for locks left by a dead process)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def in_process(command: str, *args: str) -> subprocess.CompletedProcess:
    """python -m elmojax.COMMAND ARGS (main, dump or prepare) run in this process from the
    repository's root, as a CompletedProcess: its exit status and what it printed. Fast, for
    what a command says; the tests that start it as a process show that the real one says it
    the same way (no traceback, the exit status)."""
    import elmojax.dump
    import elmojax.main
    import elmojax.prepare

    run = {"main": lambda: elmojax.main.run(["python -m elmojax.main", *args]),
           "dump": lambda: elmojax.dump.main(list(args)), "prepare": lambda: elmojax.prepare.main(list(args))}[command]
    root = logging.getLogger()
    handlers, level, cwd = root.handlers[:], root.level, os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(ROOT)
        root.handlers[:] = []  # as in a process of its own: logging's last resort prints warnings on stderr
        root.setLevel(logging.WARNING)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = run() or 0
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):  # what the interpreter prints of sys.exit("message")
                    print(e.code, file=sys.stderr)
    finally:
        os.chdir(cwd)
        root.handlers[:] = handlers  # pytest's, and not those main sets up for the command
        root.setLevel(level)
    return subprocess.CompletedProcess(["python", "-m", f"elmojax.{command}", *args], status, out.getvalue(),
                                       err.getvalue())
