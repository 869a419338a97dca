"""The reference fixture: embeddings bilm-tf produced for a tiny trained biLM."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import OPTIONS_FILE, VOCAB_FILE, WEIGHT_FILE
from elmojax import Batcher, BidirectionalLanguageModel, TokenBatcher, dump_token_embeddings


def _batches(sentences):
    return [[sentences[k][i] for k in range(3)] for i in range(10)]


def test_stateful_batches_match_bilm_tf(fixture_sentences):
    sentences, expected = fixture_sentences
    batcher = Batcher(VOCAB_FILE, 50)
    model = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE, max_batch_size=4, stateful=True)
    for i, batch in enumerate(_batches(sentences)):
        out = model(batcher.batch_sentences(batch))
        assert list(out["lengths"]) == [len(s) for s in batch]
        assert out["lm_embeddings"].shape == (3, 3, max(len(s) for s in batch), 32)
        for k in range(3):
            got = out["lm_embeddings"][k, 2, : len(batch[k])]
            assert np.max(np.abs(got - expected[k][i])) <= 1e-6, (i, k)

    # Batches of 3 never touch row 3 of the state (max_batch_size 4).
    leaves = [np.asarray(x) for x in _state_leaves(model.state)]
    assert len(leaves) == 8  # 2 directions x 2 layers x (c, h)
    for leaf in leaves:
        assert np.all(leaf[3] == 0)
        assert np.any(leaf[2] != 0)
    third_rows = [leaf[2].copy() for leaf in leaves]

    # A batch of 2 updates rows 0 and 1 and leaves row 2 as it was.
    model(np.ones((2, 5, 50), dtype=np.int32))
    after = [np.asarray(x) for x in _state_leaves(model.state)]
    for before_row, leaf, old in zip(third_rows, after, leaves):
        np.testing.assert_array_equal(leaf[2], before_row)
        assert np.any(leaf[:2] != old[:2])

    model.reset_state()
    assert all(np.all(np.asarray(x) == 0) for x in _state_leaves(model.state))


def _state_leaves(state):
    import jax
    return jax.tree.leaves(state)


def test_default_is_deterministic(fixture_sentences):
    """From zero state a sentence's embedding does not depend on what was embedded before,
    on its batch mates or on padding; the stateful model's first batch agrees with it."""
    sentences, _ = fixture_sentences
    batcher = Batcher(VOCAB_FILE, 50)
    model = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE)
    batch = [sentences[k][1] for k in range(3)]
    first = model(batcher.batch_sentences(batch))
    model(batcher.batch_sentences([sentences[0][5], sentences[2][7]]))
    again = model(batcher.batch_sentences(batch))
    np.testing.assert_array_equal(first["lm_embeddings"], again["lm_embeddings"])
    alone = model(batcher.batch_sentences([batch[2]]))
    n = len(batch[2])
    np.testing.assert_allclose(alone["lm_embeddings"][0], first["lm_embeddings"][2, :, :n], atol=1e-6, rtol=0)
    # past the sentence's end everything is zero, and the mask says so
    assert not first["mask"][2, n:].any() and first["mask"][2, :n].all()
    assert np.all(first["lm_embeddings"][2, :, n:] == 0)

    stateful = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE, stateful=True)
    np.testing.assert_array_equal(stateful(batcher.batch_sentences(batch))["lm_embeddings"], first["lm_embeddings"])
    assert np.abs(stateful(batcher.batch_sentences(batch))["lm_embeddings"] - first["lm_embeddings"]).max() > 1e-4


def test_large_batches_are_split(fixture_sentences):
    sentences, _ = fixture_sentences
    batch = [s for row in sentences for s in row][:7]
    ids = Batcher(VOCAB_FILE, 50).batch_sentences(batch)
    whole = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE)(ids)
    split = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE, max_batch_size=3)(ids)
    for key in whole:
        np.testing.assert_allclose(split[key], whole[key], atol=1e-6, rtol=0)


def test_large_models_give_freed_memory_back_after_each_call_and_compile(fixture_sentences, monkeypatch):
    """Models of at least bidirectional_lm.GIVE_BACK_MEMORY_BYTES of weights return malloc's freed memory
    after each chunk they embed (elmojax.process.hostmem), and after compiling each new shape,
    before running it; smaller ones, like this one, keep it. Both give the same values, stateful
    or not."""
    from elmojax.infer import bidirectional_lm

    calls = []
    monkeypatch.setattr(bidirectional_lm.hostmem, "give_back_freed_memory", lambda: calls.append(1) or True)
    sentences, _ = fixture_sentences
    ids = Batcher(VOCAB_FILE, 50).batch_sentences([s for row in sentences for s in row][:7])
    small = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE, max_batch_size=3)
    kept = small(ids)
    assert calls == []
    monkeypatch.setattr(bidirectional_lm, "GIVE_BACK_MEMORY_BYTES", 1)
    large = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE, max_batch_size=3)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: compiles.append(event) if event.endswith("backend_compile_duration") else None)
    given_back = large(ids)
    n_shapes = len(large._compiled_shapes)
    assert len(compiles) == n_shapes  # each compiled ahead, not again by the call that runs it
    assert 1 <= n_shapes <= 3 and len(calls) == 3 + n_shapes  # 7 sentences in chunks of 3
    for key in kept:
        np.testing.assert_array_equal(given_back[key], kept[key])
    again = large(ids)  # the same shapes: nothing compiled
    assert len(large._compiled_shapes) == n_shapes and len(calls) == 3 + n_shapes + 3
    for key in kept:
        np.testing.assert_array_equal(again[key], kept[key])

    large = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE, max_batch_size=3, stateful=True)
    monkeypatch.setattr(bidirectional_lm, "GIVE_BACK_MEMORY_BYTES", 2**62)
    small = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE, max_batch_size=3, stateful=True)
    for _ in range(2):  # the second call starts from the state the first left
        from_large, from_small = large(ids[:3]), small(ids[:3])
        for key in from_small:
            np.testing.assert_array_equal(from_large[key], from_small[key])


