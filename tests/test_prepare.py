"""The corpus tool: splits, shards, vocabulary order, determinism, errors, the command line."""

import gzip
import os
import signal
import subprocess
import sys

import pytest

from elmojax.data import corpus as prep
from elmojax.data.corpus import CorpusSettings
from elmojax.prepare import config_flags
from elmojax.data import LMDataset, count_tokens
from elmojax.formats.vocab import Vocabulary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "train", "data.txt")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def tree(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture
def corpus(tmp_path):
    # 100 distinct sentences; "a" x100, "b" x50, "c" and "d" x20 (a tie), "rare" once, plus "s<k>" once each.
    lines = []
    for k in range(100):
        words = ["a"] + (["b"] if k % 2 == 0 else []) + (["c", "d"] if k % 5 == 0 else []) + [f"s{k}"]
        lines.append(" ".join(words))
    lines[7] += " rare"
    lines.insert(30, "   ")  # blank lines are dropped
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path), [line for line in lines if line.strip()]


def test_vocab_order_and_specials(corpus, tmp_path):
    path, _ = corpus
    summary = prep.prepare([path], str(tmp_path / "out"), CorpusSettings(heldout_fraction=0))
    vocab = read(tmp_path / "out" / "vocab.txt")
    assert vocab[:7] == ["<S>", "</S>", "<UNK>", "a", "b", "c", "d"]
    assert vocab[7:] == sorted(vocab[7:])  # the count-1 words, alphabetical
    assert len(vocab) == 3 + 4 + 100 + 1 and summary["vocab_size"] == len(vocab)
    Vocabulary(str(tmp_path / "out" / "vocab.txt"), validate_file=True)
    assert not os.path.exists(tmp_path / "out" / "heldout") and summary["heldout_pattern"] is None
    # without a heldout split the flags still say so: no config's own heldout data is scored instead
    assert "--config.data.heldout_prefix=''" in config_flags(summary)

    prep.prepare([path], str(tmp_path / "min2"), CorpusSettings(heldout_fraction=0, min_count=2))
    assert read(tmp_path / "min2" / "vocab.txt") == ["<S>", "</S>", "<UNK>", "a", "b", "c", "d"]
    prep.prepare([path], str(tmp_path / "max5"), CorpusSettings(heldout_fraction=0, max_vocab=5))
    assert read(tmp_path / "max5" / "vocab.txt") == ["<S>", "</S>", "<UNK>", "a", "b"]


def test_split_and_shards(corpus, tmp_path):
    path, lines = corpus
    out = tmp_path / "out"
    summary = prep.prepare([path], str(out), CorpusSettings(heldout_fraction=0.1, shard_lines=25))
    train_files = sorted(os.listdir(out / "train"))
    assert train_files == [f"shard-0000{k}.txt" for k in range(4)]
    assert [len(read(out / "train" / f)) for f in train_files] == [25, 25, 25, 15]
    assert os.listdir(out / "heldout") == ["shard-00000.txt"]
    heldout = read(out / "heldout" / "shard-00000.txt")
    train = [line for f in train_files for line in read(out / "train" / f)]
    assert len(heldout) == 10 and len(train) == 90
    assert sorted(train + heldout) == sorted(lines)  # every sentence once, nothing else
    assert train != sorted(train, key=lines.index)  # shuffled
    # The vocabulary comes from the training split only.
    vocab = set(read(out / "vocab.txt"))
    assert all(f"s{k}" not in vocab for k in range(100) if any(f"s{k}" in h.split() for h in heldout))
    assert summary["train_tokens"] == count_tokens(summary["train_pattern"])
    assert (summary["train_sentences"], summary["heldout_sentences"]) == (90, 10)
    assert summary["heldout_tokens"] == count_tokens(summary["heldout_pattern"])
    # The shards feed the data stream.
    data = LMDataset(summary["heldout_pattern"], summary["vocab_file"], 4, 5, test=True)
    assert sum(b["weights"].sum() for b in data.iter_batches()) == summary["heldout_tokens"] + 10


