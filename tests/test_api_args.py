"""Arguments checked where they enter the public API: each wrong one (out of range, of the
wrong type, a wrong string, a wrong shape) is one TypeError or ValueError naming it, before
anything is loaded or computed; right ones (generators of sentences, numpy integers) give the
same numbers as before. One test per kind of fault, each over several cases."""

import os

import jax
import numpy as np
import pytest

from elmojax import BidirectionalLanguageModel, ScalarMix, weight_layers
from elmojax.formats.options import load_options
from elmojax.formats.vocab import Batcher, TokenBatcher, batch_char_ids
from elmojax.infer.bidirectional_lm import embed_tokens
from elmojax.infer.elmo import Elmo, load_elmo, remove_sentence_boundaries, scalar_mix, word_ids
from elmojax.infer.scoring import perplexity, tokens_of
from conftest import ROOT

MODEL = os.path.join(ROOT, "tests", "fixtures", "model")
OPTIONS, WEIGHTS, VOCAB = (os.path.join(MODEL, name) for name in ("options.json", "lm_weights.hdf5", "vocab_test.txt"))
CHECKPOINT = os.path.join(ROOT, "tests", "fixtures", "bilm_tf_checkpoint")  # a biLM with its softmax
SENTENCES = [["Bournemouth", "were", "on", "roads"], ["World"]]  # tokens of VOCAB
NAN = float("nan")


def raises(kind, *names):
    """pytest.raises(kind) whose message names every one of `names`."""
    class Check:
        def __enter__(self):
            self.context = pytest.raises(kind)
            self.info = self.context.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.context.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message
            for name in names:
                assert name in message, (name, message)
            return handled
    return Check()


@pytest.fixture(scope="module")
def bilm():
    return BidirectionalLanguageModel(OPTIONS, WEIGHTS, max_batch_size=4)


@pytest.fixture(scope="module")
def scorer():
    return BidirectionalLanguageModel(os.path.join(CHECKPOINT, "options.json"), CHECKPOINT, softmax_file=CHECKPOINT)


@pytest.fixture(scope="module")
def elmo():
    return load_elmo(OPTIONS, WEIGHTS, 1, dropout=0.5, vocab_to_cache=["<pad>", "The", "cat"])


@pytest.mark.parametrize("kwargs, kind, name", [
    (dict(dropout=2.0), ValueError, "dropout"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(dropout=NAN), ValueError, "dropout"),
    (dict(dropout="0.5"), TypeError, "dropout"),
    (dict(dropout=True), TypeError, "dropout"),
    (dict(num_output_representations=0), ValueError, "num_output_representations"),
    (dict(num_output_representations=1.5), TypeError, "num_output_representations"),
    (dict(num_output_representations=True), TypeError, "num_output_representations"),
    (dict(requires_grad="False"), TypeError, "requires_grad"),
    (dict(do_layer_norm=1), TypeError, "do_layer_norm"),
    (dict(keep_sentence_boundaries=None), TypeError, "keep_sentence_boundaries"),
    (dict(scalar_mix_parameters=[0.1, 0.2]), ValueError, "scalar_mix_parameters"),
    (dict(scalar_mix_parameters=[0.1, "x", 0.3]), TypeError, "scalar_mix_parameters[1]"),
    (dict(scalar_mix_parameters=[0.1, NAN, 0.3]), ValueError, "scalar_mix_parameters[1]"),
    (dict(scalar_mix_parameters="0.1 0.2 0.3"), TypeError, "scalar_mix_parameters"),
    (dict(vocab_to_cache="the cat"), TypeError, "vocab_to_cache"),
    (dict(vocab_to_cache=["the", 3]), TypeError, "vocab_to_cache[1]"),
    (dict(vocab_to_cache=[]), ValueError, "vocab_to_cache"),
    (dict(options_file=3), TypeError, "options_file"),
    (dict(weight_file=None), TypeError, "weight_file"),
])
def test_load_elmo_and_elmo_refuse_wrong_settings(kwargs, kind, name):
    """load_elmo's arguments, and the same fields of an Elmo made directly."""
    args = dict(options_file=OPTIONS, weight_file=WEIGHTS, num_output_representations=1) | kwargs
    with raises(kind, name):
        load_elmo(**args)
    fields = {k: v for k, v in kwargs.items() if k in ("dropout", "num_output_representations", "requires_grad",
                                                        "do_layer_norm", "keep_sentence_boundaries")}
    if fields:
        with raises(kind, name):
            Elmo(**({"options": load_options(OPTIONS), "num_output_representations": 1} | fields))


