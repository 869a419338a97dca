"""The data stream: bilm-tf's windows written out by hand, evaluation ends, exact resume."""

import json
import glob
import os

import numpy as np
import pytest

from elmojax.data import BidirectionalLMDataset, LMDataset, count_tokens, list_shards
from elmojax.formats.vocab import UnicodeCharsVocabulary, Vocabulary

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "train")
BOW, EOW, PAD, BOS_CHAR, EOS_CHAR = 258, 259, 260, 256, 257

# ids: <S>=0 </S>=1 <UNK>=2 the=3 cat=4 sat=5 dog=6 ran=7
VOCAB = ["<S>", "</S>", "<UNK>", "the", "cat", "sat", "dog", "ran"]
SENTENCES = ["the cat sat", "dog ran", "the zebra", "cat"]


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture
def small(tmp_path):
    vocab = write(tmp_path / "vocab.txt", VOCAB)
    write(tmp_path / "data" / "shard-0.txt", SENTENCES)
    return str(tmp_path / "data" / "shard-*.txt"), vocab


def take(dataset, n):
    it = dataset.iter_batches()
    return [next(it) for _ in range(n)]


def spell(word, width):
    row = [BOW] + list(word.encode("utf-8"))[: width - 2] + [EOW]
    return np.array(row + [PAD] * (width - len(row))) + 1


def special(char, width):
    return np.array([BOW, char, EOW] + [PAD] * (width - 3)) + 1


def test_forward_windows_by_hand(small):
    pattern, vocab = small
    batches = list(LMDataset(pattern, vocab, batch_size=2, unroll_steps=3, test=True).iter_batches())
    # row 0: "the cat sat" (4 pairs) is cut after 3 and goes on in row 0 of batch 2, then "the zebra";
    # row 1: "dog ran" (3 pairs), then "cat" (2 pairs), then the stream is empty: padding.
    # Inputs are ids + 1; targets plain ids; zebra is <UNK> (2).
    expected_inputs = [
        [[1, 4, 5], [1, 7, 8]],
        [[6, 1, 4], [1, 5, 0]],
        [[3, 0, 0], [0, 0, 0]],
    ]
    expected_targets = [
        [[3, 4, 5], [6, 7, 1]],
        [[1, 3, 2], [4, 1, 0]],
        [[1, 0, 0], [0, 0, 0]],
    ]
    expected_weights = [
        [[1, 1, 1], [1, 1, 1]],
        [[1, 1, 1], [1, 1, 0]],
        [[1, 0, 0], [0, 0, 0]],
    ]
    assert len(batches) == 3
    for batch, inputs, targets, weights in zip(batches, expected_inputs, expected_targets, expected_weights):
        assert set(batch) == {"token_ids", "next_token_id", "weights"}
        assert batch["token_ids"].dtype == np.int32 and batch["next_token_id"].dtype == np.int32
        assert batch["weights"].dtype == np.float32
        np.testing.assert_array_equal(batch["token_ids"], inputs)
        np.testing.assert_array_equal(batch["next_token_id"], targets)
        np.testing.assert_array_equal(batch["weights"], weights)


def test_char_ids_spell_unknown_words(small):
    pattern, vocab_file = small
    width = 8
    vocab = UnicodeCharsVocabulary(vocab_file, width, validate_file=True)
    batches = list(LMDataset(pattern, vocab, 2, 3, test=True).iter_batches())
    chars = [b["char_ids"] for b in batches]
    assert chars[0].shape == (2, 3, width) and chars[0].dtype == np.int32
    np.testing.assert_array_equal(chars[0][0], [special(BOS_CHAR, width), spell("the", width), spell("cat", width)])
    np.testing.assert_array_equal(chars[1][0], [spell("sat", width), special(BOS_CHAR, width), spell("the", width)])
    # "zebra" is <UNK> as a token (input id 2 + 1, and the target before it is 2) but spelled out.
    assert batches[1]["next_token_id"][0, 2] == 2
    assert batches[2]["token_ids"][0, 0] == 3
    np.testing.assert_array_equal(chars[2][0, 0], spell("zebra", width))
    np.testing.assert_array_equal(chars[2][0, 1:], 0)
    np.testing.assert_array_equal(chars[1][1, 2], 0)  # padding
    # Same numbers from a vocabulary path with max_characters_per_token.
    again = list(LMDataset(pattern, vocab_file, 2, 3, test=True, max_characters_per_token=width).iter_batches())
    for a, b in zip(batches, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="max_word_length"):
        LMDataset(pattern, vocab, 2, 3, max_characters_per_token=width + 1)


