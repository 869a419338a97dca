"""elmojax.Elmo (AllenNLP's Elmo as a Flax module): against a float64 NumPy restatement of
AllenNLP's mix, against AllenNLP itself (tests/fixtures/allennlp_elmo/, recorded by its
make_fixture.py in an AllenNLP environment), its cached-vocabulary path, dropout, and as a
submodule of a tagger trained with optax."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import elmojax
from elmojax.formats.vocab import Batcher
from elmojax.infer.elmo import FROZEN, load_elmo, word_ids
from elmojax.model.bilm import BiLM, zero_state
from conftest import OPTIONS_FILE, ROOT, WEIGHT_FILE

MODEL = os.path.join(ROOT, "tests", "fixtures", "model")
OPTIONS, WEIGHTS = OPTIONS_FILE, WEIGHT_FILE
ALLENNLP = os.path.join(ROOT, "tests", "fixtures", "allennlp_elmo")
SKIP_MODEL = os.path.join(ROOT, "tests", "fixtures", "bilm_tf_checkpoint")  # AllenNLP's record's model
SENTENCES = [["The", "cat", "sat", "on", "the", "mat", "."], ["Bournemouth", "is", "by", "the", "sea"], ["Hi"]]
MIX = (0.3, -0.5, 1.2)


def _ids(sentences=SENTENCES, vocab=os.path.join(MODEL, "vocab_test.txt")):
    return Batcher(vocab, 50).batch_sentences(sentences)


def _allennlp_mix_float64(char_ids, params, do_layer_norm, keep_boundaries, weights=MIX, gamma=1.0):
    """AllenNLP's ScalarMix and remove_sentence_boundaries, restated in float64 NumPy, on the
    biLM's layers over the sequence with <S> and </S>."""
    model = BiLM(elmojax.formats.options.load_options(OPTIONS))
    output, _ = model.apply({"params": params["bilm"]}, jnp.asarray(char_ids), zero_state(model.options, len(char_ids)))
    mask = np.asarray(output.mask)
    emb = np.asarray(output.embedding, np.float64)
    layers = [np.concatenate([emb, emb], -1) * mask[..., None]]
    layers += [np.concatenate([np.asarray(f, np.float64), np.asarray(b, np.float64)], -1)
               for f, b in zip(output.forward, output.backward)]
    w = np.exp(np.asarray(weights, np.float64))
    w /= w.sum()
    if do_layer_norm:
        n = mask.sum() * layers[0].shape[-1]
        normed = []
        for x in layers:
            mean = (x * mask[..., None]).sum() / n
            var = (((x * mask[..., None]) - mean) * mask[..., None]) ** 2
            normed.append((x - mean) / np.sqrt(var.sum() / n + 1e-13))
        layers = normed
    mixed = gamma * sum(wk * x for wk, x in zip(w, layers))
    if keep_boundaries:
        return mixed, mask
    lengths = mask.sum(1) - 2
    out = np.zeros((len(mixed), mixed.shape[1] - 2, mixed.shape[2]))
    for i, n in enumerate(lengths):
        out[i, :n] = mixed[i, 1:n + 1]
    return out, np.arange(out.shape[1])[None, :] < lengths[:, None]


@pytest.mark.parametrize("do_layer_norm", [False, True])
@pytest.mark.parametrize("keep_boundaries", [False, True])
def test_fixed_mixes_are_allennlps_restated_in_numpy(do_layer_norm, keep_boundaries):
    module, variables = load_elmo(OPTIONS, WEIGHTS, 2, do_layer_norm=do_layer_norm,
                                  keep_sentence_boundaries=keep_boundaries, scalar_mix_parameters=MIX)
    assert variables["params"] == {} and set(variables[FROZEN]) == {"bilm"}  # fixed mixes are no params
    ids = _ids()
    out = module.apply(variables, ids)
    want, want_mask = _allennlp_mix_float64(ids, variables[FROZEN], do_layer_norm, keep_boundaries)
    assert len(out["elmo_representations"]) == 2
    np.testing.assert_array_equal(out["mask"], want_mask)
    for representation in out["elmo_representations"]:
        assert representation.shape == want.shape == (3, 7 + 2 * keep_boundaries, 32)
        np.testing.assert_allclose(representation, want, atol=2e-6, rtol=0)


def test_learned_mixes_start_as_allennlps():
    module, variables = load_elmo(OPTIONS, WEIGHTS, 1)
    params = variables["params"]
    np.testing.assert_array_equal(params["scalar_mix_0_weights"], np.zeros(3))
    np.testing.assert_array_equal(params["scalar_mix_0_gamma"], np.ones(1))
    ids = _ids()
    want, _ = _allennlp_mix_float64(ids, variables[FROZEN], False, False, weights=(0.0, 0.0, 0.0))
    np.testing.assert_allclose(module.apply(variables, ids)["elmo_representations"][0], want, atol=2e-6, rtol=0)