@pytest.mark.parametrize("kwargs, kind, name", [
    (dict(max_batch_size=0), ValueError, "max_batch_size"),
    (dict(max_batch_size=2.5), TypeError, "max_batch_size"),
    (dict(max_batch_size="8"), TypeError, "max_batch_size"),
    (dict(max_batch_size=True), TypeError, "max_batch_size"),
    (dict(compute_dtype="float16"), ValueError, "compute_dtype"),
    (dict(compute_dtype=["float32"]), ValueError, "compute_dtype"),
    (dict(devices=[]), ValueError, "devices"),
    (dict(devices=["cpu"]), TypeError, "devices[0]"),
    (dict(devices=jax.local_devices()[0]), TypeError, "devices"),
    (dict(devices=jax.local_devices()[:1] * 2), ValueError, "devices"),
    (dict(stateful="yes"), TypeError, "stateful"),
    (dict(use_character_inputs=0), TypeError, "use_character_inputs"),
    (dict(options_file=3), TypeError, "options_file"),
    (dict(softmax_file=5), TypeError, "softmax_file"),
    (dict(embedding_weight_file=b"x.hdf5"), TypeError, "embedding_weight_file"),
])
def test_the_bilm_refuses_wrong_settings(kwargs, kind, name):
    args = dict(options_file=OPTIONS, weight_file=WEIGHTS) | kwargs
    with raises(kind, name):
        BidirectionalLanguageModel(**args)


def test_embed_tokens_refuses_a_wrong_batch_size():
    for batch_size, kind in [(0, ValueError), (2.0, TypeError), (None, TypeError)]:
        with raises(kind, "batch_size"):
            embed_tokens({}, load_options(OPTIONS), np.zeros((3, 50), np.int32), batch_size)


LM = np.ones((2, 3, 4, 8), np.float32)
MASK = np.ones((2, 4), bool)


@pytest.mark.parametrize("args, kwargs, kind, names", [
    ((LM, MASK[:, :3], np.zeros(3), 1.0), {}, ValueError, ["mask", "(2, 3)", "(2, 3, 4, 8)"]),  # shorter
    ((LM, MASK[:1], np.zeros(3), 1.0), {}, ValueError, ["mask", "(1, 4)"]),                      # another batch
    ((LM, MASK, np.zeros(4), 1.0), {}, ValueError, ["weights", "(4,)"]),
    ((LM, MASK, np.zeros((3, 1)), 1.0), {}, ValueError, ["weights", "(3, 1)"]),
    ((LM, MASK, None, 1.0), {}, ValueError, ["weights"]),
    ((LM, MASK, np.zeros(3), [1.0, 2.0]), {}, ValueError, ["gamma", "(2,)"]),
    ((LM[0], MASK, np.zeros(3), 1.0), {}, ValueError, ["lm_embeddings", "(3, 4, 8)"]),
    ((LM.astype(np.int32), MASK, np.zeros(3), 1.0), {}, TypeError, ["lm_embeddings", "int32"]),
    ((LM, MASK * 2, np.zeros(3), 1.0), {}, ValueError, ["mask", "0s and 1s"]),
    ((LM, MASK.astype("U1"), np.zeros(3), 1.0), {}, TypeError, ["mask"]),
    ((LM, MASK, np.zeros(3), 1.0), dict(l2_coef=-0.1), ValueError, ["l2_coef"]),
    ((LM, MASK, np.zeros(3), 1.0), dict(l2_coef="0.1"), TypeError, ["l2_coef"]),
    ((LM, MASK, np.zeros(3), 1.0), dict(use_top_only="yes"), TypeError, ["use_top_only"]),
    ((LM, MASK, np.zeros(3), 1.0), dict(do_layer_norm=None), TypeError, ["do_layer_norm"]),
    (([[1.0, [2.0]]], MASK, np.zeros(3), 1.0), {}, TypeError, ["lm_embeddings"]),
])
def test_the_scalar_mixes_check_shapes_at_the_entry(args, kwargs, kind, names):
    """weight_layers, ScalarMix and AllenNLP's scalar_mix: arguments of the wrong shape, kind
    or value named with their shapes, not a broadcasting error from inside jnp."""
    with raises(kind, *names):
        weight_layers(*args, **kwargs)
    lm, mask, weights, gamma = args
    if not kwargs and weights is not None and np.shape(weights) == (3,) and np.size(gamma) == 1:
        with raises(kind, *names):
            ScalarMix(3).init(jax.random.PRNGKey(0), lm, mask)
    if not kwargs and isinstance(lm, np.ndarray) and lm.ndim == 4 and weights is not None and "lm_embeddings" not in names:
        with raises(kind, *[n for n in names if n != "(2, 3, 4, 8)"]):
            scalar_mix(list(np.moveaxis(lm, 1, 0)), mask, weights, gamma)


