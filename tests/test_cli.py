"""The `elmojax` command: its subcommands reach the jobs' command lines, one flag style, the
older spellings accepted with a note, bilm-tf's script flags mapped, --help that says it all."""

import os
import re
import shutil
import subprocess
import sys

import h5py
import pytest

import elmojax.cli as cli
import elmojax.dump
import elmojax.main
import elmojax.prepare
from conftest import OPTIONS_FILE, VOCAB_FILE, WEIGHT_FILE, in_process, python_env, short_lines


def run_cli(capsys, *argv):
    """elmojax ARGV in this process: (exit status, stdout, stderr)."""
    try:
        status = cli.main(list(argv))
    except SystemExit as e:
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def calls(monkeypatch):
    """The jobs' entry points replaced by recorders: [(job, argv, prog)]."""
    made = []
    monkeypatch.setattr(elmojax.main, "run", lambda argv: made.append(("main", argv, None)))
    monkeypatch.setattr(elmojax.prepare, "main", lambda argv, prog: made.append(("prepare", argv, prog)))
    monkeypatch.setattr(elmojax.dump, "main", lambda argv, prog: made.append(("dump", argv, prog)) or 0)
    return made


def test_each_subcommand_reaches_its_job(calls, capsys):
    for argv in (["train", "--workdir=w"], ["evaluate", "--model=m.hdf5"], ["export", "--workdir=w", "--output=e"],
                 ["prepare", "--input=c.txt", "--output=d"], ["dump", "elmo", "--input=a", "--output=b"]):
        assert run_cli(capsys, *argv)[0] == 0, argv
    assert calls == [
        ("main", ["elmojax train", "--mode=train", "--workdir=w"], None),
        ("main", ["elmojax evaluate", "--mode=evaluate", "--model=m.hdf5"], None),
        ("main", ["elmojax export", "--mode=export", "--workdir=w", "--output=e"], None),
        ("prepare", ["--input=c.txt", "--output=d"], "elmojax prepare"),
        ("dump", ["elmo", "--input=a", "--output=b"], "elmojax dump"),
    ]


def test_bad_command_lines_are_one_line(calls, capsys):
    for argv, message in ((["nope"], "error: elmojax: no command 'nope'; the commands: train, evaluate, export"),
                          ([], "error: elmojax: give a command: train, evaluate"),
                          (["evaluate", "--mode=train"], "error: elmojax: evaluate: no --mode here")):
        status, out, err = run_cli(capsys, *argv)
        assert status == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith(message), (argv, err)
    assert calls == []


