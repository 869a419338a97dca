"""Two processes on localhost (CPU, gloo collectives) train like one process with the same
global batch; the command line runs as two processes, stops together and resumes; and a dump
as two processes writes one process's file."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, python_env

pytestmark = pytest.mark.slow

WORKER = r"""
import sys
import jax, numpy as np
pid, n_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if n_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=n_processes, process_id=pid)
import tempfile
import tiny
from conftest import padded_vocab_file
from elmojax import data
from elmojax.train import config as config_lib, trained_models, trainer as trainer_lib
GLOBAL_BATCH = 4
config = tiny.get_config("chars")
config.train.batch_size = GLOBAL_BATCH // jax.device_count()
# a softmax over 8x the ids per step (2 x 4 samples + 2 x 4 x 2 targets): the row update
config.train.update(n_negative_samples_batch=4, unroll_steps=2)
config.data.vocab_file = padded_vocab_file(tempfile.mkdtemp(), 256)
vocab = trained_models.load_vocab(config)
trainer = trainer_lib.Trainer(config, vocab.size)
assert trainer.batch_size == GLOBAL_BATCH and jax.device_count() == n_processes
state = trainer.create_state(jax.random.PRNGKey(0))
# every process reads the same global batches and feeds its own rows
dataset = data.make_dataset(config_lib.streams(config), vocab, config.data.train_prefix, GLOBAL_BATCH, 2, test=False)
batches = dataset.iter_batches()
rows = slice(pid * GLOBAL_BATCH // n_processes, (pid + 1) * GLOBAL_BATCH // n_processes)
for _ in range(3):
    batch = next(batches)
    state, metrics = trainer.train_step(state, trainer.put_batch({k: v[rows] for k, v in batch.items()}))
params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
if pid == 0:
    np.savez(out, **{jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)})
print("done", pid)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(commands, timeout=240):
    procs = [subprocess.Popen(c, cwd=ROOT, env=python_env(XLA_FLAGS=""), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, out, err))
    for code, out, err in results:
        assert code == 0, err[-3000:]
    return results


def _two_shards(tmp_path):
    """The toy corpus as two shards, one for each process."""
    shards = tmp_path / "shards"
    shards.mkdir()
    lines = open(os.path.join(ROOT, "tests", "fixtures", "train", "data.txt"), encoding="utf-8").read().splitlines()
    (shards / "a.txt").write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
    (shards / "b.txt").write_text("\n".join(lines[3:]) + "\n", encoding="utf-8")
    return shards


def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    two = [[sys.executable, "-c", WORKER, str(i), "2", str(port), str(tmp_path / "two.npz")] for i in range(2)]
    _run_processes(two)
    _run_processes([[sys.executable, "-c", WORKER, "0", "1", "0", str(tmp_path / "one.npz")]])
    two_params, one_params = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert sorted(two_params.files) == sorted(one_params.files) and len(one_params.files) > 10
    for name in one_params.files:
        np.testing.assert_allclose(two_params[name], one_params[name], atol=1e-5, rtol=0, err_msg=name)


def test_command_line_as_two_processes_stops_together_at_sigterm_and_resumes(tmp_path):
    """elmojax.main with --coordinator_address etc.: each process reads its own shard. SIGTERM
    reaches one process (as a node's preemption would): JAX's preemption service makes both
    stop after the same step, each saving its part of that step's checkpoint (its data
    position, inside the step). A rerun resumes there; process 0 logs and evaluates."""
    import json
    import signal
    import time

    workdir, shards = str(tmp_path / "work"), _two_shards(tmp_path)

    def commands(steps):
        port = _free_port()
        return [[sys.executable, "-m", "elmojax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
                 f"--config.data.train_prefix={shards}/*.txt", f"--config.train.max_steps={steps}",
                 "--config.train.log_every=1", "--config.train.batch_size=1",
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
                for i in range(2)]

    procs = [subprocess.Popen(c, cwd=ROOT, env=python_env(XLA_FLAGS=""), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands(100000)]
    try:
        metrics_file = os.path.join(workdir, "metrics.jsonl")
        deadline = time.monotonic() + 180
        while not (os.path.exists(metrics_file) and len(open(metrics_file).read().splitlines()) >= 3):
            assert time.monotonic() < deadline, "no third metrics line in 180 s"
            ended = [p for p in procs if p.poll() is not None]
            assert not ended, f"process ended early ({ended[0].returncode}): {ended[0].communicate()[1][-3000:]}"
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    stopped = []
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        stopped.append(int(err.split(" at step ")[-1].split()[0]))
    assert stopped[0] == stopped[1]
    step = stopped[0]
    data = os.path.join(workdir, "checkpoints", str(step), "data")
    assert sorted(os.listdir(data))[-2:] == ["process_0.json", "process_1.json"]
    assert json.load(open(os.path.join(data, "process_1.json")))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))

    resumed = _run_processes(commands(step + 2))
    assert "resuming from" in resumed[0][2] and f"at step {step}" in resumed[0][2]
    assert "heldout perplexity" in resumed[0][1] and "heldout perplexity" not in resumed[1][1]
    assert {"process_0.json", "process_1.json"} <= set(os.listdir(os.path.join(workdir, "checkpoints", str(step + 2),
                                                                                "data")))


def test_dump_as_two_processes_equals_one(tmp_path):
    """python -m elmojax.dump elmo as two processes (training's flags): each embeds its chunks,
    process 0 merges them into one file, equal to a one-process run's, array for array."""
    import h5py

    from conftest import OPTIONS_FILE, WEIGHT_FILE, short_lines

    dataset = short_lines(tmp_path / "lines.txt", 240)

    def command(out, *more):
        return [sys.executable, "-m", "elmojax.dump", "elmo", dataset, str(out), "--all", "--options", OPTIONS_FILE,
                "--weights", WEIGHT_FILE, "--batch-size", "16", "--chunk-lines", "30", *more]

    port = _free_port()
    two = _run_processes([command(tmp_path / "two.hdf5", f"--coordinator_address=127.0.0.1:{port}",
                                  "--num_processes=2", f"--process_id={i}") for i in range(2)])
    for i, (_, _, err) in enumerate(two):
        assert f"process {i} of 2: 4 of its chunks to compute, 120 lines" in err, err[-3000:]
    _run_processes([command(tmp_path / "one.hdf5")])
    assert sorted(os.listdir(tmp_path)) == ["lines.txt", "one.hdf5", "two.hdf5"]  # no work directory left
    with h5py.File(tmp_path / "two.hdf5", "r") as two_file, h5py.File(tmp_path / "one.hdf5", "r") as one_file:
        assert sorted(two_file) == sorted(one_file) == sorted([str(i) for i in range(240)] + ["sentence_to_index"])
        assert two_file["sentence_to_index"][0] == one_file["sentence_to_index"][0]
        for key in one_file:
            np.testing.assert_array_equal(two_file[key][...], one_file[key][...], err_msg=key)
