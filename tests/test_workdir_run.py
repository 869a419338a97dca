"""The workdir is the run: its stored config, what a rerun may change, what evaluate and export
say of it, and checkpoints set aside only for damage (issue 24), tried on the command line as a
user would."""

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT, in_process
from elmojax.train import config as config_lib
from elmojax.train import checkpoint, evaluation, runconfig, trained_models
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TINY_DATA = os.path.join(FIXTURES, "train", "data.txt")


def _main(*args, cwd=ROOT):
    result = subprocess.run([sys.executable, "-m", "elmojax.main", *args], cwd=cwd, capture_output=True, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    return result.returncode, result.stdout, result.stderr


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(word in line for word in (
        "Traceback", "Event loop", "Exception", "error", "warning"))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run of 4 steps, checkpoints at 2 and 4, trained on the command line."""
    work = str(tmp_path_factory.mktemp("run") / "work")
    code, out, err = _main("--config=configs/tiny.py", f"--workdir={work}", "--config.train.max_steps=4",
                           "--config.train.checkpoint_every=2")
    assert code == 0, err[-3000:]
    return work, out, err


@pytest.mark.slow
def test_a_run_stores_its_config_and_a_young_model_is_not_called_broken(run):
    work, out, err = run
    stored = runconfig.stored(work)
    tiny = config_lib.config_from_options_json(json.load(open(os.path.join(work, "options.json"))), "options.json")
    assert stored.model.lstm.dim == tiny.model.lstm.dim == 16 and stored.train.max_steps == 4
    assert stored.data.train_prefix == TINY_DATA and set(json.load(open(runconfig.config_file(work)))) >= {
        "model", "train", "data", "eval", "init_from", "export_after_training"}
    # 4 steps: not yet better than a unigram model of its training data, which says so plainly
    assert "broken" not in out + err and "warning" not in out + err
    assert "note: the forward LM does not yet beat a unigram model of the training data" in out
    assert "train it longer" in out


@pytest.mark.slow
def test_a_rerun_without_config_goes_on_with_the_runs_own(run, tmp_path):
    work = str(tmp_path / "work")
    shutil.copytree(run[0], work)
    code, _, err = _main(f"--workdir={work}", "--config.train.max_steps=6", "--config.train.learning_rate=0.1")
    assert code == 0, err[-3000:]
    assert "config: train.max_steps: 4 in the run, 6 now" in err and "resuming from" in err and "at step 4" in err
    assert "config: train.learning_rate: 0.2 in the run, 0.1 now" in err
    assert checkpoint.steps(work)[-1] == 6 and runconfig.stored(work).train.learning_rate == 0.1


@pytest.mark.slow
def test_another_config_stops_before_any_checkpoint_is_read(run, tmp_path):
    work = str(tmp_path / "work")
    shutil.copytree(run[0], work)
    before = sorted(os.listdir(checkpoint.checkpoint_dir(work)))
    code, out, err = _main("--config=configs/quickstart.py", f"--workdir={work}")  # the default config
    assert code == 1 and err.count("\n") == 1 and not out, err
    assert err.startswith(f"error: {work}: this run was started with another config")
    for field in ("train.batch_size: 2 in the run, 32 now", "model.lstm.dim: 16 in the run, 256 now",
                  "the vocabulary's tokens: 32 in the run", f"--config.init_from={work}"):
        assert field in err
    assert sorted(os.listdir(checkpoint.checkpoint_dir(work))) == before
    code, _, err = _main(f"--workdir={work}", "--config.train.unroll_steps=5")
    assert code == 1 and "train.unroll_steps: 10 in the run, 5 now" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_evaluate_without_config_scores_the_runs_heldout_and_says_what(run):
    work = run[0]
    code, out, err = _main("--mode=evaluate", f"--workdir={work}")
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["heldout_files"] == [TINY_DATA] and result["tokens"] == 139
    assert result["model"] == work and result["step"] == 4 and result["unigram_files"] == [TINY_DATA]
    assert result["health"] == "undertrained" and result["blown_up"] is False
    assert f"139 tokens of {TINY_DATA}" in err and not _errors(err)


def test_evaluate_and_export_of_a_workdir_without_checkpoints_say_so(tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    for mode in ("evaluate", "export"):
        result = in_process("main", f"--mode={mode}", f"--workdir={work}", f"--output={tmp_path / 'x.hdf5'}",
                            "--config.data.heldout_prefix=" + TINY_DATA)
        code, err = result.returncode, result.stderr
        assert code == 1 and err == f"error: {work}: no checkpoint in this workdir yet ({work}/checkpoints); a run " \
                                    f"saves one every --config.train.checkpoint_every steps and when it ends\n", err


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named_set_aside_and_quiet(run, tmp_path):
    work = str(tmp_path / "work")
    shutil.copytree(run[0], work)
    state = os.path.join(checkpoint.checkpoint_dir(work), "4", "state", "ocdbt.process_0", "d")
    for name in os.listdir(state):
        with open(os.path.join(state, name), "r+b") as f:
            f.truncate(10)
    code, out, err = _main("--mode=evaluate", f"--workdir={work}")  # reading: step 2 is used, nothing moved
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["step"] == 2, err[-3000:]
    warnings = _errors(err)
    assert len(warnings) == 1 and "checkpoint step 4 in" in warnings[0] and "using step 2" in warnings[0], err
    code, _, err = _main(f"--workdir={work}", "--config.train.max_steps=6")  # training: set aside, named
    assert code == 0, err[-3000:]
    moved = os.path.join(checkpoint.checkpoint_dir(work), "damaged-4")
    assert os.path.isdir(moved) and f"set aside as {moved}; using step 2" in err and len(_errors(err)) == 1, err
    assert checkpoint.steps(work) == [2, 4, 6]


@pytest.mark.slow
def test_a_bilm_tf_checkpoint_without_a_vocabulary(tmp_path):
    """Exported as bilm-tf's dump_weights does (no vocabulary needed); evaluated with
    --config.data.vocab_file standing for it, said in a log line, as with the vocabulary beside it."""
    source = os.path.join(FIXTURES, "bilm_tf_checkpoint")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt, ignore=shutil.ignore_patterns("reference.npz", "dump_weights.hdf5", "vocab.txt"))
    vocab = tmp_path / "elsewhere" / "vocab.txt"
    vocab.parent.mkdir()
    shutil.copy(os.path.join(source, "vocab.txt"), vocab)
    written = trained_models.export(str(ckpt), str(tmp_path / "out" / "elmo.hdf5"))
    assert written.vocab is None and sorted(os.listdir(tmp_path / "out")) == [
        "elmo.hdf5", "elmo_softmax.hdf5", "options.json"]
    with h5py.File(written.weights, "r") as f, h5py.File(os.path.join(source, "dump_weights.hdf5"), "r") as g:
        names = []
        g.visit(lambda name: names.append(name) if isinstance(g[name], h5py.Dataset) else None)
        for name in names:
            np.testing.assert_array_equal(f[name][...], g[name][...], err_msg=name)
    with h5py.File(written.softmax, "r") as f:
        assert "vocab" not in f

    config = config_lib.base_config()
    config.data.update(heldout_prefix=TINY_DATA, vocab_file=str(vocab))
    config.eval.update(batch_size=4, unroll_steps=5)
    with pytest.raises(ValueError, match="no vocabulary beside the checkpoint"):
        evaluation.evaluate(config_lib.base_config(), str(ckpt))
    got = evaluation.evaluate(config, str(ckpt))
    want = evaluation.evaluate(config, os.path.join(FIXTURES, "bilm_tf_checkpoint"))
    assert got.heldout.perplexity == want.heldout.perplexity and got.heldout.tokens == want.heldout.tokens == 139
    code, out, err = _main("--mode=evaluate", f"--model={ckpt}", f"--config.data.vocab_file={vocab}",
                           f"--config.data.heldout_prefix={TINY_DATA}", "--config.eval.batch_size=4",
                           "--config.eval.unroll_steps=5")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["perplexity"] == pytest.approx(got.heldout.perplexity)
    assert f"no vocabulary beside the checkpoint; using {vocab} (--config.data.vocab_file) as its vocabulary" in err


_SLOW_EXPORT = """
import os, sys, time, runpy
fsync = os.fsync
def slow(fd):  # the first file written, then a pause with the temporary files in place
    fsync(fd)
    print("writing", flush=True)
    time.sleep(60)
os.fsync = slow
sys.argv = ["elmojax.main"] + sys.argv[1:]
runpy.run_module("elmojax.main", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_an_export_stopped_midway_leaves_the_earlier_one_and_no_temporary_file(run, tmp_path, how):
    import signal

    output = tmp_path / "export" / "elmo.hdf5"
    code, _, err = _main("--mode=export", f"--workdir={run[0]}", f"--output={output}")
    assert code == 0, err
    before = {name: (tmp_path / "export" / name).read_bytes() for name in os.listdir(tmp_path / "export")}
    with open(output, "r+b") as f:  # so that a new export differs from it
        f.seek(0, 2)
        f.write(b"\0")
    before[output.name] = output.read_bytes()
    process = subprocess.Popen([sys.executable, "-c", _SLOW_EXPORT, "--mode=export", f"--workdir={run[0]}",
                                f"--output={output}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert process.stdout.readline() == "writing\n"
    assert any(name.endswith(".tmp") for name in os.listdir(tmp_path / "export"))
    process.send_signal(getattr(signal, how))
    _, err = process.communicate(timeout=60)
    after = {name: (tmp_path / "export" / name).read_bytes() for name in os.listdir(tmp_path / "export")
             if not name.endswith(".tmp")}
    assert after == before  # every file of the earlier export as it was
    if how == "SIGKILL":  # the next export clears what the killed one left
        code, _, err = _main("--mode=export", f"--workdir={run[0]}", f"--output={output}")
        assert code == 0, err
    else:
        assert process.returncode == 128 + getattr(signal, how)
        assert err == f"stopped by {how}; nothing was written (an earlier export is as it was)\n"
    assert not [name for name in os.listdir(tmp_path / "export") if name.endswith(".tmp")]