def test_reverse_windows_by_hand(small):
    pattern, vocab_file = small
    width = 8
    vocab = UnicodeCharsVocabulary(vocab_file, width, validate_file=True)
    batches = list(LMDataset(pattern, vocab, 2, 3, reverse=True, test=True).iter_batches())
    # [</S>, sat, cat, the, <S>] and [</S>, ran, dog, <S>], then [</S>, zebra, the, <S>], [</S>, cat, <S>].
    expected_inputs = [
        [[2, 6, 5], [2, 8, 7]],
        [[4, 2, 3], [2, 5, 0]],
        [[4, 0, 0], [0, 0, 0]],
    ]
    expected_targets = [
        [[5, 4, 3], [7, 6, 0]],
        [[0, 2, 3], [4, 0, 0]],
        [[0, 0, 0], [0, 0, 0]],
    ]
    assert len(batches) == 3
    for batch, inputs, targets in zip(batches, expected_inputs, expected_targets):
        np.testing.assert_array_equal(batch["token_ids"], inputs)
        np.testing.assert_array_equal(batch["next_token_id"], targets)
    assert batches[2]["weights"][0].tolist() == [1, 0, 0]
    np.testing.assert_array_equal(batches[0]["char_ids"][0, 0], special(EOS_CHAR, width))
    np.testing.assert_array_equal(batches[1]["char_ids"][0, 2], spell("zebra", width))


def test_bidirectional_keys_and_content(small):
    pattern, vocab_file = small
    data = BidirectionalLMDataset(pattern, vocab_file, 2, 3, test=True, max_characters_per_token=8)
    batches = list(data.iter_batches())
    forward = list(LMDataset(pattern, vocab_file, 2, 3, test=True, max_characters_per_token=8).iter_batches())
    backward = list(LMDataset(pattern, vocab_file, 2, 3, reverse=True, test=True,
                              max_characters_per_token=8).iter_batches())
    assert len(batches) == len(forward) == len(backward) == 3
    keys = ["token_ids", "char_ids", "next_token_id", "weights"]
    assert sorted(batches[0]) == sorted(keys + [k + "_reverse" for k in keys])
    for b, f, r in zip(batches, forward, backward):
        for key in keys:
            np.testing.assert_array_equal(b[key], f[key])
            np.testing.assert_array_equal(b[key + "_reverse"], r[key])


def test_evaluation_counts_every_token_once_on_fixture():
    pattern, vocab = os.path.join(FIXTURES, "data.txt"), os.path.join(FIXTURES, "vocab.txt")
    with open(pattern, encoding="utf-8") as f:
        lengths = [len(line.split()) for line in f if line.strip()]
    expected = sum(n + 1 for n in lengths)
    for batch_size, steps in [(1, 1), (2, 5), (3, 7), (16, 20), (1, 1000)]:
        data = BidirectionalLMDataset(pattern, vocab, batch_size, steps, test=True, max_characters_per_token=50)
        batches = list(data.iter_batches())
        assert sum(b["weights"].sum() for b in batches) == expected
        assert sum(b["weights_reverse"].sum() for b in batches) == expected
        assert batches[-1]["weights"].sum() > 0  # no all-padding batch at the end
        for b in batches:  # padding is exactly where the weights are 0
            pad = b["weights"] == 0
            assert (b["token_ids"][pad] == 0).all() and (b["next_token_id"][pad] == 0).all()
            assert (b["token_ids"][~pad] > 0).all() and (b["char_ids"][pad] == 0).all()
        assert data.next_batch() is None  # stays ended
    assert count_tokens(pattern) == sum(lengths)