def test_weights_reach_the_device_one_at_a_time(monkeypatch):
    """Loading puts each weight on the device before reading the next dataset: transfers left in
    flight keep their host copies alive together (at ELMo's original size, a load peak of 792
    MiB instead of 664, benchmarks/RESULTS.md)."""
    from elmojax.formats import hdf5

    placed, reads = [], []
    read, device_put = hdf5._read, jax.device_put
    # a transfer that takes a while (its value unchanged): one left in flight is seen below
    slow = jax.jit(lambda x: x + 0.0 * jnp.sum(jnp.sin(x.ravel()[0] + jnp.arange(2 * 10**7, dtype=x.dtype))))

    def checked_read(*args):
        reads.append(all(x.is_ready() for x in placed))
        return read(*args)

    def recorded_put(*args, **kwargs):
        placed.append(slow(device_put(*args, **kwargs)))
        return placed[-1]

    monkeypatch.setattr(hdf5, "_read", checked_read)
    monkeypatch.setattr(jax, "device_put", recorded_put)
    model = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE)
    assert len(reads) > 10 and all(reads) and len(placed) >= len(jax.tree.leaves(model.params))


def test_token_inputs_match_character_inputs(fixture_sentences, tmp_path):
    sentences, expected = fixture_sentences
    tokens = sorted({t for row in sentences for s in row for t in s} | {"<S>", "</S>"})
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    embedding_file = str(tmp_path / "token_embeddings.hdf5")
    dump_token_embeddings(str(vocab_file), OPTIONS_FILE, WEIGHT_FILE, embedding_file)

    chars = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE, max_batch_size=4, stateful=True)
    words = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE, use_character_inputs=False,
                                       embedding_weight_file=embedding_file, max_batch_size=4, stateful=True)
    char_batcher, token_batcher = Batcher(VOCAB_FILE, 50), TokenBatcher(str(vocab_file))
    for i, batch in enumerate(_batches(sentences)):
        by_chars = chars(char_batcher.batch_sentences(batch))
        by_tokens = words(token_batcher.batch_sentences(batch))
        np.testing.assert_array_equal(by_tokens["lengths"], by_chars["lengths"])
        np.testing.assert_array_equal(by_tokens["mask"], by_chars["mask"])
        assert np.max(np.abs(by_tokens["lm_embeddings"] - by_chars["lm_embeddings"])) <= 1e-6
        for k in range(3):
            got = by_tokens["lm_embeddings"][k, 2, : len(batch[k])]
            assert np.max(np.abs(got - expected[k][i])) <= 1e-6


def test_bfloat16_compute_stays_near_float32(fixture_sentences):
    """compute_dtype="bfloat16" (a GPU speed option) runs the matrix products in bfloat16:
    results differ from float32 by bfloat16 rounding, no more."""
    sentences, _ = fixture_sentences
    ids = Batcher(VOCAB_FILE, 50).batch_sentences([sentences[k][0] for k in range(3)])
    exact = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE)(ids)["lm_embeddings"]
    model = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE, compute_dtype="bfloat16")
    assert "bf16" in model.embed_fn.lower(model.params, ids, None).as_text()
    rounded = model(ids)["lm_embeddings"]
    scale = np.max(np.abs(exact))
    difference = np.max(np.abs(rounded - exact))
    assert 1e-5 * scale < difference < 0.05 * scale, (difference, scale)


def test_after_warm_up_single_sentences_compile_nothing(fixture_sentences):
    """warm_up compiles every call of one sentence of up to max_length tokens ahead: after it,
    sentences of any such length and any words (which used to pick the char CNN's shapes)
    compile nothing; their layers equal those of one large call, which embeds each distinct
    token once, cut short."""
    from elmojax.infer.bidirectional_lm import FIXED_LAYOUT_TOKENS
    from elmojax.train.loop import compile_count

    sentences, _ = fixture_sentences
    words = [w for group in sentences for s in group for w in s] + ["x" * 40, "antidisestablishmentarianism"]
    rng = np.random.default_rng(4)
    batch = [[words[i] for i in rng.integers(0, len(words), size=rng.integers(1, 31))] for _ in range(40)]
    batcher = Batcher(VOCAB_FILE, 50)
    model = BidirectionalLanguageModel(OPTIONS_FILE, WEIGHT_FILE)
    assert model.warm_up(max_length=30) == 4  # length buckets 8, 16, 24 and 32 (with <S> and </S>)
    together = model(batcher.batch_sentences(batch))
    assert 40 * (30 + 2) > FIXED_LAYOUT_TOKENS  # (so that `together` takes the other layout)
    before = compile_count()
    for k, sentence in enumerate(batch):
        alone = model(batcher.batch_sentences([sentence]))["lm_embeddings"][0]
        np.testing.assert_allclose(alone, together["lm_embeddings"][k, :, : len(sentence)], atol=1e-6)
    assert compile_count() == before
    for bad in ["4", [], [0], [1, 2.5]]:
        with pytest.raises((TypeError, ValueError), match="batch_sizes"):
            model.warm_up(batch_sizes=bad)
    with pytest.raises(ValueError, match="past the fixed layout"):
        model.warm_up(max_length=200, batch_sizes=4)