def test_scalar_mix_modules_refuse_wrong_settings():
    for kwargs, kind, name in [(dict(n_layers=0), ValueError, "n_layers"), (dict(n_layers=3.0), TypeError, "n_layers"),
                               (dict(n_layers=3, l2_coef=NAN), ValueError, "l2_coef"),
                               (dict(n_layers=3, do_layer_norm="no"), TypeError, "do_layer_norm")]:
        with raises(kind, name):
            ScalarMix(**kwargs)
    with raises(ValueError, "n_layers=4", "(2, 3, 4, 8)"):
        ScalarMix(4).init(jax.random.PRNGKey(0), LM, MASK)
    with raises(ValueError, "x", "mask"):
        remove_sentence_boundaries(np.zeros((2, 5, 3)), MASK)
    # right ones: the same numbers as before the checks (a float 0/1 mask, a (1,) gamma)
    expected, _ = weight_layers(LM * np.arange(3, dtype=np.float32)[None, :, None, None], MASK, np.array([0.1, 0.2, 0.3]), 2.0)
    got, _ = weight_layers(LM * np.arange(3, dtype=np.float32)[None, :, None, None], MASK.astype(np.float32), [0.1, 0.2, 0.3], [2.0])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(expected, 2.0 * np.sum(np.exp([0.1, 0.2, 0.3]) / np.exp([0.1, 0.2, 0.3]).sum()
                                                      * np.arange(3)), rtol=1e-6)


def _char_ids(sentences=SENTENCES):
    return Batcher(VOCAB, 50).batch_sentences(sentences)


IDS = _char_ids()


@pytest.mark.parametrize("ids, kind, names", [
    (IDS[:, :, 0], ValueError, ["(batch, time, 50)", "(2, 6)"]),          # rank 2
    (IDS[:, :, :49], ValueError, ["(batch, time, 50)", "(2, 6, 49)"]),    # width
    (IDS.astype(np.float32), TypeError, ["float32"]),
    (IDS - 1, ValueError, ["[-1,"]),
    (np.where(IDS == 0, 262, IDS), ValueError, ["262"]),
    (IDS[:, :1], ValueError, ["time >= 2"]),
    ([[[1, 2]], [[1]]], TypeError, ["integers"]),                        # ragged
])
def test_ids_are_checked_at_the_entry(bilm, elmo, ids, kind, names):
    """BidirectionalLanguageModel's call and Elmo's module call: ids of the wrong rank, width,
    kind or range named, with their shape or range."""
    with raises(kind, "ids", *names):
        bilm(ids)
    module, variables = elmo
    with raises(kind, "char_ids", *names):
        module.apply(variables, ids)


def test_elmo_calls_check_their_other_inputs(elmo):
    module, variables = elmo
    with raises(ValueError, "char_ids", "word_inputs"):
        module.apply(variables, IDS, word_inputs=np.ones((2, 4), np.int32))
    with raises(ValueError, "word_inputs", "[0, 2]"):
        module.apply(variables, word_inputs=np.array([[1, 3]]))
    with raises(TypeError, "word_inputs"):
        module.apply(variables, word_inputs=np.array([[1.0, 2.0]]))
    with raises(TypeError, "deterministic"):
        module.apply(variables, IDS, deterministic="no")
    # right ones under jit (where only shapes are checked): the cached tokens' path gives the
    # char ids' numbers
    chars = jax.jit(lambda v, i: module.apply(v, i)["elmo_representations"][0])
    words = jax.jit(lambda v, w: module.apply(v, word_inputs=w)["elmo_representations"][0])
    np.testing.assert_allclose(words(variables, word_ids([["The", "cat"]], ["<pad>", "The", "cat"]))[0],
                               chars(variables, _char_ids([["The", "cat"]]))[0], atol=1e-5)


