"""Heldout evaluation: perplexity with the full softmax, and the check that a model is not broken.

`evaluate` scores every heldout token once, the LSTM state carried from batch to batch as in
training. `blown_up` and `health_warning` tell a user when a model scores far worse than it
should (benchmarks/TRAINING.md, "Why a model blows up").
"""

from __future__ import annotations

from typing import Optional

import jax
import ml_collections
import numpy as np

from elmojax import config as config_lib, data
from elmojax.model_files import load_trained, load_vocab, local_model, trained_vocab_file, vocab_tokens
from elmojax.trainer import Trainer, local_mesh


class Evaluator:
    """Heldout perplexity of one model's params with the full softmax, every heldout token
    counted once, the LSTM state carried from batch to batch; its eval step compiles once for
    all the evaluations of a run. `config` is the model's, `vocab` its vocabulary."""

    def __init__(self, config: ml_collections.ConfigDict, vocab, heldout_prefix: str, batch_size: int,
                 unroll_steps: int):
        if not heldout_prefix:
            raise ValueError("no heldout data: set --config.data.heldout_prefix=GLOB")
        self.config, self.vocab, self.heldout_prefix, self.unroll_steps = config, vocab, heldout_prefix, unroll_steps
        self.trainer = Trainer(config, vocab.size, local_mesh())
        self.batch_size = -(-batch_size // self.trainer.n_devices) * self.trainer.n_devices

    def __call__(self, params, initial_state: Optional[dict] = None) -> dict:
        """The result for `params`: perplexity overall and by direction, tokens, the unigram
        baseline and whether the model is blown up. The LSTMs start from zero state (as
        embeddings do), or from `initial_state`, a carry whose batch size is then the
        evaluation's (e.g. where training left the LSTMs)."""
        trainer, vocab = self.trainer, self.vocab
        batch_size = self.batch_size if initial_state is None else jax.tree.leaves(initial_state)[0].shape[0]
        dataset = data.make_dataset(self.config, vocab, self.heldout_prefix, batch_size, self.unroll_steps, test=True)
        params = jax.device_put(params, trainer.replicated)
        lstm_state = trainer.zero_lstm_state(batch_size) if initial_state is None else jax.device_put(
            initial_state, trainer.sharded)
        totals: dict[str, list[float]] = {}
        target_counts = np.zeros(vocab.size, np.int64)
        for batch in dataset.iter_batches():
            target_counts += np.bincount(batch["next_token_id"].ravel(), weights=batch["weights"].ravel(),
                                         minlength=vocab.size).astype(np.int64)
            lstm_state, sums = trainer.eval_step(params, lstm_state, trainer.put_batch(batch))
            for direction, (loss_sum, count) in jax.device_get(sums).items():
                t = totals.setdefault(direction, [0.0, 0.0])
                t[0] += float(loss_sum)
                t[1] += float(count)
        if not totals or next(iter(totals.values()))[1] == 0:
            raise ValueError(f"{self.heldout_prefix}: no heldout tokens")
        mean_losses = {d: s / n for d, (s, n) in totals.items()}
        result = {"perplexity": float(np.exp(np.mean(list(mean_losses.values())))),
                  "tokens": int(totals["forward"][1]),
                  # a unigram model fit to the heldout targets themselves: a baseline to beat
                  "unigram_perplexity": _unigram_perplexity(target_counts)}
        for direction, loss in mean_losses.items():
            result[f"{direction}_perplexity"] = float(np.exp(loss))
        if "backward_perplexity" not in result:
            result["backward_perplexity"] = None
        result["blown_up"] = blown_up(result)
        return result


def evaluate(config: ml_collections.ConfigDict, path: str, trained: Optional[tuple] = None,
             initial_state: Optional[dict] = None) -> dict:
    """The Evaluator's result for the model in `path` (a workdir or an exported weight file) on
    config.data.heldout_prefix; `trained` (params, options.json dict, vocabulary) stands for
    what `path` holds, if given."""
    path = local_model(path)
    params, options_d, tokens = trained or load_trained(path, config.init_softmax_from)
    model_config = config_lib.config_from_options_json(options_d, source=path)
    model_config.train.matmul_precision = config.train.matmul_precision
    vocab = load_vocab(model_config, trained_vocab_file(path))
    if vocab_tokens(vocab) != tokens:
        raise ValueError(f"{path}: its vocabulary file does not match the softmax's vocabulary")
    evaluator = Evaluator(model_config, vocab, config.data.heldout_prefix, config.eval.batch_size,
                          config.eval.unroll_steps)
    return evaluator(params, initial_state)


def summary(result: dict) -> str:
    """An evaluation's result as one line."""
    backward = result["backward_perplexity"]
    return (f"heldout perplexity {result['perplexity']:.2f} (forward {result['forward_perplexity']:.2f}"
            + (f", backward {backward:.2f}" if backward is not None else "")
            + f") over {result['tokens']} tokens; unigram baseline {result['unigram_perplexity']:.2f}")


# A direction whose heldout perplexity is this many times the other's has gone wrong: healthy
# forward and backward LMs score within a few percent of each other.
DIRECTION_RATIO_LIMIT = 1.2


def blown_up(result: dict) -> bool:
    """Whether an evaluation's result shows a broken model: a direction's heldout perplexity
    above the unigram baseline (what a model of word frequencies alone would score), or
    DIRECTION_RATIO_LIMIT times the other direction's."""
    scores = [result[f"{d}_perplexity"] for d in ("forward", "backward") if result.get(f"{d}_perplexity") is not None]
    return max(scores) > result["unigram_perplexity"] or max(scores) > DIRECTION_RATIO_LIMIT * min(scores)


def health_warning(result: dict, from_carry: Optional[dict] = None) -> Optional[str]:
    """For an evaluation that shows a broken model (blown_up), one line that says so, with the
    perplexities, why and what to do; None otherwise. `from_carry`, the evaluation from the
    LSTM state training ended in, tells the zero-state trap (a model fine from there) from a
    model that did not learn."""
    if not blown_up(result):
        return None
    scores = {d: result[f"{d}_perplexity"] for d in ("forward", "backward") if result.get(f"{d}_perplexity") is not None}
    worst = max(scores, key=scores.get)
    line = (f"warning: the {worst} LM is broken: heldout perplexity {scores[worst]:.6g} ("
            + ", ".join(f"{d} {p:.6g}" for d, p in scores.items())
            + f"; unigram baseline {result['unigram_perplexity']:.6g})")
    trap = ("from the zero LSTM state that evaluation and embeddings start from, it falls into a state that "
            "training, which carries the state from batch to batch, never visits. ")
    if from_carry is None:
        return f"{line}. If its sampled-softmax training perplexity looked normal, {trap}{REMEDY}"
    carried = from_carry[f"{worst}_perplexity"]
    if blown_up(from_carry):
        return (f"{line}, and {carried:.6g} from the LSTM state training ended in: it has not learnt; train it "
                f"longer (or with a smaller learning rate).")
    return f"{line}, but {carried:.6g} from the LSTM state training ended in: {trap}{REMEDY}"


# What health_warning advises for the zero-state trap (see README, "When a model blows up").
REMEDY = ("Do not use it: train again with --config.train.state_reset_probability=0.05 (each row's carried LSTM "
          "state is zeroed now and then, so that the model learns to start from it), or with another seed.")


def _unigram_perplexity(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-np.sum(p * np.log(p))))
