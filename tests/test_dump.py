"""Whole-dataset and token-vocabulary dumps, as functions and as commands."""

import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import OPTIONS_FILE, VOCAB_FILE, WEIGHT_FILE, in_process, run_python
from elmojax import Batcher, BidirectionalLanguageModel, dump_bilm_embeddings
from elmojax.formats import hdf5


def _write_lines(path, lines):
    path.write_text("".join(" ".join(tokens) + "\n" for tokens in lines), encoding="utf-8")
    return str(path)


def test_dump_is_deterministic_and_batched(tmp_path, fixture_sentences):
    sentences, _ = fixture_sentences
    lines = [sentences[0][3], [], sentences[1][0], sentences[2][4], sentences[0][3]]
    dataset = _write_lines(tmp_path / "data.txt", lines)
    out = str(tmp_path / "elmo.hdf5")
    dump_bilm_embeddings(VOCAB_FILE, dataset, OPTIONS_FILE, WEIGHT_FILE, out, batch_size=2)
    model = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE)
    batcher = Batcher(VOCAB_FILE, 50)
    with h5py.File(out, "r") as f:
        assert sorted(f.keys(), key=int) == [str(i) for i in range(len(lines))]
        for i, tokens in enumerate(lines):
            assert f[str(i)].shape == (3, len(tokens), 32)
            if tokens:
                alone = model(batcher.batch_sentences([tokens]))["lm_embeddings"][0]
                np.testing.assert_allclose(f[str(i)][...], alone, atol=1e-6, rtol=0)
        # the same sentence twice gives the same embedding: no state carried between lines
        np.testing.assert_array_equal(f["0"][...], f["4"][...])


def test_stateful_dump_reproduces_bilm_tf(tmp_path, monkeypatch, fixture_sentences):
    """Row 0 of the reference's stateful batches is sentences[0][0..9] with state carried along:
    a stateful line-by-line dump of those lines must give the reference's embeddings, also when
    stopped after its second chunk and resumed (from the state that chunk's file keeps)."""
    sentences, expected = fixture_sentences
    dataset = _write_lines(tmp_path / "data.txt", sentences[0])
    out = str(tmp_path / "elmo.hdf5")
    args = (VOCAB_FILE, dataset, OPTIONS_FILE, WEIGHT_FILE, out)
    _interrupted(monkeypatch, 1, dump_bilm_embeddings, *args, stateful=True, chunk_lines=3)
    assert _chunks(out + ".parts") == ["chunk-000000.hdf5", "chunk-000001.hdf5"]
    dump_bilm_embeddings(*args, stateful=True, chunk_lines=3)
    with h5py.File(out, "r") as f:
        for i in range(10):
            assert np.max(np.abs(f[str(i)][2] - expected[0][i])) <= 1e-6


def test_bad_dataset_writes_nothing(tmp_path):
    dataset = tmp_path / "data.txt"
    dataset.write_bytes(b"a fine line\nanother\ncaf\xe9\n")
    out = tmp_path / "elmo.hdf5"
    out.write_bytes(b"previous contents")
    with pytest.raises(ValueError, match=r"data.txt, line 3"):
        dump_bilm_embeddings(VOCAB_FILE, str(dataset), OPTIONS_FILE, WEIGHT_FILE, str(out))
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "elmo.hdf5"]