def test_help_lists_the_subcommands(capsys):
    status, out, _ = run_cli(capsys, "--help")
    assert status == 0
    listed = [line.split()[0] for line in out.split("commands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == ["train", "evaluate", "export", "prepare", "dump"]


def test_train_help_shows_flags_defaults_and_every_config_field(capsys):
    from elmojax.train.config import base_config

    status, out, _ = run_cli(capsys, "train", "--help")
    assert status == 0
    assert "--workdir               where checkpoints, logs and the vocabulary go (default: workdir)" in out
    assert re.search(r"\n  --save_dir +is --workdir\n", out) and re.search(r"\n  --test_prefix +is --config.data.heldout_prefix", out)
    fields = {name for name, _, _ in cli.config_fields()}
    assert fields == set(cli.CONFIG_FIELDS)  # every field of base_config has its meaning written down
    assert "  train.batch_size" in out and "sentences per batch and device (bilm-tf's per-GPU batch_size) " \
                                           "(default: 128)" in out
    assert all(f"  {name} " in out for name in fields)
    assert base_config().train.batch_size == 128


def test_prepare_and_dump_help_show_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert "--heldout_fraction" in out and "(default: 0.01)" in out and "(default: 100000)" in out
    assert "--heldout-fraction" not in out
    with pytest.raises(SystemExit):
        cli.main(["dump", "bilm", "--help"])
    out = capsys.readouterr().out
    assert "usage: elmojax dump bilm" in out and "--batch_size" in out and "(default: 64)" in out
    assert "--chunk_lines" in out and "--input" in out and "--output" in out and "--dataset" not in out


def _bilm_args(dataset, out, *more):
    return ["bilm", "--vocab", VOCAB_FILE, "--options", OPTIONS_FILE, "--weights", WEIGHT_FILE,
            "--dataset", dataset, "--out", out, *more]


def test_old_dump_spellings_work_with_one_note(capsys):
    args = elmojax.dump.parse(_bilm_args("d.txt", "o.hdf5", "--batch-size", "3", "--chunk-lines", "5",
                                         "--num-processes", "1"))
    assert (args.input, args.output, args.batch_size, args.chunk_lines, args.num_processes) == ("d.txt", "o.hdf5",
                                                                                                 3, 5, 1)
    assert capsys.readouterr().err == (
        "note: python -m elmojax.dump bilm: --dataset is now --input, --out is now --output, --batch-size is now "
        "--batch_size, --chunk-lines is now --chunk_lines, --num-processes is now --num_processes "
        "(old spellings still work)\n")
    for command in ("elmo", "sentences", "score"):
        more = ["--top"] if command == "elmo" else ["--softmax", "s.hdf5"] if command == "score" else []
        args = elmojax.dump.parse([command, "in.txt", "out.hdf5", "--weights", WEIGHT_FILE, "--use-sentence-keys"
                                   if command == "elmo" else "--quiet", *more], prog="elmojax dump")
        assert (args.input, args.output) == ("in.txt", "out.hdf5")
        note = capsys.readouterr().err
        assert note.startswith(f"note: elmojax dump {command}: INPUT OUTPUT is now --input INPUT --output OUTPUT")
        assert len(note.splitlines()) == 1
    args = elmojax.dump.parse(["elmo", "--input", "in.txt", "--output", "o.hdf5", "--all", "--weights", WEIGHT_FILE])
    assert (args.input, args.output, args.output_format) == ("in.txt", "o.hdf5", "all")
    assert capsys.readouterr().err == ""  # the new spelling: no note


def test_dump_input_and_output_given_twice_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        elmojax.dump.parse(["elmo", "in.txt", "o.hdf5", "--input", "in.txt", "--top", "--weights", WEIGHT_FILE])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: python -m elmojax.dump elmo: give the input and output once")
    with pytest.raises(SystemExit):
        elmojax.dump.parse(["sentences", "--input", "in.txt", "--weights", WEIGHT_FILE])
    assert "the following arguments are required: --output" in capsys.readouterr().err


def test_a_dump_by_its_old_command_line_through_elmojax(tmp_path, capsys):
    dataset = short_lines(tmp_path / "lines.txt", 3)
    status, out, err = run_cli(capsys, "dump", *_bilm_args(dataset, str(tmp_path / "o.hdf5"), "--quiet"))
    assert status == 0 and out == f"wrote {tmp_path / 'o.hdf5'}\n"
    assert err.splitlines() == ["note: elmojax dump bilm: --dataset is now --input, --out is now --output "
                                "(old spellings still work)"]
    with h5py.File(tmp_path / "o.hdf5", "r") as f:
        assert sorted(f, key=int) == ["0", "1", "2"]


def test_old_prepare_spellings_work_with_one_note(tmp_path):
    corpus = short_lines(tmp_path / "corpus.txt", 50)
    old = in_process("prepare", "--input", corpus, "--output", str(tmp_path / "old"), "--heldout-fraction", "0.1",
                     "--shard-lines", "20", "--min-count", "2")
    assert old.returncode == 0, old.stderr
    assert old.stderr == ("note: python -m elmojax.prepare: --heldout-fraction is now --heldout_fraction, "
                          "--shard-lines is now --shard_lines, --min-count is now --min_count "
                          "(old spellings still work)\n")
    new = in_process("prepare", "--input", corpus, "--output", str(tmp_path / "new"), "--heldout_fraction", "0.1",
                     "--shard_lines=20", "--min_count", "2")
    assert new.returncode == 0 and new.stderr == ""
    assert new.stdout == old.stdout.replace(str(tmp_path / "old"), str(tmp_path / "new"))
    assert sorted(os.listdir(tmp_path / "new" / "train")) == ["shard-00000.txt", "shard-00001.txt", "shard-00002.txt"]


def test_bilm_tf_flags_map_one_to_one():
    assert cli.bilm_tf_flags(["--train_prefix=t/*", "--vocab_file", "v.txt", "-save_dir", "w", "--test_prefix=h/*",
                              "--outfile", "o.hdf5", "--config.train.seed=1", "--workdir_x"]) == [
        "--config.data.train_prefix=t/*", "--config.data.vocab_file=v.txt", "--workdir=w",
        "--config.data.heldout_prefix=h/*", "--output=o.hdf5", "--config.train.seed=1", "--workdir_x"]


def test_a_train_elmo_command_line_reaches_the_config(monkeypatch, tmp_path, capsys):
    """bin/train_elmo.py's flags, run_test.py's and dump_weights.py's, as elmojax train/evaluate/export's."""
    seen = []
    monkeypatch.setattr(elmojax.main, "main", lambda argv: seen.append(
        (elmojax.main._MODE.value, elmojax.main._WORKDIR.value, elmojax.main._OUTPUT.value,
         dict(elmojax.main._CONFIG.value.data))))
    work = str(tmp_path / "w")
    status, _, said = run_cli(capsys, "train", "--train_prefix=t/*.txt", "--vocab_file", "v.txt", "--save_dir", work)
    assert status == 0 and "bilm-tf's recipe (--config=billion_word" in said
    assert run_cli(capsys, "evaluate", "--save_dir", work, "--vocab_file=v.txt", "--test_prefix=h/*.txt")[0] == 0
    assert run_cli(capsys, "export", f"--save_dir={work}", "--outfile", "o.hdf5")[0] == 0
    assert [s[:3] for s in seen] == [("train", work, None), ("evaluate", work, None), ("export", work, "o.hdf5")]
    assert (seen[0][3]["train_prefix"], seen[0][3]["vocab_file"]) == ("t/*.txt", "v.txt")
    assert (seen[1][3]["heldout_prefix"], seen[1][3]["vocab_file"]) == ("h/*.txt", "v.txt")
    with monkeypatch.context() as m:  # python -m elmojax.main takes them too
        m.setattr(elmojax.main, "main", lambda argv: seen.append(elmojax.main._WORKDIR.value))
        elmojax.main.run(["python -m elmojax.main", "--save_dir", work])
    assert seen[-1] == work


def test_a_train_elmo_command_line_trains_bilm_tfs_recipe_unless_told_or_resuming(monkeypatch, tmp_path, capsys):
    """train_elmo.py's flags without --config: a new run gets bilm-tf's recipe (billion_word:
    LSTM 4096/512), not the quickstart's small model; --config, or a run already in the
    workdir, keeps its own."""
    seen = []
    monkeypatch.setattr(elmojax.main, "main", lambda argv: seen.append(elmojax.main._CONFIG.value))
    work = tmp_path / "w"
    run_cli(capsys, "train", "--train_prefix=t/*.txt", "--vocab_file=v.txt", f"--save_dir={work}")
    assert (seen[-1].model.lstm.dim, seen[-1].train.n_negative_samples_batch) == (4096, 8192)
    run_cli(capsys, "train", "--train_prefix=t/*.txt", "--config=quickstart", f"--save_dir={work}")
    assert seen[-1].model.lstm.dim != 4096
    work.mkdir()
    (work / "config.json").write_text("{}")
    assert "bilm-tf's recipe" not in run_cli(capsys, "train", "--train_prefix=t/*.txt", f"--save_dir={work}")[2]


@pytest.mark.slow
def test_the_console_script(tmp_path):
    """The installed `elmojax` program (pip install -e . puts it beside the interpreter)."""
    program = shutil.which("elmojax", path=os.path.dirname(sys.executable))
    if program is None:
        pytest.skip("no elmojax console script beside this interpreter: pip install -e . makes it")
    result = subprocess.run([program, "--help"], cwd=tmp_path, env=python_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "usage: elmojax COMMAND" in result.stdout
    for command in cli.COMMANDS:
        assert f"\n  {command} " in result.stdout
    result = subprocess.run([program, "dump", "nope"], cwd=tmp_path, env=python_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: elmojax dump: argument command: invalid")