def test_deterministic_with_seed_and_gz_input(corpus, tmp_path):
    path, _ = corpus
    prep.prepare([path], str(tmp_path / "one"), CorpusSettings(heldout_fraction=0.2, shard_lines=30, seed=5))
    prep.prepare([path], str(tmp_path / "two"), CorpusSettings(heldout_fraction=0.2, shard_lines=30, seed=5))
    prep.prepare([path], str(tmp_path / "other"), CorpusSettings(heldout_fraction=0.2, shard_lines=30, seed=6))
    assert tree(tmp_path / "one") == tree(tmp_path / "two")
    assert tree(tmp_path / "one") != tree(tmp_path / "other")
    with open(path, "rb") as f, gzip.open(tmp_path / "corpus.txt.gz", "wb") as g:
        g.write(f.read())
    prep.prepare([str(tmp_path / "*.gz")], str(tmp_path / "gz"),
                 CorpusSettings(heldout_fraction=0.2, shard_lines=30, seed=5))
    assert tree(tmp_path / "gz") == tree(tmp_path / "one")


def test_several_inputs_lowercase_and_tokenize(tmp_path):
    (tmp_path / "a.txt").write_text("In the beginning, God's (first) day.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("It cost 3.14 dollars -- non-linear!\n", encoding="utf-8")
    out = tmp_path / "out"
    prep.prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], str(out),
                 CorpusSettings(heldout_fraction=0, lowercase=True, split_punctuation=True))
    assert sorted(read(out / "train" / "shard-00000.txt")) == [
        "in the beginning , god's ( first ) day .",
        "it cost 3.14 dollars - - non-linear !",
    ]
    assert prep.tokenize("हिन्दी, “quoted”") == ["हिन्दी", ",", "“", "quoted", "”"]  # combining marks stay in words


