import json
import os

import h5py
import numpy as np
import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MODEL = os.path.join(FIXTURES, "model")
OPTIONS_FILE = os.path.join(MODEL, "options.json")
WEIGHT_FILE = os.path.join(MODEL, "lm_weights.hdf5")
VOCAB_FILE = os.path.join(MODEL, "vocab_test.txt")
TRAIN_VOCAB_FILE = os.path.join(FIXTURES, "train", "vocab.txt")


def padded_vocab_file(directory, size: int) -> str:
    """The toy corpus's vocabulary with unused tokens appended up to `size` entries: softmax
    tables large enough for the train step's row update (elmojax.model.softmax.ROW_UPDATE_MIN_RATIO)."""
    with open(TRAIN_VOCAB_FILE, encoding="utf-8") as f:
        tokens = f.read().split()
    path = os.path.join(directory, "padded_vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens + [f"<unused{i}>" for i in range(size - len(tokens))]) + "\n")
    return path


@pytest.fixture(scope="session")
def fixture_sentences():
    """sentences[k][i] (k in 0..2, i in 0..9) as token lists, and the reference's top layers."""
    with open(os.path.join(MODEL, "lm_embeddings_sentences.json"), encoding="utf-8") as f:
        sentences = [[s.split() for s in row] for row in json.load(f)]
    expected = []
    for k in range(len(sentences)):
        with h5py.File(os.path.join(MODEL, f"lm_embeddings_{k}.hdf5"), "r") as f:
            # each dataset is (2, n_tokens, dim): forward and backward top layer
            expected.append([np.concatenate([f[str(i)][0], f[str(i)][1]], axis=-1) for i in range(10)])
    return sentences, expected


def short_lines(path, n: int) -> str:
    """A text file of n short lines (1 to 12 tokens) cut from the bundled corpus sample's heldout text."""
    sample = os.path.join(os.path.dirname(os.path.dirname(FIXTURES)), "elmojax", "resources", "kjv_sample",
                          "heldout", "shard-00000.txt")
    with open(sample, encoding="utf-8") as f:
        lines = [line.split() for line in f if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(" ".join(lines[i % len(lines)][: 1 + i % 12]) + "\n")
    return str(path)
