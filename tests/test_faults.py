"""What a long run meets, tried as a user would: divergence, damaged checkpoints, a second
trainer, a full or read-only disk, broken weights, and numbers too large for a float32."""

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import jax
import numpy as np
import pytest

from elmojax.formats import hdf5
from elmojax.formats import locks as workdir_lib
from elmojax.train import checkpoint, evaluation, loop, metrics, trained_models
from elmojax.train.tensorboard import SummaryWriter

import tiny
from conftest import ROOT, dead_pid, in_process, padded_vocab_file


def _config(**train):
    config = tiny.get_config("chars")
    config.train.update(checkpoint_every=2, log_every=100, **train)
    return config


def _damage(workdir, step):
    """Cuts the arrays of a checkpoint step short, as a failing disk or an interrupted copy would."""
    data = os.path.join(checkpoint.checkpoint_dir(workdir), str(step), "state", "ocdbt.process_0", "d")
    for name in os.listdir(data):
        with open(os.path.join(data, name), "r+b") as f:
            f.truncate(10)


@pytest.mark.slow  # a whole training run
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    work = str(tmp_path / "work")
    loop.train(_config(max_steps=4), work)
    with pytest.raises(loop.Diverged, match=r"step \d+: training diverged .* the newest checkpoint, step 4 "):
        loop.train(_config(max_steps=12, learning_rate=1e30), work)
    assert checkpoint.steps(work) == [2, 4]  # nothing of the diverged run was saved
    params = trained_models.load_trained(work).params
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


@pytest.mark.slow  # a whole training run
def test_a_damaged_newest_checkpoint_is_passed_over_with_a_warning(tmp_path, caplog):
    work = str(tmp_path / "work")
    loop.train(_config(max_steps=4), work)
    _damage(work, 4)
    with caplog.at_level(logging.WARNING):
        trained_models.load_trained(work)  # reading: the step before it, nothing renamed
    assert "checkpoint step 4" in caplog.text and "cannot be read" in caplog.text
    assert checkpoint.steps(work) == [2, 4]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        state = loop.train(_config(max_steps=6), work)  # training: resumes from step 2
    assert "resuming from" in caplog.text and "at step 2" in caplog.text
    assert int(state.step) == 6 and checkpoint.steps(work) == [2, 4, 6]
    assert os.path.isdir(os.path.join(checkpoint.checkpoint_dir(work), checkpoint.DAMAGED_PREFIX + "4"))


@pytest.mark.slow  # a whole training run
def test_no_readable_checkpoint_is_one_error_and_changes_nothing(tmp_path):
    work = str(tmp_path / "work")
    loop.train(_config(max_steps=4), work)
    _damage(work, 2)
    with open(os.path.join(checkpoint.checkpoint_dir(work), "4", "meta", "metadata"), "w"):
        pass  # an empty metadata file
    before = sorted(os.listdir(checkpoint.checkpoint_dir(work)))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint can be read .*nothing was changed"):
        trained_models.load_trained(work)
    assert sorted(os.listdir(checkpoint.checkpoint_dir(work))) == before


@pytest.mark.slow  # a whole training run
def test_a_save_killed_midway_leaves_nothing_in_the_way(tmp_path):
    """kill -9 during a save leaves orbax's temporary directory: the rerun resumes from the step
    before and clears it."""
    work = str(tmp_path / "work")
    loop.train(_config(max_steps=4), work)
    directory = checkpoint.checkpoint_dir(work)
    shutil.copytree(os.path.join(directory, "4"), os.path.join(directory, "6.orbax-checkpoint-tmp-1234"))
    os.remove(os.path.join(directory, "6.orbax-checkpoint-tmp-1234", "state", "_METADATA"))
    state = loop.train(_config(max_steps=6), work)
    assert int(state.step) == 6 and checkpoint.steps(work) == [2, 4, 6]
    assert not [n for n in os.listdir(directory) if "tmp" in n]


@pytest.mark.slow  # a whole training run
def test_a_changed_model_or_vocabulary_on_resume_is_one_error_and_touches_no_checkpoint(tmp_path):
    work = str(tmp_path / "work")
    loop.train(_config(max_steps=2), work)
    before = sorted(os.listdir(checkpoint.checkpoint_dir(work)))
    config = _config(max_steps=4)
    config.model.lstm.dim = 32
    with pytest.raises(ValueError, match=r"model.lstm.dim: 16 in the run, 32 now\. These define the run"):
        loop.train(config, work)
    config = _config(max_steps=4)
    config.data.vocab_file = padded_vocab_file(tmp_path, 34)  # two tokens more
    with pytest.raises(ValueError, match=r"the vocabulary's tokens: 32 in the run .*, 34 now .*the same up to line 32"):
        loop.train(config, work)
    assert sorted(os.listdir(checkpoint.checkpoint_dir(work))) == before  # nothing set aside