@pytest.mark.slow
def test_commands(tmp_path, fixture_sentences):
    sentences, _ = fixture_sentences
    dataset = _write_lines(tmp_path / "data.txt", [sentences[1][2], sentences[2][2]])
    run = lambda *args: subprocess.run([sys.executable, "-m", "elmojax.dump", *args], capture_output=True, text=True)
    common = ["--vocab", VOCAB_FILE, "--options", OPTIONS_FILE, "--weights", WEIGHT_FILE]
    result = run("bilm", *common, "--dataset", dataset, "--out", str(tmp_path / "elmo.hdf5"))
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "elmo.hdf5", "r") as f:
        assert f["1"].shape == (3, len(sentences[2][2]), 32)
    result = run("elmo", dataset, str(tmp_path / "allennlp.hdf5"), "--top", "--options", OPTIONS_FILE,
                 "--weights", WEIGHT_FILE, "--forget-sentences")
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "allennlp.hdf5", "r") as f:
        assert sorted(f) == ["0", "1"] and f["1"].shape == (len(sentences[2][2]), 32)
    result = run("tokens", *common, "--out", str(tmp_path / "tokens.hdf5"))
    assert result.returncode == 0, result.stderr
    assert hdf5.load_token_embeddings(str(tmp_path / "tokens.hdf5")).shape == (448, 16)
    result = run("bilm", *common, "--dataset", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x.hdf5"))
    assert result.returncode == 1 and "missing.txt" in result.stderr


def _elmo_dump(tmp_path, lines, output_format, **kwargs):
    from elmojax.infer.dumps import dump_elmo
    dataset = _write_lines(tmp_path / "input.txt", lines)
    out = str(tmp_path / f"{output_format}.hdf5")
    dump_elmo(dataset, out, output_format, OPTIONS_FILE, WEIGHT_FILE, batch_size=2, **kwargs)
    return out


def test_allennlp_elmo_dump_layouts(tmp_path, fixture_sentences):
    """dump elmo --all / --top / --average: AllenNLP's `allennlp elmo` file layout; --top and
    --average are what --all's layers give through NumPy."""
    import json
    sentences, _ = fixture_sentences
    lines = [sentences[0][3], sentences[1][0], sentences[2][4], sentences[0][3]]  # a repeated sentence
    files = {fmt: _elmo_dump(tmp_path, lines, fmt) for fmt in ("all", "top", "average")}
    bilm = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE)
    with h5py.File(files["all"], "r") as a, h5py.File(files["top"], "r") as t, h5py.File(files["average"], "r") as v:
        assert sorted(a) == ["0", "1", "2", "3", "sentence_to_index"]
        index = json.loads(a["sentence_to_index"][0])
        assert index == {" ".join(lines[0]): "3", " ".join(lines[1]): "1", " ".join(lines[2]): "2"}  # the last key
        for i, tokens in enumerate(lines):
            layers = a[str(i)][...]
            assert layers.shape == (3, len(tokens), 32) and layers.dtype == np.float32
            want = bilm(Batcher(VOCAB_FILE, 50).batch_sentences([tokens]))["lm_embeddings"][0]
            np.testing.assert_allclose(layers, want, atol=1e-6, rtol=0)
            np.testing.assert_array_equal(t[str(i)][...], layers[-1])
            np.testing.assert_allclose(v[str(i)][...], np.mean(layers.astype(np.float64), axis=0), atol=1e-7)
    keyed = _elmo_dump(tmp_path, lines[:3], "top", use_sentence_keys=True)
    with h5py.File(keyed, "r") as f:
        assert sorted(f) == sorted(" ".join(t) for t in lines[:3])  # keys are the sentences, no sentence_to_index


def test_allennlp_elmo_dump_refuses_what_it_cannot_key(tmp_path, fixture_sentences):
    from elmojax.infer.dumps import dump_elmo
    sentences, _ = fixture_sentences
    with pytest.raises(ValueError, match=r"input.txt, line 3: the sentence of line 1 again"):
        _elmo_dump(tmp_path, [sentences[0][3], sentences[1][0], sentences[0][3]], "all", use_sentence_keys=True)
    with pytest.raises(ValueError, match=r"input.txt: blank line\(s\) 2; every line is a sentence"):
        _elmo_dump(tmp_path, [sentences[0][3], [], sentences[1][0]], "all")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt: holds no sentences"):
        dump_elmo(str(empty), str(tmp_path / "out.hdf5"), "all", OPTIONS_FILE, WEIGHT_FILE)
    assert not (tmp_path / "out.hdf5").exists() and not (tmp_path / "all.hdf5").exists()