def test_not_utf8_names_file_and_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good line\nbad \xff line\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 2: not valid UTF-8"):
        prep.prepare([str(bad)], str(tmp_path / "out"))
    with gzip.open(tmp_path / "bad.gz", "wb") as g:
        g.write(b"one\ntwo\n\xc3(\n")
    with pytest.raises(ValueError, match=r"bad.gz, line 3: not valid UTF-8"):
        prep.prepare([str(tmp_path / "bad.gz")], str(tmp_path / "out"))
    (tmp_path / "fake.gz").write_bytes(b"plain text\n")
    with pytest.raises(ValueError, match=r"fake.gz: not a readable gzip file"):
        prep.prepare([str(tmp_path / "fake.gz")], str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="missing"):
        prep.prepare([str(tmp_path / "missing*.txt")], str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["bad.gz", "bad.txt", "fake.gz"]  # no output, no temporary


def test_output_directory_rules(corpus, tmp_path):
    path, _ = corpus
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    prep.prepare([path], str(out), CorpusSettings(seed=1))
    first = tree(out)
    with pytest.raises(ValueError, match="not empty"):
        prep.prepare([path], str(out), CorpusSettings(seed=2))
    assert tree(out) == first
    prep.prepare([path], str(out), CorpusSettings(seed=2), overwrite=True)
    assert tree(out) != first
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt", "out"]


@pytest.mark.slow
def test_command_line(corpus, tmp_path):
    path, _ = corpus
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "elmojax.prepare", "--input", path, "--input", FIXTURE,
                          "--output", str(out), "--heldout-fraction", "0.05", "--shard-lines", "40",
                          "--min-count", "2", "--seed", "3"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    n = 100 + len([line for line in read(FIXTURE) if line.strip()])
    held = round(n * 0.05)
    assert f"train:   {n - held} sentences" in run.stdout and f"heldout: {held} sentences" in run.stdout
    assert f"--config.data.train_prefix={out}/train/shard-*.txt" in run.stdout.replace("'", "")
    assert f"--config.train.n_train_tokens={count_tokens(str(out / 'train' / '*.txt'))}" in run.stdout
    assert "--config.data.vocab_file=" in run.stdout and "--config.data.heldout_prefix=" in run.stdout
    assert sorted(os.listdir(out)) == ["heldout", "train", "vocab.txt"]
    assert sorted(os.listdir(out / "train")) == ["shard-00000.txt", "shard-00001.txt", "shard-00002.txt"]

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xfe\n")
    run = subprocess.run([sys.executable, "-m", "elmojax.prepare", "--input", str(bad), "--output",
                          str(tmp_path / "never")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "bad.txt, line 1: not valid UTF-8" in run.stderr and "Traceback" not in run.stderr
    assert not os.path.exists(tmp_path / "never")


@pytest.mark.slow  # the notes come once a process: this one has given them
def test_byte_order_mark_and_crlf_read_as_plain_text(corpus, tmp_path):
    """A corpus with a UTF-8 byte-order mark and Windows line ends (plain or .gz) prepares as its plain twin."""
    path, _ = corpus
    with open(path, "rb") as f:
        plain = f.read()
    dos = b"\xef\xbb\xbf" + plain.replace(b"\n", b"\r\n")
    (tmp_path / "dos.txt").write_bytes(dos)
    with gzip.open(tmp_path / "dos.txt.gz", "wb") as g:
        g.write(dos)
    prep.prepare([path], str(tmp_path / "plain"), CorpusSettings(heldout_fraction=0.2, shard_lines=30))
    for name in ("dos.txt", "dos.txt.gz"):
        prep.prepare([str(tmp_path / name)], str(tmp_path / f"out-{name}"),
                     CorpusSettings(heldout_fraction=0.2, shard_lines=30))
        assert tree(tmp_path / f"out-{name}") == tree(tmp_path / "plain")

    run = subprocess.run([sys.executable, "-m", "elmojax.prepare", "--input", str(tmp_path / "dos.txt"), "--input",
                          str(tmp_path / "dos.txt.gz"), "--output", str(tmp_path / "cli")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines() == [
        f"note: {tmp_path / name}: {what}" for name in ("dos.txt", "dos.txt.gz")
        for what in ("starts with a UTF-8 byte-order mark; ignored", "Windows line ends (CRLF); read as plain line ends")]


# The command line with its shard writing held up once shards are written (or a kill -9 after the
# existing output was moved aside), to be stopped there.
SLOW_PREPARE = """
import os, signal, sys, time
import elmojax.data.corpus as c
import elmojax.prepare as p
how = sys.argv[1]
if how == "hold":
    write = c._write_shards
    def held(*args):
        n = write(*args)
        print("writing", flush=True)
        time.sleep(60)
        return n
    c._write_shards = held
else:  # killed between moving the old output aside and renaming the new one into place
    rename = os.rename
    def rename_and_die(a, b):
        rename(a, b)
        os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename_and_die
p.main(sys.argv[2:])
"""


def slow_prepare(how, *args):
    return subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, how, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_leaves_the_output_as_it_was(corpus, tmp_path, sig):
    path, _ = corpus
    out = tmp_path / "out"
    prep.prepare([path], str(out), CorpusSettings(seed=1))
    first = tree(out)
    run = slow_prepare("hold", "--input", path, "--output", str(out), "--overwrite", "--seed", "2")
    line = run.stdout.readline()
    assert line == "writing\n", run.stderr.read() if run.poll() is not None else line
    assert len(os.listdir(tmp_path)) == 3  # corpus, out and the temporary directory being written
    run.send_signal(sig)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 128 + sig  # as a shell reports a process a signal ended
    assert stderr == f"python -m elmojax.prepare: stopped by {sig.name}; nothing was written\n"
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt", "out"] and tree(out) == first


@pytest.mark.slow
def test_a_kill_while_replacing_the_output_is_undone_by_the_next_run(corpus, tmp_path):
    path, _ = corpus
    out = tmp_path / "out"
    prep.prepare([path], str(out), CorpusSettings(seed=1))
    first = tree(out)
    run = slow_prepare("kill", "--input", path, "--output", str(out), "--overwrite", "--seed", "2")
    run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL
    left = sorted(os.listdir(tmp_path))
    assert "out" not in left and len(left) == 3  # the old output set aside, the new one beside it
    with pytest.raises(ValueError, match="not empty"):  # the earlier output is back, and kept
        prep.prepare([path], str(out), CorpusSettings(seed=3))
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt", "out"] and tree(out) == first
