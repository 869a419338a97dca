"""Whole-dataset and token-vocabulary dumps, as functions and as commands."""

import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import OPTIONS_FILE, VOCAB_FILE, WEIGHT_FILE
from elmojax import Batcher, BidirectionalLanguageModel, dump_bilm_embeddings, hdf5


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


def test_stateful_dump_reproduces_bilm_tf(tmp_path, fixture_sentences):
    """Row 0 of the reference's stateful batches is sentences[0][0..9] with state carried along:
    a stateful line-by-line dump of those lines must give the reference's embeddings."""
    sentences, expected = fixture_sentences
    dataset = _write_lines(tmp_path / "data.txt", sentences[0])
    out = str(tmp_path / "elmo.hdf5")
    dump_bilm_embeddings(VOCAB_FILE, dataset, OPTIONS_FILE, WEIGHT_FILE, out, stateful=True)
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


def test_commands(tmp_path, fixture_sentences):
    sentences, _ = fixture_sentences
    dataset = _write_lines(tmp_path / "data.txt", [sentences[1][2], sentences[2][2]])
    run = lambda *args: subprocess.run([sys.executable, "-m", "elmojax.dump", *args], capture_output=True, text=True)
    common = ["--vocab", VOCAB_FILE, "--options", OPTIONS_FILE, "--weights", WEIGHT_FILE]
    result = run("bilm", *common, "--dataset", dataset, "--out", str(tmp_path / "elmo.hdf5"))
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "elmo.hdf5", "r") as f:
        assert f["1"].shape == (3, len(sentences[2][2]), 32)
    result = run("tokens", *common, "--out", str(tmp_path / "tokens.hdf5"))
    assert result.returncode == 0, result.stderr
    assert hdf5.load_token_embeddings(str(tmp_path / "tokens.hdf5")).shape == (448, 16)
    result = run("bilm", *common, "--dataset", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x.hdf5"))
    assert result.returncode == 1 and "missing.txt" in result.stderr