def test_equals_allennlp_itself():
    with open(os.path.join(ALLENNLP, "record.json"), encoding="utf-8") as f:
        record = json.load(f)
    arrays = np.load(os.path.join(ALLENNLP, "record.npz"))
    ids = _ids(record["sentences"], os.path.join(SKIP_MODEL, "vocab.txt"))
    for i, sentence in enumerate(record["sentences"]):  # batch_to_ids' ids are Batcher's between <S> and </S>
        np.testing.assert_array_equal(ids[i, 1:len(sentence) + 1], arrays["char_ids"][i, :len(sentence)])
    assert len(record["cases"]) == 5
    for case in record["cases"]:
        module, variables = load_elmo(os.path.join(SKIP_MODEL, "options.json"),
                                      os.path.join(SKIP_MODEL, "dump_weights.hdf5"), 1,
                                      do_layer_norm=case["do_layer_norm"],
                                      keep_sentence_boundaries=case["keep_sentence_boundaries"],
                                      scalar_mix_parameters=case["scalar_mix_parameters"])
        out = module.apply(variables, ids)
        want = arrays[case["name"]]
        np.testing.assert_array_equal(out["mask"], arrays[case["name"] + "/mask"])
        difference = float(np.max(np.abs(np.asarray(out["elmo_representations"][0]) - want)))
        assert difference < 1e-5, (case["name"], difference)
        assert np.abs(want).max() > 0.1


def test_a_cached_vocabulary_gives_the_character_path():
    tokens = ["@@PADDING@@"] + sorted({t for s in SENTENCES for t in s})
    module, variables = load_elmo(OPTIONS, WEIGHTS, 1, vocab_to_cache=tokens, scalar_mix_parameters=MIX,
                                  do_layer_norm=True)
    from_chars = module.apply(variables, _ids())
    from_words = module.apply(variables, word_inputs=word_ids(SENTENCES, tokens))
    np.testing.assert_array_equal(from_words["mask"], from_chars["mask"])
    np.testing.assert_allclose(from_words["elmo_representations"][0], from_chars["elmo_representations"][0],
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="sentence 1: token 'dog' is not in vocab_to_cache"):
        word_ids([["the"], ["the", "dog"]], tokens)


def test_dropout_applies_to_each_representation_when_not_deterministic():
    module, variables = load_elmo(OPTIONS, WEIGHTS, 2, dropout=0.5)
    ids = _ids()
    plain = module.apply(variables, ids)["elmo_representations"][0]
    dropped = module.apply(variables, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    first, second = (np.asarray(x) for x in dropped["elmo_representations"])
    real = np.asarray(dropped["mask"])
    kept = first[real] != 0
    assert 0.35 < kept.mean() < 0.65 and not np.array_equal(first != 0, second != 0)
    np.testing.assert_allclose(first[real][kept], 2.0 * np.asarray(plain)[real][kept], rtol=1e-6)


class Tagger(nn.Module):
    elmo: nn.Module
    n_tags: int

    @nn.compact
    def __call__(self, char_ids, deterministic=True):
        out = self.elmo(char_ids, deterministic=deterministic)
        return nn.Dense(self.n_tags)(out["elmo_representations"][0]), out["mask"]


def _tagger_variables(tagger, ids, elmo_variables):
    """The tagger's variables, the pretrained ELMo's in place of the fresh init's."""
    variables = tagger.init(jax.random.PRNGKey(0), ids)
    for collection, value in elmo_variables.items():
        variables.setdefault(collection, {})["elmo"] = value
    return variables


@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_tagger_trained_with_adamw_trains_the_mixes_and_the_bilm_only_if_asked(requires_grad):
    elmo, elmo_variables = load_elmo(OPTIONS, WEIGHTS, 1, requires_grad=requires_grad, dropout=0.1)
    pretrained = jax.tree.map(np.array, elmo_variables["params" if requires_grad else FROZEN]["bilm"])
    tagger = Tagger(elmo, n_tags=3)
    ids = _ids()
    tags = jnp.asarray(np.random.default_rng(0).integers(0, 3, (3, 7)))
    variables = _tagger_variables(tagger, ids, elmo_variables)
    params, rest = variables["params"], {c: v for c, v in variables.items() if c != "params"}
    tx = optax.adamw(1e-2, weight_decay=0.1)  # weight decay moves every param, gradient or not
    opt_state = tx.init(params)
    size = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))  # noqa: E731
    bilm_size = size(pretrained)
    if requires_grad:
        assert set(rest) == set() and size(params) > bilm_size
    else:  # the biLM is no param: Adam keeps no moments for it
        assert set(params["elmo"]) == {"scalar_mix_0_weights", "scalar_mix_0_gamma"}
        assert size(opt_state) == 2 * size(params) + 1 and size(params) < bilm_size

    @jax.jit
    def step(params, rest, opt_state, key):
        def loss_fn(p):
            logits, mask = tagger.apply({"params": p, **rest}, ids, deterministic=False, rngs={"dropout": key})
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, tags)
            return jnp.sum(losses * mask) / jnp.sum(mask)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = params
    losses = []
    for k in range(20):
        params, opt_state, loss = step(params, rest, opt_state, jax.random.PRNGKey(k))
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert not np.allclose(params["elmo"]["scalar_mix_0_weights"], start["elmo"]["scalar_mix_0_weights"])
    trained = {**rest, "params": params}
    bilm = trained["params" if requires_grad else FROZEN]["elmo"]["bilm"]
    bilm_moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), bilm, pretrained))
    if requires_grad:
        assert sum(bilm_moved) > len(bilm_moved) // 2
    else:  # bit for bit the pretrained weights, and the tagger's ELMo computes what load_elmo's does
        assert not any(bilm_moved)
        jax.tree.map(np.testing.assert_array_equal, bilm, pretrained)
        out = tagger.apply(trained, ids, method=lambda m, i: m.elmo(i))
        alone = elmo.apply({**elmo_variables, "params": params["elmo"]}, ids)
        np.testing.assert_array_equal(out["elmo_representations"][0], alone["elmo_representations"][0])