@pytest.mark.parametrize("reverse", [False, True])
def test_streams_match_vocabulary_encoding(tmp_path, reverse):
    """One long row holds the sentences back to back: each as encode()[:-1] (+1), unknowns spelled."""
    vocab = UnicodeCharsVocabulary(write(tmp_path / "vocab.txt", VOCAB), 12, validate_file=True)
    with open(os.path.join(FIXTURES, "data.txt"), encoding="utf-8") as f:
        sentences = [line.split() for line in f if line.strip()]
    sentences.append(["the", "<UNK>", "<S>", "cat", "Zürich"])  # literal specials are vocabulary words
    data_file = write(tmp_path / "data.txt", [" ".join(s) for s in sentences])
    total = sum(len(s) + 1 for s in sentences)
    [batch] = list(LMDataset(data_file, vocab, 1, total + 3, reverse=reverse, test=True).iter_batches())
    ordered = [s[::-1] if reverse else s for s in sentences]
    ids = np.concatenate([vocab.encode(s, reverse=reverse, split=False)[:-1] for s in ordered])
    targets = np.concatenate([vocab.encode(s, reverse=reverse, split=False)[1:] for s in ordered])
    chars = np.concatenate([vocab.encode_chars(s, reverse=reverse, split=False)[:-1] for s in ordered])
    np.testing.assert_array_equal(batch["token_ids"][0], np.concatenate([ids + 1, [0, 0, 0]]))
    np.testing.assert_array_equal(batch["next_token_id"][0], np.concatenate([targets, [0, 0, 0]]))
    np.testing.assert_array_equal(batch["char_ids"][0, :total], chars + 1)
    np.testing.assert_array_equal(batch["char_ids"][0, total:], 0)
    assert (ids == vocab.unk).sum() > 10


def test_evaluation_reads_shards_in_sorted_order(tmp_path):
    vocab = write(tmp_path / "vocab.txt", VOCAB)
    write(tmp_path / "d" / "b.txt", ["dog", "", "ran"])  # blank lines are skipped
    write(tmp_path / "d" / "a.txt", ["the", "cat"])
    batches = list(LMDataset(str(tmp_path / "d" / "*.txt"), vocab, 1, 2, test=True).iter_batches())
    assert [int(b["token_ids"][0, 1]) - 1 for b in batches] == [3, 4, 6, 7]
    assert count_tokens(str(tmp_path / "d" / "*.txt")) == 4


def unique_word_corpus(tmp_path, n_shards=2, per_shard=10):
    words = [f"w{i}" for i in range(n_shards * per_shard)]
    vocab = write(tmp_path / "vocab.txt", ["<S>", "</S>", "<UNK>"] + words)
    for s in range(n_shards):
        write(tmp_path / "train" / f"shard-{s}.txt", words[s * per_shard:(s + 1) * per_shard])
    return str(tmp_path / "train" / "shard-*.txt"), vocab, words


def sentence_sequence(batches, key="token_ids"):
    # unroll_steps=2, batch_size=1 and one-word sentences: each batch is [<S>, w] -> the word's id + 1
    return [int(b[key][0, 1]) - 1 - 3 for b in batches]


