"""LM scores: each token's forward and backward log-probability under a trained biLM's full
softmax (a softmax file: `softmax/W`, `softmax/b` and the vocabulary of its rows), and perplexity.

For a sentence [<S>, w1..wn, </S>] the forward LM's top layer at each position scores the next
token, the backward LM's the previous one, over the whole vocabulary; a token the vocabulary
does not have is scored as <UNK>. Perplexity is bilm-tf's: exp of the mean of the two
directions' mean negative log-probability per prediction (n + 1 a sentence and direction,
</S> and <S> included). Every call starts from zero state.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from elmojax.formats import hdf5, tf_checkpoint
from elmojax.formats.directions import BACKWARD, DIRECTIONS, FORWARD
from elmojax.formats.tf_variables import read_training_checkpoint, vocab_beside
from elmojax.formats.vocab import BOS, EOS, EOS_CHAR, EOW_CHAR, UNK, Vocabulary
from elmojax.model import numerics, softmax
from elmojax.model.bilm import BiLM, zero_state


def load_scorer_softmax(softmax_file: str) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(W, b, {token: row}) of a softmax file, or of a bilm-tf training checkpoint; the
    vocabulary from the file or, when it holds none, from vocab.txt (or the only vocab*.txt)
    beside it."""
    if tf_checkpoint.is_checkpoint(softmax_file):
        trained = read_training_checkpoint(softmax_file)
        weights = trained.params["softmax"].get("W")
        if weights is None:  # shared with the word embedding
            weights = trained.params["bilm"]["embedder"]["embedding"]
        biases, tokens = trained.params["softmax"]["b"], None
    else:
        weights, biases, tokens = hdf5.load_softmax(softmax_file)
    if tokens is None:
        directory = softmax_file if os.path.isdir(softmax_file) else os.path.dirname(os.path.abspath(softmax_file))
        vocab_file = vocab_beside(directory)
        if vocab_file is None:
            raise ValueError(f"{softmax_file}: holds no vocabulary, and there is no vocab.txt beside it")
        vocab = Vocabulary(vocab_file)
        tokens = [vocab.id_to_word(i) for i in range(vocab.size)]
    if len(tokens) != weights.shape[0]:
        raise ValueError(f"{softmax_file}: {len(tokens)} tokens for {weights.shape[0]} softmax rows")
    index = {token: i for i, token in enumerate(tokens)}
    if UNK not in index or BOS not in index or EOS not in index:
        raise ValueError(f"{softmax_file}: its vocabulary needs <S>, </S> and <UNK> to score sentences")
    return weights, biases, index


def tokens_of(char_ids: np.ndarray) -> list[list[str]]:
    """The tokens Batcher ids spell (between <S> and </S>); a token cut at the spelling's width
    comes back cut (and is then scored as whatever the cut spelling is, usually <UNK>)."""
    try:
        char_ids = np.asarray(char_ids)
    except (ValueError, TypeError) as e:
        raise TypeError(f"char_ids must be an array of Batcher's ids, got {type(char_ids).__name__} ({e})") from None
    if not np.issubdtype(char_ids.dtype, np.integer) or char_ids.ndim != 3 or char_ids.shape[2] < 3:
        raise ValueError(f"char_ids must be Batcher's integer ids (batch, time, max_characters_per_token), got "
                         f"{char_ids.dtype} of shape {char_ids.shape}")
    out = []
    for row in char_ids:
        tokens = []
        for chars in row[1:]:
            chars = chars - 1
            if chars[0] < 0 or chars[1] == EOS_CHAR:  # padding, or </S>
                break
            end = list(chars).index(EOW_CHAR) if EOW_CHAR in chars else len(chars)
            tokens.append(bytes(int(c) for c in chars[1:end]).decode("utf-8", "ignore"))
        out.append(tokens)
    return out


