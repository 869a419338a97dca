"""launch/: the shell scripts parse, local.sh trains the tiny model on CPU and resumes from its
workdir, and slurm.sbatch builds one elmojax.main command per task (with stand-ins for srun,
scontrol and python: no SLURM cluster is needed)."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

LOCAL = os.path.join(ROOT, "launch", "local.sh")
SLURM = os.path.join(ROOT, "launch", "slurm.sbatch")
TRAIN = os.path.join(ROOT, "tests", "fixtures", "train")

BASH = shutil.which("bash")
pytestmark = [pytest.mark.skipif(BASH is None, reason="needs bash"), pytest.mark.slow]

# prints its arguments one per line to $ARGS_DIR/task-$SLURM_PROCID (0 outside srun)
FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$ARGS_DIR/task-${SLURM_PROCID:-0}"
"""
# skips srun's options, then runs the command once per task with that task's SLURM_PROCID
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == -* ]]; do echo "$1" >> "$ARGS_DIR/srun-options"; shift; done
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" || exit $?; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2 $3" == "show hostnames node[07-08]" ]] || exit 3
printf 'node07\\nnode08\\n'
"""


def _clean_env(**overrides):
    env = {k: v for k, v in os.environ.items()
           if k not in ("CONFIG", "WORKDIR", "DATA", "TRAIN_PREFIX", "HELDOUT_PREFIX", "VOCAB_FILE", "EXTRA_ARGS",
                        "PYTHON", "XLA_FLAGS", "REPO", "SRUN_ARGS") and not k.startswith("SLURM_")}
    env.update(overrides)
    return env


def _executable(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("script", [LOCAL, SLURM])
def test_syntax(script):
    subprocess.run([BASH, "-n", script], check=True)


def test_local_trains_the_tiny_model_on_cpu(tmp_path):
    workdir = tmp_path / "workdir"
    env = _clean_env(PYTHON=sys.executable, JAX_PLATFORMS="cpu", CONFIG=os.path.join(ROOT, "configs", "tiny.py"),
                     WORKDIR=str(workdir), DATA=TRAIN, TRAIN_PREFIX=os.path.join(TRAIN, "data.txt"),
                     HELDOUT_PREFIX="", EXTRA_ARGS="--config.train.max_steps=3 --config.train.checkpoint_every=2")
    result = subprocess.run([BASH, LOCAL], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "+ " in result.stderr and "-m elmojax.main" in result.stderr  # prints what it runs
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]
    assert (workdir / "vocab.txt").read_text() == open(os.path.join(TRAIN, "vocab.txt")).read()


def test_local_command_line(tmp_path):
    env = _clean_env(ARGS_DIR=str(tmp_path), PYTHON=_executable(tmp_path / "python", FAKE_PYTHON),
                     DATA="data dir", EXTRA_ARGS=" --mode=evaluate   --config.eval.batch_size=2 ")
    subprocess.run([BASH, LOCAL, "--config.train.seed=1"], cwd=tmp_path, env=env, check=True, capture_output=True)
    args = (tmp_path / "task-0").read_text().splitlines()
    assert args == ["-m", "elmojax.main", f"--config={ROOT}/configs/billion_word.py", "--workdir=workdir/billion_word",
                    "--config.data.train_prefix=data dir/train/shard-*.txt",   # globs reach elmojax unexpanded
                    "--config.data.heldout_prefix=data dir/heldout/shard-*.txt",
                    "--config.data.vocab_file=data dir/vocab.txt",
                    "--mode=evaluate", "--config.eval.batch_size=2", "--config.train.seed=1"]


def test_slurm_one_command_per_task(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    env = _clean_env(ARGS_DIR=str(tmp_path), PYTHON=_executable(tmp_path / "python", FAKE_PYTHON),
                     PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NTASKS="2",
                     SLURM_NNODES="2", SLURM_JOB_NODELIST="node[07-08]", SLURM_SUBMIT_DIR=ROOT,
                     SLURM_CPUS_PER_TASK="16", DATA="/shared/1b", EXTRA_ARGS="--config.train.log_every=10")
    subprocess.run([BASH, SLURM, "--config.train.max_steps=5"], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    assert "--kill-on-bad-exit=1" in (tmp_path / "srun-options").read_text().split()
    for task in range(2):
        args = (tmp_path / f"task-{task}").read_text().splitlines()
        assert args == ["-m", "elmojax.main", f"--config={ROOT}/configs/billion_word.py",
                        "--workdir=workdir/billion_word",
                        "--config.data.train_prefix=/shared/1b/train/shard-*.txt",
                        "--config.data.heldout_prefix=/shared/1b/heldout/shard-*.txt",
                        "--config.data.vocab_file=/shared/1b/vocab.txt",
                        "--coordinator_address=node07:24242", "--num_processes=2", f"--process_id={task}",
                        "--config.train.log_every=10", "--config.train.max_steps=5"]


def test_slurm_refuses_to_run_outside_slurm(tmp_path):
    result = subprocess.run([BASH, SLURM], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True)
    assert result.returncode != 0 and "sbatch" in result.stderr
