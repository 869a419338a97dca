"""Vocabularies and batchers: bilm-tf's id layout, written out by hand here."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from elmojax import Batcher, TokenBatcher, UnicodeCharsVocabulary, Vocabulary

BOS, EOS, BOW, EOW, PAD = 256, 257, 258, 259, 260


def spell(byte_values, width):
    """[bow, bytes..., eow, pad...] + 1, the expected Batcher row of one token."""
    row = [BOW] + list(byte_values) + [EOW]
    return np.array(row + [PAD] * (width - len(row))) + 1


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("<S>\n</S>\n<UNK>\nthe\ncafé\n!!!MAXTERMID\ndog\n", encoding="utf-8")
    return str(path)


def test_vocabulary_ids(vocab_file):
    vocab = Vocabulary(vocab_file, validate_file=True)
    assert (vocab.bos, vocab.eos, vocab.unk, vocab.size) == (0, 1, 2, 6)
    assert vocab.word_to_id("dog") == 5  # the !!!MAXTERMID line takes no id
    assert vocab.word_to_id("cat") == 2
    np.testing.assert_array_equal(vocab.encode("the dog cat"), [0, 3, 5, 2, 1])
    np.testing.assert_array_equal(vocab.encode("the dog", reverse=True), [1, 3, 5, 0])
    assert vocab.decode([3, 5]) == "the dog"


def test_batcher_layout(vocab_file):
    width = 8
    ids = Batcher(vocab_file, width).batch_sentences([["the", "café"], ["xyz123456789"], []])
    assert ids.shape == (3, 4, width) and ids.dtype == np.int64
    bos = np.array([BOW, BOS, EOW] + [PAD] * 5) + 1
    eos = np.array([BOW, EOS, EOW] + [PAD] * 5) + 1
    np.testing.assert_array_equal(ids[0, 0], bos)
    np.testing.assert_array_equal(ids[0, 1], spell(b"the", width))
    np.testing.assert_array_equal(ids[0, 2], spell("café".encode("utf-8"), width))  # 5 bytes
    np.testing.assert_array_equal(ids[0, 3], eos)
    # a token outside the vocabulary is spelled too; long tokens keep width - 2 bytes
    np.testing.assert_array_equal(ids[1, 1], spell(b"xyz123", width))
    np.testing.assert_array_equal(ids[1, 2], eos)
    assert np.all(ids[1, 3] == 0)
    # an empty sentence is just <S> </S>
    np.testing.assert_array_equal(ids[2, :2], [bos, eos])
    assert np.all(ids[2, 2:] == 0)


def test_missing_tokens_spell_like_known_ones(vocab_file):
    vocab = UnicodeCharsVocabulary(vocab_file, 50)
    assert "dogs" not in vocab._word_to_id
    np.testing.assert_array_equal(vocab.word_to_char_ids("dog")[:5], [BOW, 100, 111, 103, EOW])
    np.testing.assert_array_equal(vocab.word_to_char_ids("dogs")[:6], [BOW, 100, 111, 103, 115, EOW])


def test_token_batcher(vocab_file, tmp_path):
    ids = TokenBatcher(vocab_file).batch_sentences([["the", "dog", "cat"], ["café"]])
    np.testing.assert_array_equal(ids, [[1, 4, 6, 3, 2], [1, 5, 2, 0, 0]])
    no_unk = tmp_path / "no_unk.txt"
    no_unk.write_text("<S>\n</S>\nthe\n", encoding="utf-8")
    with pytest.raises(KeyError, match="'cat'.*no_unk.txt"):
        TokenBatcher(str(no_unk)).batch_sentences([["the", "cat"]])


def test_sentences_must_be_token_lists(vocab_file):
    with pytest.raises(TypeError, match="list of tokens"):
        Batcher(vocab_file, 50).batch_sentences(["the dog"])


@pytest.mark.parametrize("missing", ["<S>", "</S>"])
def test_vocab_without_sentence_markers_is_an_error(tmp_path, missing):
    path = tmp_path / "bad_vocab.txt"
    path.write_text("\n".join(t for t in ["<S>", "</S>", "the"] if t != missing) + "\n", encoding="utf-8")
    for make in (lambda: Batcher(str(path), 50), lambda: TokenBatcher(str(path))):
        with pytest.raises(ValueError, match=f"bad_vocab.txt.*{missing}"):
            make()


def test_a_training_vocabulary_is_checked(tmp_path, caplog):
    path = tmp_path / "vocab.txt"
    path.write_text("<S>\n</S>\n<UNK>\nthe\nof\nthe\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.txt, line 6: 'the' is already on line 4"):
        Vocabulary(str(path), validate_file=True)
    path.write_text("the\n<S>\n</S>\n<UNK>\n", encoding="utf-8")
    with caplog.at_level("WARNING"):
        Vocabulary(str(path), validate_file=True)
    assert "are not its first three lines" in caplog.text


def test_vocab_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("<S>\n</S>\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt, line 3"):
        Vocabulary(str(path))


@pytest.mark.slow
def test_utf8_whatever_the_locale(vocab_file):
    """Under an ASCII locale (no UTF-8 mode) files still read as UTF-8."""
    code = textwrap.dedent(f"""
        import locale
        from elmojax import Batcher
        assert 'utf' not in locale.getpreferredencoding(False).lower(), locale.getpreferredencoding(False)
        ids = Batcher({vocab_file!r}, 8).batch_sentences([['caf\\u00e9']])
        assert list(ids[0, 1, :7]) == [259, 100, 98, 103, 196, 170, 260], list(ids[0, 1])
        print('ok')
    """)
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONIOENCODING="")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_byte_order_mark_and_crlf_read_as_the_plain_file(vocab_file, tmp_path, caplog):
    with open(vocab_file, "rb") as f:
        plain = f.read()
    dos = tmp_path / "dos_vocab.txt"
    dos.write_bytes(b"\xef\xbb\xbf" + plain.replace(b"\n", b"\r\n"))
    sentences = [["the", "caf\u00e9", "cat"], ["dog"]]
    with caplog.at_level("WARNING", logger="elmojax.formats.files"):
        for validate in (False, True):
            a, b = Vocabulary(vocab_file, validate), Vocabulary(str(dos), validate)
            assert (a._id_to_word, a._word_to_id) == (b._id_to_word, b._word_to_id) and b.bos == 0
        np.testing.assert_array_equal(Batcher(str(dos), 16).batch_sentences(sentences),
                                      Batcher(vocab_file, 16).batch_sentences(sentences))
        np.testing.assert_array_equal(TokenBatcher(str(dos)).batch_sentences(sentences),
                                      TokenBatcher(vocab_file).batch_sentences(sentences))
    assert caplog.messages == [f"note: {dos}: starts with a UTF-8 byte-order mark; ignored",
                               f"note: {dos}: Windows line ends (CRLF); read as plain line ends"]  # once each


@pytest.mark.parametrize("token", ["a b", "a\tb", "a\u00a0b", "a\u3000b", "a\x1cb", "a\rb"])
def test_a_line_with_whitespace_inside_is_refused(tmp_path, token):
    path = tmp_path / "vocab.txt"
    path.write_text(f"<S>\n</S>\n<UNK>\n {token} \nthe\n", encoding="utf-8", newline="")
    assert len(token.split()) == 2  # a corpus line splits there: no corpus token could match the line
    with pytest.raises(ValueError) as error:
        Vocabulary(str(path))
    assert str(error.value) == f"{path}, line 4: {token!r} holds whitespace; a vocabulary has one token per line"


@pytest.mark.parametrize("blank", ["", "  ", "\t"])
def test_a_blank_line_is_refused(tmp_path, blank):
    path = tmp_path / "vocab.txt"
    path.write_text(f"<S>\n</S>\n<UNK>\nthe\n{blank}\nof\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        Batcher(str(path), 50)
    assert str(error.value) == f"{path}, line 5: a blank line; a vocabulary has one token per line"
