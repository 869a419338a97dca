"""Models by name, path or URL (elmojax.formats.remote.model_files): from_pretrained, load_elmo, the
dumps and dump's --model; the softmax found beside a weight file when scoring needs it; and
batch_to_ids, AllenNLP's name, spelling without a vocabulary file. Published models are fetched
from a local server standing in for AllenNLP's (no network)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from elmojax import BidirectionalLanguageModel, Batcher, batch_char_ids, batch_to_ids, load_elmo
from elmojax.formats import remote
from elmojax.infer import dumps
from conftest import FIXTURES, OPTIONS_FILE, VOCAB_FILE, WEIGHT_FILE
from test_remote import Server

CHECKPOINT = os.path.join(FIXTURES, "bilm_tf_checkpoint")
SENTENCES = [["The", "cat", "sat", "on", "the", "mat", "."], ["Bournemouth", "is", "by", "the", "sea"], ["Hi"],
             ["Über", "naïve", "café", "déjà", "vu"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The bilm-tf fixture exported: weights.hdf5 with options.json, weights_softmax.hdf5 and vocab.txt."""
    from elmojax.train import trained_models
    return trained_models.export(CHECKPOINT, str(tmp_path_factory.mktemp("export") / "weights.hdf5"))


@pytest.fixture
def published(exported, tmp_path, monkeypatch):
    """A server holding the export under AllenNLP's published names, as the model "small"."""
    monkeypatch.setenv("ELMOJAX_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "served"
    served.mkdir()
    for name, source in [("elmo_tiny_weights.hdf5", exported.weights), ("elmo_tiny_options.json", exported.options),
                         ("elmo_tiny_softmax_weights.hdf5", exported.softmax), ("vocab.txt", exported.vocab)]:
        shutil.copy(source, served / name)
    server = Server(str(served))
    monkeypatch.setitem(remote.PRETRAINED, "small", f"{server.url}/elmo_tiny")
    yield server
    server.httpd.shutdown()


def spelled(sentences, width=50):
    """AllenNLP's ELMoCharacterMapper, written out again: <bow> UTF-8 bytes (cut to width - 2)
    <eow> padding, each + 1, with <S> and </S> spelled around each sentence, 0 past its end."""
    bow, eow, pad, bos, eos = 258, 259, 260, 256, 257
    out = np.zeros((len(sentences), max(map(len, sentences)) + 2, width), np.int64)
    for row, sentence in enumerate(sentences):
        for t, token in enumerate(["<S>", *sentence, "</S>"]):
            chars = [bos] if token == "<S>" else [eos] if token == "</S>" else list(token.encode("utf-8")[:width - 2])
            codes = [bow, *chars, eow] + [pad] * (width - len(chars) - 2)
            out[row, t] = np.array(codes) + 1
    return out


def test_batch_char_ids_spell_as_batcher_and_batch_to_ids_as_allennlp():
    ids = batch_char_ids(SENTENCES)
    np.testing.assert_array_equal(ids, spelled(SENTENCES))
    np.testing.assert_array_equal(ids, Batcher(VOCAB_FILE, 50).batch_sentences(SENTENCES))
    allennlp = np.load(os.path.join(FIXTURES, "allennlp_elmo", "record.npz"))["char_ids"]  # AllenNLP's, no <S> </S>
    np.testing.assert_array_equal(batch_to_ids(SENTENCES), allennlp)
    for row, sentence in enumerate(SENTENCES):
        np.testing.assert_array_equal(ids[row, 1:len(sentence) + 1], allennlp[row, :len(sentence)])
    assert batch_char_ids([["a" * 60]]).shape == (1, 3, 50) and batch_char_ids([["x"]], 10).shape == (1, 3, 10)


def test_allennlp_batch_to_ids_and_elmo_code_runs_as_it_is():
    """AllenNLP's example, with elmojax's import; load_elmo's module on batch_char_ids the same."""
    from elmojax.allennlp import Elmo, batch_to_ids
    options_file, weight_file = os.path.join(CHECKPOINT, "options.json"), os.path.join(CHECKPOINT, "dump_weights.hdf5")
    elmo = Elmo(options_file, weight_file, 2, dropout=0)
    sentences = [["First", "sentence", "."], ["Another", "."]]
    character_ids = batch_to_ids(sentences)
    embeddings = elmo(character_ids)
    module, variables = load_elmo(options_file, weight_file, 2, dropout=0)
    np.testing.assert_array_equal(module.apply(variables, batch_char_ids(sentences))["elmo_representations"][1],
                                  embeddings["elmo_representations"][1])
    assert len(embeddings["elmo_representations"]) == 2
    assert embeddings["elmo_representations"][0].shape[:2] == (2, 3)
    np.testing.assert_array_equal(embeddings["mask"], [[True, True, True], [True, True, False]])


def test_from_pretrained_by_path_finds_the_options_beside():
    by_path = BidirectionalLanguageModel.from_pretrained(WEIGHT_FILE)
    by_files = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE)
    ids = batch_char_ids([["Hello", "there"]])
    np.testing.assert_array_equal(by_path(ids)["lm_embeddings"], by_files(ids)["lm_embeddings"])
    with pytest.raises(ValueError, match="nope.hdf5: no such weight file, and not a published model"):
        BidirectionalLanguageModel.from_pretrained("nope.hdf5")