@pytest.mark.slow
def test_sentence_vectors_pool_the_layers_over_real_tokens(tmp_path, fixture_sentences):
    sentences, _ = fixture_sentences
    batch = [sentences[0][3], sentences[1][0], sentences[2][4]]
    bilm = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE, max_batch_size=2)
    lm = [bilm(Batcher(VOCAB_FILE, 50).batch_sentences([s]))["lm_embeddings"][0].astype(np.float64) for s in batch]
    for layers, pooling in [("average", "mean"), ("top", "max"), (0, "mean")]:
        got = bilm.sentence_vectors(batch, layers=layers, pooling=pooling)
        for k, x in enumerate(lm):
            x = x.mean(axis=0) if layers == "average" else x[-1 if layers == "top" else layers]
            want = x.mean(axis=0) if pooling == "mean" else x.max(axis=0)
            np.testing.assert_allclose(got[k], want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="sentence 1 has no tokens"):
        bilm.sentence_vectors([["a"], []])
    with pytest.raises(ValueError, match="layers must be"):
        bilm.sentence_vectors(batch, layers=3)
    dataset = _write_lines(tmp_path / "input.txt", batch)
    result = subprocess.run([sys.executable, "-m", "elmojax.dump", "sentences", dataset, str(tmp_path / "v.hdf5"),
                             "--options", OPTIONS_FILE, "--weights", WEIGHT_FILE, "--layers", "top", "--pooling", "max"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "v.hdf5", "r") as f:
        np.testing.assert_allclose(f["sentence_vectors"][...], bilm.sentence_vectors(batch, "top", "max"), atol=1e-6)
        assert f["sentence_vectors"].attrs["pooling"] == "max"


FOUR_DEVICES = r"""
import json, sys
import jax, numpy as np
from conftest import OPTIONS_FILE, VOCAB_FILE, WEIGHT_FILE
from elmojax import Batcher, BidirectionalLanguageModel, dump_bilm_embeddings
assert jax.local_device_count() == 4
sentences, dataset, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
batcher = Batcher(VOCAB_FILE, 50)
bilm = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE, max_batch_size=3, stateful=True)
assert bilm.n_devices == 4
# batches of 3 and 2 rows (padded to 4), state carried from call to call
calls = [bilm(batcher.batch_sentences(sentences[k:k + 3]))["lm_embeddings"] for k in (0, 3, 6)]
calls.append(bilm(batcher.batch_sentences(sentences[9:11]))["lm_embeddings"])
np.savez(out + ".npz", *calls)
dump_bilm_embeddings(VOCAB_FILE, dataset, OPTIONS_FILE, WEIGHT_FILE, out, batch_size=6)
"""


@pytest.mark.slow
def test_four_devices_equal_one(tmp_path, fixture_sentences):
    """Each batch split over 4 (forced host) devices: stateful calls and a dump give one device's numbers."""
    import json
    import jax
    sentences, _ = fixture_sentences
    lines = [s for row in sentences for s in row][:23]
    dataset = _write_lines(tmp_path / "data.txt", lines)
    out = str(tmp_path / "four.hdf5")
    result = run_python(FOUR_DEVICES, json.dumps(lines), dataset, out, devices=4)
    assert result.returncode == 0, result.stderr[-3000:]
    one = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE, max_batch_size=3, stateful=True,
                                     devices=jax.local_devices()[:1])
    batcher = Batcher(VOCAB_FILE, 50)
    calls = np.load(out + ".npz")
    for k, rows in enumerate([lines[0:3], lines[3:6], lines[6:9], lines[9:11]]):
        want = one(batcher.batch_sentences(rows))["lm_embeddings"]
        np.testing.assert_allclose(calls[f"arr_{k}"], want, atol=1e-6, rtol=0)
    reference = str(tmp_path / "one.hdf5")
    dump_bilm_embeddings(VOCAB_FILE, dataset, OPTIONS_FILE, WEIGHT_FILE, reference, batch_size=6)
    with h5py.File(out, "r") as four, h5py.File(reference, "r") as f:
        assert sorted(four, key=int) == sorted(f, key=int) == [str(i) for i in range(len(lines))]
        for key in f:
            np.testing.assert_allclose(four[key][...], f[key][...], atol=1e-6, rtol=0)