def test_a_second_trainer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, caplog):
    work = str(tmp_path)
    with workdir_lib.locked(work):
        with pytest.raises(ValueError, match=rf"in use by another trainer \(process {os.getpid()} on "):
            with workdir_lib.locked(work):
                pass
        with pytest.raises(ValueError, match="in use by another trainer"):
            loop.train(_config(max_steps=2), work)
    assert not os.path.exists(os.path.join(work, workdir_lib.LOCK_FILE))
    with open(os.path.join(work, workdir_lib.LOCK_FILE), "w") as f:
        json.dump({"host": os.uname().nodename, "pid": dead_pid()}, f)
    with caplog.at_level(logging.WARNING), workdir_lib.locked(work):
        pass
    assert "taking over the lock of process" in caplog.text


@contextlib.contextmanager
def _small_filesystem(path, size: str):
    """A tmpfs of `size` at `path`, where this process may mount one; None otherwise."""
    os.makedirs(path)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0 if shutil.which("mount") else False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


@pytest.mark.slow  # a whole training run
def test_a_full_disk_stops_the_run_with_its_checkpoints_intact(tmp_path, monkeypatch):
    work = tmp_path / "small"
    with _small_filesystem(work, "900k") as mounted:
        if not mounted:  # a stand-in: the file system reports little free space
            real = shutil.disk_usage
            monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(
                free=0 if checkpoint.steps(str(work)) else real(p).free))
        with pytest.raises(checkpoint.CheckpointError, match="no room for the checkpoint of step 4 .* intact"):
            loop.train(_config(max_steps=10), str(work))
        assert checkpoint.steps(str(work)) == [2]
        assert not [n for n in os.listdir(checkpoint.checkpoint_dir(str(work))) if "tmp" in n]
        trained_models.load_trained(str(work))  # still readable
        if mounted:  # an export that does not fit: an OSError naming a file, and nothing written
            with open(work / "filler", "wb") as f:
                f.write(b"x" * (shutil.disk_usage(work).free - 20_000))
            with pytest.raises(OSError, match="No space left on device"):
                trained_models.export(str(work), str(work / "export" / "elmo.hdf5"))
            assert not os.listdir(work / "export")


@pytest.mark.slow  # a whole training run
def test_a_finished_run_can_be_evaluated_and_exported_from_a_read_only_workdir(tmp_path):
    work = tmp_path / "ro"
    with _small_filesystem(work, "4m") as mounted:
        if not mounted and os.geteuid() == 0:
            pytest.skip("root ignores file permissions, and no tmpfs can be mounted here")
        loop.train(_config(max_steps=2), str(work))
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(work)], check=True)
        else:
            for base, dirs, names in os.walk(work):
                for name in dirs + names:
                    os.chmod(os.path.join(base, name), 0o555)
            os.chmod(work, 0o555)
        try:
            config = _config(max_steps=2)
            assert evaluation.evaluate(config, str(work)).heldout.tokens > 0
            trained_models.export(str(work), str(tmp_path / "out" / "elmo.hdf5"))
            with pytest.raises(ValueError, match="not writable"):
                loop.train(_config(max_steps=4), str(work))
        finally:
            if mounted:
                subprocess.run(["mount", "-o", "remount,rw", str(work)], check=True)
            else:
                os.chmod(work, 0o755)


def test_weights_with_nan_are_never_written_or_read(tmp_path):
    with pytest.raises(ValueError, match=r"out\.hdf5: dataset 'softmax/b' holds 1 NaN or infinite values"):
        hdf5.save_softmax(np.ones((3, 2), np.float32), np.array([0, np.nan, 0], np.float32), str(tmp_path / "out.hdf5"))
    assert not os.listdir(tmp_path)
    from conftest import OPTIONS_FILE, WEIGHT_FILE

    from elmojax import BidirectionalLanguageModel

    broken = str(tmp_path / "broken.hdf5")
    shutil.copyfile(WEIGHT_FILE, broken)
    with h5py.File(broken, "r+") as f:
        name = "RNN_0/RNN/MultiRNNCell/Cell0/LSTMCell/B"
        f[name][0] = np.inf
    with pytest.raises(ValueError, match=rf"broken\.hdf5: dataset '{name}' holds 1 NaN or infinite values"):
        BidirectionalLanguageModel(OPTIONS_FILE, broken)