def test_training_is_infinite_and_reshuffles(tmp_path):
    pattern, vocab, words = unique_word_corpus(tmp_path)
    passes = 5
    data = BidirectionalLMDataset(pattern, vocab, 1, 2, seed=3)
    batches = take(data, 20 * passes)
    forward = sentence_sequence(batches)
    backward = sentence_sequence(batches, "token_ids_reverse")
    orders = [forward[20 * p:20 * (p + 1)] for p in range(passes)]
    for order in orders:
        assert sorted(order) == list(range(20))  # each pass sees every sentence once
        first = {w // 10 for w in order[:10]}
        assert len(first) == 1  # a shard at a time
    assert len({tuple(o) for o in orders}) == passes  # reshuffled each pass
    assert {tuple(sorted(set(o[:10]))) for o in orders} == {tuple(range(10)), tuple(range(10, 20))}
    assert forward != backward  # independent streams
    assert data.forward.counters["passes"] == passes
    assert data.next_batch() is not None  # and it goes on
    # The same seed gives the same stream, another seed another one.
    assert sentence_sequence(take(BidirectionalLMDataset(pattern, vocab, 1, 2, seed=3), 40)) == forward[:40]
    assert sentence_sequence(take(BidirectionalLMDataset(pattern, vocab, 1, 2, seed=4), 40)) != forward[:40]


def long_sentence_corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "dog", "ran", "zebra", "émigré"]
    vocab = write(tmp_path / "vocab.txt", VOCAB)
    for s in range(4):
        lines = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(5 + s)]
        write(tmp_path / "train" / f"shard-{s}.txt", lines)
    return str(tmp_path / "train" / "shard-*.txt"), vocab


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("test", [False, True])
def test_resume_is_exact(tmp_path, test):
    pattern, vocab = long_sentence_corpus(tmp_path)

    def make():
        return BidirectionalLMDataset(pattern, vocab, 3, 4, test=test, seed=7, max_characters_per_token=10)

    def run(data, n):  # n batches, or to the end of an evaluation stream
        return list(data.iter_batches()) if test else take(data, n)

    uninterrupted = make()
    reference = run(uninterrupted, 40)
    total = len(reference)
    assert total >= 18
    rows_from_earlier_shards = 0
    for k in range(total + 1):
        data = make()
        first = take(data, k)
        state = json.loads(json.dumps(data.state_dict()))
        source = state["forward"]["source"]
        if source["shard_position"] >= 0:
            loaded = source["shard_order"][source["shard_position"]]
            rows_from_earlier_shards += sum(row is not None and row[0] != loaded for row in state["forward"]["rows"])
        fresh = make()
        fresh.load_state_dict(state)
        assert fresh.state_dict() == state
        rest = run(fresh, total - k)
        assert_same_batches(first + rest, reference)
        assert fresh.state_dict() == uninterrupted.state_dict()
    assert rows_from_earlier_shards > 0  # rows whose sentence came from a shard no longer loaded


def test_resume_rejects_another_layout(small):
    pattern, vocab = small
    state = LMDataset(pattern, vocab, 2, 3).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        LMDataset(pattern, vocab, 3, 3).load_state_dict(state)
    with pytest.raises(ValueError, match="reverse"):
        LMDataset(pattern, vocab, 2, 3, reverse=True).load_state_dict(state)


def test_errors_name_the_problem(tmp_path, small):
    pattern, vocab = small
    missing = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(FileNotFoundError, match="nothing"):
        LMDataset(missing, vocab, 2, 3)
    with pytest.raises(FileNotFoundError, match="nothing"):
        count_tokens(missing)
    bad = tmp_path / "bad" / "shard.txt"
    bad.parent.mkdir()
    bad.write_bytes(b"the cat\nthe \xff dog\n")
    with pytest.raises(ValueError, match=r"shard.txt, line 2: not valid UTF-8"):
        list(LMDataset(str(bad), vocab, 2, 3, test=True).iter_batches())
    no_unk = write(tmp_path / "no_unk.txt", ["<S>", "</S>", "the"])
    with pytest.raises(ValueError, match=r"shard-0.txt, line 1: .*'cat'"):
        list(LMDataset(pattern, Vocabulary(no_unk), 2, 3, test=True).iter_batches())
    empty = write(tmp_path / "empty" / "e.txt", ["", "  "])
    with pytest.raises(ValueError, match="no sentences"):
        LMDataset(empty, vocab, 2, 3).next_batch()
    assert LMDataset(empty, vocab, 2, 3, test=True).next_batch() is None
    with pytest.raises(ValueError, match="unroll_steps"):
        LMDataset(pattern, vocab, 2, 0)
    assert list_shards(pattern) == [os.path.join(os.path.dirname(pattern), "shard-0.txt")]


# --- the batches against a straightforward construction ----------------------------------------

KJV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "elmojax", "resources", "kjv_sample")