def _bilm_command(dataset, out, *more):
    return [sys.executable, "-m", "elmojax.dump", "bilm", "--vocab", VOCAB_FILE, "--options", OPTIONS_FILE,
            "--weights", WEIGHT_FILE, "--dataset", dataset, "--out", str(out), "--batch-size", "10", "--quiet", *more]


def _chunks(directory):
    return sorted(name for name in os.listdir(directory) if re.fullmatch(r"chunk-\d+\.hdf5", name))


def _assert_same_datasets(path, reference):
    with h5py.File(path, "r") as f, h5py.File(reference, "r") as g:
        assert sorted(f) == sorted(g)
        for key in g:
            assert f[key].dtype == g[key].dtype and f[key].shape == g[key].shape, key
            assert f[key][...].tobytes() == g[key][...].tobytes(), key


@pytest.mark.slow
def test_a_dump_killed_midway_resumes_where_it_stopped(tmp_path):
    """kill -9 once the first chunks are written; the same command again keeps them, computes
    the rest and writes what an uninterrupted run writes, byte for byte."""
    import time
    from conftest import short_lines

    dataset = short_lines(tmp_path / "lines.txt", 300)
    out, work = tmp_path / "killed.hdf5", tmp_path / "killed.hdf5.parts"
    command = _bilm_command(dataset, out, "--chunk-lines", "10")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (work.is_dir() and _chunks(work)):
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        process.kill()
        process.communicate()
    kept = _chunks(work)
    assert 1 <= len(kept) < 30 and not out.exists()
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {len(kept)} of 30 chunks of 10 lines done" in resumed.stderr
    assert not work.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["killed.hdf5", "lines.txt"]
    reference = str(tmp_path / "reference.hdf5")
    dump_bilm_embeddings(VOCAB_FILE, dataset, OPTIONS_FILE, WEIGHT_FILE, reference, batch_size=10, chunk_lines=10)
    _assert_same_datasets(out, reference)
    with h5py.File(out, "r") as f:
        assert sorted(f, key=int) == [str(i) for i in range(300)]


class _Stop(Exception):
    pass


def _interrupted(monkeypatch, after_chunk, dump, *args, **kwargs):
    """Runs a dump that stops (as if killed) once chunk `after_chunk` is written."""
    from elmojax.infer import dump_parts
    write = dump_parts.Work.write

    def stopping(self, k, fill):
        write(self, k, fill)
        if k == after_chunk:
            raise _Stop
    with monkeypatch.context() as m:
        m.setattr(dump_parts.Work, "write", stopping)
        with pytest.raises(_Stop):
            dump(*args, **kwargs)


def test_a_work_directory_left_by_another_command_is_refused(tmp_path, monkeypatch, fixture_sentences):
    from elmojax.infer.dumps import dump_elmo
    sentences, _ = fixture_sentences
    dataset = _write_lines(tmp_path / "data.txt", sentences[1])
    out = str(tmp_path / "out.hdf5")
    _interrupted(monkeypatch, 0, dump_elmo, dataset, out, "top", OPTIONS_FILE, WEIGHT_FILE, chunk_lines=4)
    left = sorted(os.listdir(out + ".parts"))
    with pytest.raises(ValueError, match=r"out.hdf5.parts: left by another dump \(output_format: 'top' then, "
                                         r"'all' now\); rerun that command to finish it, or remove the directory"):
        dump_elmo(dataset, out, "all", OPTIONS_FILE, WEIGHT_FILE, chunk_lines=4)
    with open(dataset, "a", encoding="utf-8") as f:
        f.write("one more line\n")
    with pytest.raises(ValueError, match=r"left by another dump \(input.mtime_ns: \d+ then, \d+ now; "
                                         r"input.size: \d+ then, \d+ now; n_lines: 10 then, 11 now\)"):
        dump_elmo(dataset, out, "top", OPTIONS_FILE, WEIGHT_FILE, chunk_lines=4)
    result = in_process("dump", "elmo", dataset, out, "--top", "--options", OPTIONS_FILE, "--weights", WEIGHT_FILE,
                        "--chunk-lines", "5")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "chunk_lines: 4 then, 5 now" in result.stderr
    assert sorted(os.listdir(out + ".parts")) == left and not os.path.exists(out)  # nothing changed