def _batchers():
    char = Batcher(VOCAB, 50)
    token = TokenBatcher(VOCAB)
    return [("Batcher", char.batch_sentences), ("TokenBatcher", token.batch_sentences),
            ("batch_char_ids", lambda s: batch_char_ids(s, 50)),
            ("word_ids", lambda s: word_ids(s, ["<pad>", "Bournemouth", "were", "on", "roads", "World"]))]


@pytest.mark.parametrize("sentences, kind, names", [
    ("Bournemouth were on", TypeError, ["sentences", "str"]),
    (["Bournemouth were on"], TypeError, ["sentences[0]", "list of tokens"]),
    ([["Bournemouth", "were"], ["on", 3]], TypeError, ["sentences[1][1]", "int"]),
    ([["Bournemouth", b"were"]], TypeError, ["sentences[0][1]", "bytes"]),
    ([["World"], None], TypeError, ["sentences[1]", "NoneType"]),
    (5, TypeError, ["sentences", "int"]),
    (None, TypeError, ["sentences"]),
    ([], ValueError, ["at least one sentence"]),
    ((s for s in []), ValueError, ["at least one sentence"]),
])
def test_sentences_are_any_iterable_of_token_lists(bilm, scorer, sentences, kind, names):
    """Batcher, TokenBatcher, batch_char_ids, word_ids, sentence_vectors, sentence_log_probs
    and perplexity: a generator of sentences is taken; a str, a token that is not a str or
    something not iterable is a TypeError naming where it is."""
    for _, batch in _batchers():
        with raises(kind, *names):
            batch(sentences)
    for method in (bilm.sentence_vectors, scorer.sentence_log_probs, scorer.perplexity):
        with raises(kind, *names):
            method(sentences)


def test_generators_and_tuples_give_the_same_numbers(bilm, scorer):
    for name, batch in _batchers():
        np.testing.assert_array_equal(batch(tuple(s) for s in SENTENCES), batch(SENTENCES), err_msg=name)
    np.testing.assert_array_equal(bilm.sentence_vectors(iter(SENTENCES)), bilm.sentence_vectors(SENTENCES))
    np.testing.assert_array_equal(bilm.sentence_vectors(SENTENCES, layers=np.int64(1)),
                                  bilm.sentence_vectors(SENTENCES, layers=1))
    assert scorer.perplexity(s for s in SENTENCES) == scorer.perplexity(SENTENCES)
    scores = scorer.sentence_log_probs(iter(SENTENCES))
    np.testing.assert_array_equal(scores["forward"], scorer.sentence_log_probs(SENTENCES)["forward"])
    assert perplexity(iter([scores])) == perplexity([scores])


@pytest.mark.parametrize("call, kind, names", [
    (lambda b, s: b.sentence_vectors(SENTENCES, layers=3), ValueError, ["layers", "0..2"]),
    (lambda b, s: b.sentence_vectors(SENTENCES, layers=-1), ValueError, ["layers"]),
    (lambda b, s: b.sentence_vectors(SENTENCES, layers=1.0), ValueError, ["layers"]),
    (lambda b, s: b.sentence_vectors(SENTENCES, layers=True), ValueError, ["layers"]),
    (lambda b, s: b.sentence_vectors(SENTENCES, layers="first"), ValueError, ["layers"]),
    (lambda b, s: b.sentence_vectors(SENTENCES, layers=["top"]), ValueError, ["layers"]),
    (lambda b, s: b.sentence_vectors(SENTENCES, pooling="sum"), ValueError, ["pooling"]),
    (lambda b, s: b.sentence_vectors(SENTENCES, pooling=None), ValueError, ["pooling"]),
    (lambda b, s: b.log_probs(IDS), ValueError, ["softmax_file"]),
    (lambda b, s: s.log_probs(IDS[:, :, :49]), ValueError, ["char_ids", "(2, 6, 49)"]),
    (lambda b, s: s.log_probs(IDS.astype(float)), TypeError, ["char_ids"]),
    (lambda b, s: perplexity({"forward": 1}), TypeError, ["scores"]),
    (lambda b, s: perplexity([]), ValueError, ["scores"]),
    (lambda b, s: perplexity([1.0]), TypeError, ["scores[0]"]),
    (lambda b, s: tokens_of(IDS[:, :, 0]), ValueError, ["char_ids"]),
])
def test_methods_refuse_wrong_settings(bilm, scorer, call, kind, names):
    with raises(kind, *names):
        call(bilm, scorer)