def make_log_prob_fn(model: BiLM) -> Callable:
    """jit((params, W, b, ids, forward_targets, backward_targets) -> (forward, backward) log-probs
    (batch, time)): each position's top layer scored against its target row, the softmax's
    products with the model's numerics."""

    def fn(params, weights, biases, ids, forward_targets, backward_targets):
        output, _ = model.apply({"params": params}, ids, zero_state(model.options, ids.shape[0]))

        def log_probs(top, targets):
            flat = top.reshape(-1, top.shape[-1])
            losses = softmax.full_softmax_loss(softmax.SoftmaxTable(weights, biases), flat, targets.reshape(-1),
                                               numerics=model.numerics)
            return -losses.reshape(targets.shape)

        return log_probs(output.forward[-1], forward_targets), log_probs(output.backward[-1], backward_targets)

    return numerics.jit(fn)


def targets(sentences: Sequence[Sequence[str]], index: dict[str, int], time: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of each position's forward target (the next token) and backward target (the previous)."""
    unk = index[UNK]
    forward = np.zeros((len(sentences), time), np.int32)
    backward = np.zeros((len(sentences), time), np.int32)
    for i, sentence in enumerate(sentences):
        ids = [index[BOS]] + [index.get(t, unk) for t in sentence] + [index[EOS]]
        forward[i, : len(ids) - 1] = ids[1:]
        backward[i, 1 : len(ids)] = ids[:-1]
    return forward, backward


def score(log_prob_fn: Callable, params, weights, biases, index: dict[str, int], char_ids: np.ndarray,
          sentences: Sequence[Sequence[str]]) -> dict:
    """log_probs' dict for Batcher ids and the sentences they spell."""
    ids = jnp.asarray(char_ids, jnp.int32)
    forward_targets, backward_targets = targets(sentences, index, ids.shape[1])
    forward, backward = jax.device_get(log_prob_fn(params, weights, biases, ids, forward_targets, backward_targets))
    n = len(sentences)
    width = max(1, ids.shape[1] - 2)
    out = {k: np.zeros((n, width), np.float32) for k in DIRECTIONS}
    out["mask"] = np.zeros((n, width), bool)
    out["forward_end"], out["backward_end"] = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for i, sentence in enumerate(sentences):
        m = len(sentence)
        out[FORWARD][i, :m] = forward[i, :m]             # position j - 1 scores w_j
        out[BACKWARD][i, :m] = backward[i, 2 : m + 2]    # position j + 1 scores w_j
        out["mask"][i, :m] = True
        out["forward_end"][i], out["backward_end"][i] = forward[i, m], backward[i, 1]  # </S>, <S>
    return out


def perplexity(scores: Sequence[dict]) -> float:
    """bilm-tf's perplexity over log_probs' dicts: exp of the directions' mean NLL per prediction."""
    if isinstance(scores, dict):
        raise TypeError("scores must be a list of log_probs' dicts; got one dict (wrap it in a list)")
    try:
        scores = list(scores)
    except TypeError:
        raise TypeError(f"scores must be a list of log_probs' dicts, got {type(scores).__name__}") from None
    keys = DIRECTIONS + ("mask", "forward_end", "backward_end")
    for k, s in enumerate(scores):
        if not isinstance(s, dict) or any(key not in s for key in keys):
            raise TypeError(f"scores[{k}] must be a dict of log_probs (with {', '.join(keys)}), got "
                            f"{type(s).__name__}")
    if not scores or not any(len(s["forward_end"]) for s in scores):
        raise ValueError("scores: perplexity needs the scores of at least one sentence")
    totals = {direction: 0.0 for direction in DIRECTIONS}
    count = 0
    for s in scores:
        for direction in totals:
            totals[direction] -= float(np.sum(s[direction][s["mask"]], dtype=np.float64)
                                       + np.sum(s[direction + "_end"], dtype=np.float64))
        count += int(s["mask"].sum()) + len(s["forward_end"])
    return float(np.exp((totals[FORWARD] + totals[BACKWARD]) / 2 / count))