def reference_batches(pattern, vocab, batch_size, steps, reverse, test, seed, n_batches):
    """bilm-tf's _get_batch written out token by token: the same sentence stream (shard order and
    each shard's sentence order drawn from the same generator when needed), vocab.encode and
    vocab.encode_chars for each sentence, rows filled in order, padding at the end of a test stream."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(int(reverse),))))
    shards = list_shards(pattern)
    chars = isinstance(vocab, UnicodeCharsVocabulary)

    def sentences():
        while True:
            order = range(len(shards)) if test else rng.permutation(len(shards))
            for s in order:
                with open(shards[s], "rb") as f:
                    lines = [line for line in f.read().decode("utf-8").split("\n") if line.strip()]
                for i in range(len(lines)) if test else rng.permutation(len(lines)):
                    yield lines[i].split()
            if test:
                return

    stream = sentences()
    rows = [None] * batch_size  # [ids, chars, pairs used]
    batches = []
    while len(batches) < n_batches:
        width = vocab.max_word_length if chars else 0
        tokens = np.zeros((batch_size, steps), np.int32)
        targets = np.zeros((batch_size, steps), np.int32)
        weights = np.zeros((batch_size, steps), np.float32)
        char_ids = np.zeros((batch_size, steps, width), np.int32)
        for i in range(batch_size):
            for j in range(steps):
                if rows[i] is None or rows[i][2] == len(rows[i][0]) - 1:
                    rows[i] = None
                    words = next(stream, None)
                    if words is None:
                        break
                    words = words[::-1] if reverse else words
                    rows[i] = [vocab.encode(words, reverse=reverse, split=False),
                               vocab.encode_chars(words, reverse=reverse, split=False) if chars else None, 0]
                ids, spelled, k = rows[i]
                tokens[i, j], targets[i, j], weights[i, j] = ids[k] + 1, ids[k + 1], 1
                if chars:
                    char_ids[i, j] = spelled[k] + 1
                rows[i][2] += 1
        if weights.sum() == 0:
            break
        batch = {"token_ids": tokens}
        if chars:
            batch["char_ids"] = char_ids
        batch.update(next_token_id=targets, weights=weights)
        batches.append(batch)
    return batches


def assert_identical(batch, expected):
    assert list(batch) == list(expected)
    for key in expected:
        assert batch[key].dtype == expected[key].dtype and batch[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)


def kjv_corpora(tmp_path):
    """The bundled sample as one shard with its vocabulary, and cut into shards of uneven sizes
    (one blank) with a small vocabulary, so that many words are <UNK> and spelled out."""
    with open(os.path.join(KJV, "train", "shard-00000.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    with open(os.path.join(KJV, "vocab.txt"), encoding="utf-8") as f:
        vocab_words = [line.strip() for line in f]
    small = write(tmp_path / "small_vocab.txt", vocab_words[:200])
    cuts = [0, 900, 901, 901, 2000, len(lines)]
    for s in range(len(cuts) - 1):
        write(tmp_path / "kjv" / f"shard-{s}.txt", lines[cuts[s]:cuts[s + 1]] + ["the Zürich <UNK> <S> émigré"])
    # Short sentences in small shards: rows often end a sentence with a window and shards end
    # within a batch.
    rng = np.random.default_rng(5)
    words = vocab_words[3:40] + ["Zürich", "<UNK>", "zzz"]
    for s in range(6):
        write(tmp_path / "short" / f"shard-{s}.txt",
              [" ".join(rng.choice(words, size=rng.integers(1, 4))) for _ in range(rng.integers(0, 8))])
    return [(os.path.join(KJV, "train", "shard-*.txt"), os.path.join(KJV, "vocab.txt")),
            (str(tmp_path / "kjv" / "shard-*.txt"), small),
            (os.path.join(FIXTURES, "data.txt"), os.path.join(FIXTURES, "vocab.txt")),
            (str(tmp_path / "short" / "shard-*.txt"), small)]


@pytest.mark.parametrize("reverse", [False, True])
def test_batches_match_reference_construction(tmp_path, reverse):
    for pattern, vocab_file in kjv_corpora(tmp_path):
        for width, batch_size, steps, test, n in [(50, 8, 10, False, 300), (9, 5, 7, True, 300),
                                                  (None, 3, 13, False, 200), (6, 3, 2, False, 200),
                                                  (6, 2, 3, True, 200)]:
            vocab = (Vocabulary(vocab_file, validate_file=True) if width is None
                     else UnicodeCharsVocabulary(vocab_file, width, validate_file=True))
            data = LMDataset(pattern, vocab, batch_size, steps, reverse=reverse, test=test, seed=11)
            expected = reference_batches(pattern, vocab, batch_size, steps, reverse, test, 11, n)
            batches = take(data, len(expected))
            for batch, want in zip(batches, expected):
                assert_identical(batch, want)
            if len(expected) < n:  # the test stream ended
                assert data.next_batch() is None
            if width == 50 and pattern == str(tmp_path / "kjv" / "shard-*.txt"):
                spelled = sum(((b["token_ids"] == vocab.unk + 1)[..., None]
                               & (b["char_ids"] != vocab.word_char_ids[vocab.unk] + 1)).any(-1).sum() for b in batches)
                assert spelled > 100  # many <UNK> inputs spell their own word


def test_resume_matches_reference_construction(tmp_path):
    """Saved and restored at several points (rows from shards no longer loaded included), the
    bidirectional stream goes on as the reference does."""
    pattern, vocab_file = kjv_corpora(tmp_path)[1]
    vocab = UnicodeCharsVocabulary(vocab_file, 12, validate_file=True)
    n = 260
    forward = reference_batches(pattern, vocab, 16, 20, False, False, 3, n)
    backward = reference_batches(pattern, vocab, 16, 20, True, False, 3, n)
    data = BidirectionalLMDataset(pattern, vocab, 16, 20, seed=3)
    states = {}
    for k in range(n):
        batch = data.next_batch()
        if k % 37 == 0:
            states[k] = json.loads(json.dumps(data.state_dict()))
        assert_identical({key: batch[key] for key in forward[k]}, forward[k])
        assert_identical({key: batch[key + "_reverse"] for key in backward[k]}, backward[k])
    for k, state in states.items():
        fresh = BidirectionalLMDataset(pattern, vocab, 16, 20, seed=3)
        fresh.load_state_dict(state)
        assert fresh.state_dict() == state
        for m, batch in enumerate(take(fresh, 30), start=k + 1):
            if m < n:
                assert_identical({key: batch[key] for key in forward[m]}, forward[m])
                assert_identical({key: batch[key + "_reverse"] for key in backward[m]}, backward[m])


def test_a_vocabulary_not_by_count_is_warned_about(tmp_path):
    from elmojax.data import count_order_warning
    from elmojax.formats.vocab import Vocabulary

    sample = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "elmojax", "resources",
                          "kjv_sample")
    shard = sorted(glob.glob(os.path.join(sample, "train", "*.txt")))[0]
    by_count = os.path.join(sample, "vocab.txt")
    assert count_order_warning(Vocabulary(by_count, validate_file=True), shard) is None
    tokens = open(by_count, encoding="utf-8").read().split()
    alphabetical = tmp_path / "vocab.txt"
    alphabetical.write_text("\n".join(tokens[:3] + sorted(tokens[3:])) + "\n", encoding="utf-8")
    warning = count_order_warning(Vocabulary(str(alphabetical), validate_file=True), shard)
    assert warning.startswith(f"warning: {alphabetical}: its tokens are not in descending order of count")


def test_byte_order_mark_and_crlf_read_as_the_plain_shard(tmp_path, caplog):
    """A shard with a UTF-8 byte-order mark and Windows line ends gives the plain shard's ids,
    sentences and token count, with one note of each per file however often it is read."""
    from elmojax.data.shards import encode_shard, read_sentences

    vocab = UnicodeCharsVocabulary(write(tmp_path / "vocab.txt", VOCAB), 12, validate_file=True)
    plain = write(tmp_path / "plain" / "shard-0.txt", SENTENCES + ["", "  the  cat \t", "Zürich dog"])
    dos = tmp_path / "dos" / "shard-0.txt"
    dos.parent.mkdir()
    with open(plain, "rb") as f:
        dos.write_bytes(b"\xef\xbb\xbf" + f.read().replace(b"\n", b"\r\n"))
    with caplog.at_level("WARNING", logger="elmojax.formats.files"):
        for _ in range(2):  # read again, as every epoch of a larger corpus does
            a, b = encode_shard(plain, vocab, spell=True), encode_shard(str(dos), vocab, spell=True)
            for field in ("words", "starts", "lengths", "line_numbers", "bad", "spelled_at", "spelled_rows",
                          "spelled"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
            assert a.words[0] == VOCAB.index("the")
            assert read_sentences(plain) == read_sentences(str(dos))
            assert count_tokens(plain) == count_tokens(str(dos)) == 12
        batches = [list(LMDataset(path, vocab, 2, 5, test=True).iter_batches()) for path in (plain, str(dos))]
    for x, y in zip(*batches, strict=True):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert caplog.messages == [f"note: {dos}: starts with a UTF-8 byte-order mark; ignored",
                               f"note: {dos}: Windows line ends (CRLF); read as plain line ends"]