def test_metrics_never_crash_on_huge_or_missing_values(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path))
    writer.scalars(1, {"train/loss": 1e39, "train/grad_norm": float("nan")})
    writer.close()
    line = json.loads(open(tmp_path / metrics.METRICS_FILE).read())
    assert isinstance(line.pop("time"), float)  # (the wall-clock time every line has)
    assert line == {"step": 1, "train/loss": 1e39, "train/grad_norm": None}
    SummaryWriter(str(tmp_path)).scalars(2, {"x": -1e300})
    assert metrics.dumps({"perplexity": float("inf"), "n": [float("nan"), 1.0]}) == '{"perplexity": null, "n": [null, 1.0]}'


def _start(work, *args):
    command = [sys.executable, "-m", "elmojax.main", "--config=configs/tiny.py", f"--workdir={work}",
               "--config.train.log_every=1", "--config.train.checkpoint_every=5", *args]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(work, step: int, process, timeout: float = 120.0) -> int:
    """Waits until the run has logged `step` (metrics.jsonl); returns the last step logged."""
    deadline = time.monotonic() + timeout
    path = os.path.join(work, metrics.METRICS_FILE)
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        if os.path.exists(path):
            lines = open(path).read().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_sigterm_and_sigint_save_and_stop_and_kill_9_loses_at_most_one_interval(tmp_path):
    work = str(tmp_path / "work")
    run = _start(work, "--config.train.max_steps=100000")
    _wait_for_step(work, 3, run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err[-2000:]
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split()[0])
    assert checkpoint.steps(work)[-1] == stopped and "Traceback" not in err
    assert not os.path.exists(os.path.join(work, workdir_lib.LOCK_FILE))

    run = _start(work, "--config.train.max_steps=100000")
    _wait_for_step(work, stopped + 3, run)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0 and f"at step {stopped}" in err, err[-2000:]
    stopped = int(err.split("stopped by SIGINT at step ")[1].split()[0])
    assert checkpoint.steps(work)[-1] == stopped and "Traceback" not in err

    # kill -9 with a checkpoint every step, so that it lands in a save as often as not
    run = _start(work, "--config.train.max_steps=100000", "--config.train.checkpoint_every=1")
    killed_after = _wait_for_step(work, stopped + 6, run)
    run.kill()
    run.communicate(timeout=60)
    assert checkpoint.steps(work)[-1] >= killed_after - 1  # at most one interval lost
    assert os.path.exists(os.path.join(work, workdir_lib.LOCK_FILE))  # left by the killed run
    # and kill -9 while it starts (restoring, compiling)
    run = _start(work, "--config.train.max_steps=100000")
    time.sleep(3)
    run.kill()
    run.communicate(timeout=60)

    resumed_at = checkpoint.steps(work)[-1]
    run = _start(work, f"--config.train.max_steps={resumed_at + 2}", "--config.data.heldout_prefix=")
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err[-2000:]
    assert "taking over the lock of process" in err and f"at step {resumed_at}" in err
    assert checkpoint.steps(work)[-1] == resumed_at + 2


@pytest.mark.parametrize("args, message", [
    (["--config=configs/nope.py"], "error: --config=configs/nope.py: no such config file"),
    (["--config.train.batchsize=2"], "error: --config.train.batchsize: no such config field (did you mean 'batch_size'?)"),
    (["--config.train.dropout=1.5"], "error: config: train.dropout must be a number from 0 up to (not including) 1, got 1.5"),
    (["--config.train.learning_rate=-0.1"], "error: config: train.learning_rate must be a number of at least 0, got -0.1"),
    (["--config.train.n_epochs=0"], "error: config: train.n_epochs must be an integer of at least 1, got 0"),
    (["--config.train.batch_size=0"], "error: config: train.batch_size must be an integer of at least 1, got 0"),
    (["--workdir=README.md"], "error: README.md: the workdir is a file, not a directory"),
    (["--mode=export", "--output=tests"], "error: --output=tests: a directory; give the weight file to write"),
])
def test_bad_command_lines_get_one_line(args, message):
    run = in_process("main", "--config=configs/tiny.py", *args)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [message] or run.stderr.strip().startswith(message), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.slow
def test_a_bad_command_line_is_one_line_as_a_user_runs_it():
    """One of them in a process of its own: one line, no traceback, exit status 1."""
    command = [sys.executable, "-m", "elmojax.main", "--config=configs/tiny.py", "--config.train.dropout=1.5"]
    run = subprocess.run(command, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr == "error: config: train.dropout must be a number from 0 up to (not including) 1, got 1.5\n"