def test_the_softmax_beside_is_found_when_scoring_needs_it(exported):
    given = BidirectionalLanguageModel(exported.options, exported.weights, softmax_file=exported.softmax)
    for model in (BidirectionalLanguageModel.from_pretrained(exported.weights),
                  BidirectionalLanguageModel(exported.options, exported.weights)):
        assert model._scoring is None  # not read until scoring asks for it
        assert model.perplexity(SENTENCES) == given.perplexity(SENTENCES)
    assert remote.names_beside("x/elmo.hdf5") == (["options.json"], ["elmo_softmax.hdf5"])
    with pytest.raises(ValueError, match=r"log_probs needs the softmax: there is no lm_weights_softmax.hdf5 or "
                                         r"lm_softmax_weights.hdf5 beside .*lm_weights.hdf5"):
        BidirectionalLanguageModel.from_pretrained(WEIGHT_FILE).perplexity(SENTENCES)


def test_from_pretrained_by_name_downloads_the_published_files(exported, published):
    model = BidirectionalLanguageModel.from_pretrained("small")
    local = BidirectionalLanguageModel(exported.options, exported.weights, softmax_file=exported.softmax)
    ids = batch_char_ids(SENTENCES)
    np.testing.assert_array_equal(model(ids)["lm_embeddings"], local(ids)["lm_embeddings"])
    fetched = lambda: [path for path, _ in published.requests]
    assert fetched() == ["/elmo_tiny_options.json", "/elmo_tiny_weights.hdf5"]  # the softmax only when needed
    assert model.perplexity(SENTENCES) == local.perplexity(SENTENCES)
    assert fetched()[2:] == ["/elmo_tiny_weights_softmax.hdf5",  # an export's name first: 404, passed over
                             "/elmo_tiny_softmax_weights.hdf5", "/vocab.txt"]
    again = BidirectionalLanguageModel.from_pretrained("small")  # from the cache
    assert len(fetched()) == 5
    np.testing.assert_array_equal(again(ids)["lm_embeddings"], local(ids)["lm_embeddings"])


def test_from_pretrained_by_url(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("ELMOJAX_CACHE", str(tmp_path / "cache"))
    server = Server(os.path.dirname(exported.weights))
    try:
        model = BidirectionalLanguageModel.from_pretrained(f"{server.url}/weights.hdf5")
        assert model.perplexity(SENTENCES) == BidirectionalLanguageModel(
            exported.options, exported.weights, softmax_file=exported.softmax).perplexity(SENTENCES)
        files = remote.model_files(f"{server.url}/weights.hdf5", need_softmax=True)
    finally:
        server.httpd.shutdown()
    assert files.options.startswith(str(tmp_path / "cache")) and files.softmax.endswith("weights_softmax.hdf5")


def test_a_published_name_not_published_is_one_line():
    with pytest.raises(ValueError, match=r"^large: no such weight file, and not a published model \(small, medium, "
                                         r"original, original_5.5B, pubmed\) nor an http\(s\) URL$"):
        remote.model_files("large")


def test_load_elmo_by_name_path_and_files(exported, published):
    by_files = load_elmo(exported.options, exported.weights, 1)
    for model in ("small", exported.weights):
        module, variables = load_elmo(model)
        assert module == by_files[0]
        jax.tree.map(np.testing.assert_array_equal, variables, by_files[1])
    module, variables = load_elmo(None, "small", 2, do_layer_norm=True)
    assert module.num_output_representations == 2 and module.do_layer_norm


def test_dumps_and_the_dump_command_take_a_model(exported, published, tmp_path):
    from elmojax.dump import main
    (tmp_path / "in.txt").write_text("The cat sat .\nHi\n", encoding="utf-8")
    dumps.dump_scores(str(tmp_path / "in.txt"), str(tmp_path / "given.jsonl"), exported.options, exported.weights,
                      exported.softmax, 4)
    dumps.dump_scores(str(tmp_path / "in.txt"), str(tmp_path / "named.jsonl"), None, "small")
    assert main(["score", str(tmp_path / "in.txt"), str(tmp_path / "cli.jsonl"), "--model", exported.weights]) == 0
    given = [json.loads(line) for line in open(tmp_path / "given.jsonl")]
    for name in ("named.jsonl", "cli.jsonl"):
        assert [json.loads(line) for line in open(tmp_path / name)] == given
    dumps.dump_sentence_vectors(str(tmp_path / "in.txt"), str(tmp_path / "v.hdf5"), None, f"{published.url}/"
                                f"elmo_tiny_weights.hdf5")
    assert os.path.isfile(tmp_path / "v.hdf5")


def test_evaluate_and_export_take_a_published_name(exported, published, tmp_path):
    """--mode=evaluate|export --model=small: the name is the published weights, with their files."""
    from elmojax.train import trained_models
    trained = trained_models.load_trained("small", need_vocab=True)
    local = trained_models.load_trained(exported.weights)
    np.testing.assert_array_equal(trained.params["softmax"]["W"], local.params["softmax"]["W"])
    assert trained.vocab == local.vocab
    written = trained_models.export("small", str(tmp_path / "again.hdf5"))
    assert os.path.exists(written.weights) and os.path.exists(written.softmax)
