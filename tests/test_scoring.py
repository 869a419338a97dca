"""LM scores (elmojax.infer.scoring through BidirectionalLanguageModel.log_probs / perplexity) against
a float64 NumPy computation from the biLM's top layers and the softmax, on the small model
bilm-tf trained for tests/fixtures/bilm_tf_checkpoint/ (exported with its softmax)."""

import os

import h5py
import jax.numpy as jnp
import numpy as np
import pytest

from elmojax import BidirectionalLanguageModel
from elmojax.formats.vocab import Batcher
from elmojax.model.bilm import BiLM, zero_state
from elmojax.train import trained_models
from conftest import ROOT

CHECKPOINT = os.path.join(ROOT, "tests", "fixtures", "bilm_tf_checkpoint")
SENTENCES = [["In", "the", "beginning", "God", "created", "the", "heaven"], ["And", "Zerubbabel", "said"], ["Amen"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return trained_models.export(CHECKPOINT, str(tmp_path_factory.mktemp("export") / "weights.hdf5"))


def _log_softmax64(x, w, b):
    logits = x.astype(np.float64) @ w.astype(np.float64).T + b
    logits -= logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def test_log_probs_are_the_full_softmax_of_the_top_layers(exported):
    bilm = BidirectionalLanguageModel(exported.options, exported.weights, softmax_file=exported.softmax)
    ids = Batcher(exported.vocab, 50).batch_sentences(SENTENCES)
    got = bilm.log_probs(ids)

    output, _ = BiLM(bilm.options).apply({"params": bilm.params}, jnp.asarray(ids), zero_state(bilm.options, 3))
    with h5py.File(exported.softmax, "r") as f:
        w, b = f["softmax/W"][...], f["softmax/b"][...].astype(np.float64)
    vocab = [t.rstrip("\n") for t in open(exported.vocab, encoding="utf-8")]
    row = {t: i for i, t in enumerate(vocab)}
    forward = _log_softmax64(np.asarray(output.forward[-1]), w, b)
    backward = _log_softmax64(np.asarray(output.backward[-1]), w, b)
    assert "Zerubbabel" not in row  # scored as <UNK>
    nll = {"forward": 0.0, "backward": 0.0}
    for i, sentence in enumerate(SENTENCES):
        x = [row["<S>"]] + [row.get(t, row["<UNK>"]) for t in sentence] + [row["</S>"]]
        n = len(sentence)
        want_forward = [forward[i, t, x[t + 1]] for t in range(n + 1)]    # w1..wn, </S>
        want_backward = [backward[i, t, x[t - 1]] for t in range(1, n + 2)]  # <S>, w1..wn
        np.testing.assert_allclose(got["forward"][i, :n], want_forward[:n], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(got["forward_end"][i], want_forward[n], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(got["backward"][i, :n], want_backward[1:], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(got["backward_end"][i], want_backward[0], atol=2e-5, rtol=1e-5)
        assert got["mask"][i].sum() == n
        nll["forward"] -= sum(want_forward)
        nll["backward"] -= sum(want_backward)
    count = sum(len(s) + 1 for s in SENTENCES)
    want_perplexity = np.exp((nll["forward"] + nll["backward"]) / 2 / count)
    np.testing.assert_allclose(bilm.perplexity(SENTENCES), want_perplexity, rtol=1e-5)
    assert 50 < want_perplexity < 300  # a model of the 300 most frequent tokens, 3 steps trained


def test_log_probs_need_the_softmax(exported, tmp_path):
    bilm = BidirectionalLanguageModel(exported.options, exported.weights)  # the export's softmax is beside it
    assert np.isfinite(bilm.log_probs(Batcher(exported.vocab, 50).batch_sentences([["a"]]))["forward"]).all()
    alone = tmp_path / "weights.hdf5"  # with no softmax beside it
    alone.write_bytes(open(exported.weights, "rb").read())
    bilm = BidirectionalLanguageModel(exported.options, str(alone))
    with pytest.raises(ValueError, match="softmax_file"):
        bilm.log_probs(Batcher(exported.vocab, 50).batch_sentences([["a"]]))


@pytest.mark.slow
def test_the_score_command_writes_a_json_line_per_sentence(exported, tmp_path):
    import json
    import subprocess
    import sys
    dataset = tmp_path / "input.txt"
    dataset.write_text("".join(" ".join(s) + "\n" for s in SENTENCES), encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    result = subprocess.run([sys.executable, "-m", "elmojax.dump", "score", str(dataset), str(out), "--options",
                             exported.options, "--weights", exported.weights, "--softmax", exported.softmax],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    bilm = BidirectionalLanguageModel(exported.options, exported.weights, softmax_file=exported.softmax)
    assert [r["line"] for r in records] == [1, 2, 3] and [r["tokens"] for r in records] == SENTENCES
    for record, sentence in zip(records, SENTENCES):
        np.testing.assert_allclose(record["perplexity"], bilm.perplexity([sentence]), rtol=1e-5)
        assert len(record["forward"]) == len(record["backward"]) == len(sentence)
