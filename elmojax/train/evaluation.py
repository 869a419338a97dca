"""Heldout evaluation: perplexity with the full softmax, and the check that a model is not broken.

`evaluate` scores every heldout token once, the LSTM state carried from batch to batch as in
training. `diagnose` tells a user when a model is broken, and only then (benchmarks/TRAINING.md,
"Why a model blows up", calibrates it):

  broken       the zero-state trap, proven: a direction's perplexity from the zero LSTM state
               (where evaluation and embeddings start) TRAP_RATIO times or more its perplexity
               from the state training ended in (the carry, which a workdir's checkpoint holds);
               or a direction DIRECTION_LIMIT times the other one, or UNIFORM_LIMIT times a
               uniform guess over the vocabulary (orders of magnitude off, trap or not)
  suspect      without a carry to tell: a direction SUSPECT_RATIO times the other one, which beats
               the unigram baseline (a note)
  undertrained a direction that does not beat a unigram model of the training data (a note:
               train longer)
  healthy      none of these

The unigram baseline is fitted on the training data (its first shards, up to BASELINE_TOKENS
words; add-one smoothing over the vocabulary), never on the heldout text it is compared on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import jax
import ml_collections
import numpy as np

from elmojax import data
from elmojax.data.shards import encode_shard
from elmojax.formats.directions import BACKWARD, DIRECTIONS, FORWARD
from elmojax.train import config as config_lib, runconfig
from elmojax.train.trained_models import Trained, load_trained, load_vocab, local_model, trained_vocab_file, vocab_tokens
from elmojax.train.trainer import Trainer, local_mesh

log = logging.getLogger(__name__)

BASELINE_TOKENS = 2_000_000  # training words the unigram baseline is counted on (whole shards, at least one)


def training_unigram(train_prefix: str, vocab) -> Optional[tuple[np.ndarray, list[str]]]:
    """(counts of each vocabulary id as a forward target, the shards counted) over the first
    shards of the training data, up to BASELINE_TOKENS words; None without training data."""
    try:
        shards = data.list_shards(train_prefix) if train_prefix else []
    except FileNotFoundError:
        shards = []
    counts, used, words = np.zeros(vocab.size, np.int64), [], 0
    for path in shards:
        shard = encode_shard(path, vocab, spell=False)
        ids = shard.words[:-1]
        counts += np.bincount(ids[ids >= 0], minlength=vocab.size)
        counts[vocab.eos] += shard.n  # each sentence's </S>
        used.append(path)
        words += len(ids)
        if words >= BASELINE_TOKENS:
            break
    return (counts, used) if used else None


def unigram_perplexity(train_counts: np.ndarray, heldout_counts: np.ndarray) -> float:
    """The heldout targets' perplexity under the training data's unigram model (add-one)."""
    log_p = np.log((train_counts + 1.0) / (train_counts.sum() + len(train_counts)))
    return float(np.exp(-np.dot(heldout_counts, log_p) / heldout_counts.sum()))


@dataclasses.dataclass(frozen=True)
class HeldoutResult:
    """A model's heldout perplexity with the full softmax, overall (the exp of the mean of the
    directions' mean token losses) and by direction; the heldout targets and files scored; the
    training data's unigram perplexity on the same targets and the files it was counted on
    (None and none without training data); and, from carry_check, each direction's perplexity
    from zero state over its perplexity from the carry (trap_ratio)."""
    perplexity: float
    forward_perplexity: float
    backward_perplexity: Optional[float]  # None: a forward-only model
    tokens: int
    heldout_files: tuple[str, ...]
    vocab_size: int
    unigram_perplexity: Optional[float] = None
    unigram_files: tuple[str, ...] = ()
    trap_ratio: Optional[dict[str, float]] = None

    def by_direction(self) -> dict[str, float]:
        """{direction: perplexity} of the model's directions."""
        both = {FORWARD: self.forward_perplexity, BACKWARD: self.backward_perplexity}
        return {d: p for d, p in both.items() if p is not None}

    @classmethod
    def from_json(cls, d: dict) -> "HeldoutResult":
        """The result that to_json wrote (other fields beside its own, as in a record, are left)."""
        fields = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        return cls(**{**fields, "heldout_files": tuple(d["heldout_files"]),
                      "unigram_files": tuple(d.get("unigram_files", ()))})

    def to_json(self) -> dict:
        """Its fields as the JSON of --mode=evaluate names them (trap_ratio only where measured)."""
        out = {"perplexity": self.perplexity, "forward_perplexity": self.forward_perplexity,
               "backward_perplexity": self.backward_perplexity, "tokens": self.tokens,
               "heldout_files": list(self.heldout_files), "vocab_size": self.vocab_size,
               "unigram_perplexity": self.unigram_perplexity, "unigram_files": list(self.unigram_files)}
        return out if self.trap_ratio is None else {**out, "trap_ratio": dict(self.trap_ratio)}


class Evaluator:
    """Heldout perplexity of one model's params with the full softmax, every heldout token
    counted once, the LSTM state carried from batch to batch, on `trainer`'s eval step (a run's
    own trainer: its evaluations compile that step once, for all of them). `vocab` is the
    model's vocabulary; `train_prefix` the training data the unigram baseline is counted on
    ("" for none)."""

    def __init__(self, trainer: Trainer, vocab, heldout_prefix: str, batch_size: int, unroll_steps: int,
                 train_prefix: str = ""):
        if not heldout_prefix:
            raise ValueError("no heldout data: set --config.data.heldout_prefix=GLOB")
        self.trainer, self.config, self.vocab = trainer, trainer.config, vocab
        self.heldout_prefix, self.unroll_steps = heldout_prefix, unroll_steps
        self.heldout_files = data.list_shards(heldout_prefix)
        self.batch_size = -(-batch_size // self.trainer.n_devices) * self.trainer.n_devices
        self.baseline = training_unigram(train_prefix, vocab)

    def __call__(self, params, initial_state: Optional[dict] = None) -> HeldoutResult:
        """The result for `params`. The LSTMs start from zero state (as embeddings do), or from
        `initial_state`, a carry whose batch size is then the evaluation's (e.g. where training
        left the LSTMs)."""
        return self._result(*self._score(params, initial_state))

    def _result(self, batches: list[dict], target_counts: np.ndarray, trap_ratio: Optional[dict] = None
                ) -> HeldoutResult:
        totals = _totals(batches)
        mean_losses = {d: s / n for d, (s, n) in totals.items()}
        unigram, unigram_files = None, ()
        if self.baseline is not None:
            unigram, unigram_files = unigram_perplexity(self.baseline[0], target_counts), tuple(self.baseline[1])
        return HeldoutResult(
            perplexity=float(np.exp(np.mean(list(mean_losses.values())))),
            forward_perplexity=float(np.exp(mean_losses[FORWARD])),
            backward_perplexity=float(np.exp(mean_losses[BACKWARD])) if BACKWARD in mean_losses else None,
            tokens=int(totals[FORWARD][1]), heldout_files=tuple(self.heldout_files), vocab_size=self.vocab.size,
            unigram_perplexity=unigram, unigram_files=unigram_files, trap_ratio=trap_ratio)

    def carry_check(self, params, carry: dict) -> HeldoutResult:
        """The result from `carry` (the LSTM state training ended in), with `trap_ratio`: for
        each direction, its perplexity from zero state over its perplexity from the carry, in
        the same batches, leaving out the first quarter of the stream (at least one batch),
        where a model trained on a carried state pays for a cold start; what stays is the
        zero-state trap, which lasts."""
        warm_batches, target_counts = self._score(params, carry)
        cold_batches, _ = self._score(params, None, jax.tree.leaves(carry)[0].shape[0])
        skip = max(1, len(warm_batches) // 4) if len(warm_batches) > 1 else 0
        cold, hot = _totals(cold_batches[skip:]), _totals(warm_batches[skip:])
        ratio = {d: float(np.exp(cold[d][0] / cold[d][1] - hot[d][0] / hot[d][1])) for d in hot}
        return self._result(warm_batches, target_counts, ratio)

    def _score(self, params, initial_state: Optional[dict], batch_size: Optional[int] = None
               ) -> tuple[list[dict], np.ndarray]:
        """Each batch's {direction: (loss sum, tokens)}, and how often each vocabulary id is a
        forward target, from `initial_state` (or zeros for `batch_size` rows)."""
        trainer, vocab = self.trainer, self.vocab
        if initial_state is not None:
            batch_size = jax.tree.leaves(initial_state)[0].shape[0]
        batch_size = batch_size or self.batch_size
        dataset = data.make_dataset(config_lib.streams(self.config), vocab, self.heldout_prefix, batch_size,
                                    self.unroll_steps, test=True)
        params = jax.device_put(params, trainer.replicated)
        lstm_state = trainer.zero_lstm_state(batch_size) if initial_state is None else jax.device_put(
            initial_state, trainer.sharded)
        batches = []
        target_counts = np.zeros(vocab.size, np.int64)
        for batch in dataset.iter_batches():
            target_counts += np.bincount(batch["next_token_id"].ravel(), weights=batch["weights"].ravel(),
                                         minlength=vocab.size).astype(np.int64)
            lstm_state, sums = trainer.eval_step(params, lstm_state, trainer.put_batch(batch))
            batches.append({d: (float(loss), float(count)) for d, (loss, count) in jax.device_get(sums).items()})
        if not batches or sum(b[FORWARD][1] for b in batches) == 0:
            raise ValueError(f"{self.heldout_prefix}: no heldout tokens")
        return batches, target_counts


def _totals(batches: list[dict]) -> dict[str, tuple[float, float]]:
    """{direction: (loss sum, tokens)} over batches."""
    return {d: (sum(b[d][0] for b in batches), sum(b[d][1] for b in batches)) for d in batches[0]}


def heldout_evaluator(config: ml_collections.ConfigDict, vocab, trainer: Trainer) -> Evaluator:
    """The Evaluator of config.data.heldout_prefix (with config.eval's batch size and unroll,
    and config.data.train_prefix's baseline) on `trainer`'s eval step, or, where its mesh spans
    other processes' devices, on a trainer of its own over this process's (evaluation runs on
    process 0 alone)."""
    if trainer.n_processes > 1:
        trainer = Trainer(trainer.config, vocab.size, local_mesh())
    return Evaluator(trainer, vocab, config.data.heldout_prefix, config.eval.batch_size, config.eval.unroll_steps,
                     config.data.train_prefix)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What `evaluate` says of a model: where it is (`model`, a workdir's checkpoint `step`), its
    heldout result, and its Health (None where not diagnosed)."""
    model: str
    step: Optional[int]
    heldout: HeldoutResult
    health: Optional[Health] = None

    def to_json(self) -> dict:
        """The JSON --mode=evaluate prints (the health's line goes to stderr instead)."""
        out = {"model": self.model, "step": self.step, **self.heldout.to_json()}
        return out if self.health is None else {**out, **self.health.fields()}


def evaluate(config: ml_collections.ConfigDict, path: str, trained: Optional[Trained] = None,
             initial_state: Optional[dict] = None, diagnosed: bool = True) -> Evaluation:
    """The Evaluation of the model in `path` (a workdir, an exported weight file or a bilm-tf
    checkpoint, whose vocabulary is config.data.vocab_file where none lies beside it) on
    config.data.heldout_prefix; `trained` stands for what `path` holds, if given. Unless
    `initial_state` is given, the result is `diagnose`d too (a workdir's model scored again
    from its checkpoint's carry if it does not look healthy)."""
    path = local_model(path)
    if trained is None:
        trained = load_trained(path, config.init_softmax_from, vocab_file=config.data.vocab_file,
                               with_carry=diagnosed and initial_state is None)
    model_config = config_lib.config_from_options_json(trained.options, source=path)
    model_config.train.matmul_precision = config.train.matmul_precision
    if trained.vocab_file is None:
        raise ValueError(f"{path}: no vocabulary file beside it ({trained_vocab_file(path)}); evaluation reads one")
    vocab = load_vocab(model_config, trained.vocab_file)
    if vocab_tokens(vocab) != trained.vocab:
        raise ValueError(f"{trained.vocab_file}: not the vocabulary of {path}'s softmax")
    evaluator = heldout_evaluator(config, vocab, Trainer(model_config, vocab.size, local_mesh()))
    return evaluate_trained(evaluator, trained, path, initial_state, diagnosed, _resets(path))


def evaluate_trained(evaluator: Evaluator, trained: Trained, model: str, initial_state: Optional[dict] = None,
                     diagnosed: bool = True, state_resets: Optional[float] = None) -> Evaluation:
    """`evaluate` of a model already read (`trained`, from `model`) with an Evaluator already
    built; `state_resets` is the probability its training reset the carry with (None: unknown)."""
    log.info("evaluating %s%s on %s", model, f" (step {trained.step})" if trained.step is not None else "",
             evaluator.heldout_prefix)
    heldout = evaluator(trained.params, initial_state)
    health = None
    if initial_state is None and diagnosed:
        health = diagnose(heldout)
        if health.needs_carry and trained.carry is not None:
            health = diagnose(heldout, evaluator.carry_check(trained.params, trained.carry), state_resets)
    return Evaluation(model, trained.step, heldout, health)


def _resets(path: str) -> Optional[float]:
    """The state reset probability a workdir's run trains with (None where not known)."""
    stored = runconfig.stored(path) if os.path.isdir(path) else None
    return None if stored is None else float(stored.train.state_reset_probability)


def summary(result: HeldoutResult) -> str:
    """An evaluation's result as one line."""
    backward, baseline = result.backward_perplexity, result.unigram_perplexity
    return (f"heldout perplexity {result.perplexity:.2f} (forward {result.forward_perplexity:.2f}"
            + (f", backward {backward:.2f}" if backward is not None else "")
            + f") over {result.tokens} tokens of {_files(result.heldout_files)}"
            + (f"; unigram baseline of the training data {baseline:.2f}" if baseline is not None else ""))


def _files(paths: tuple[str, ...]) -> str:
    return paths[0] if len(paths) == 1 else f"{len(paths)} files ({paths[0]} ... {paths[-1]})"


# Calibrated in benchmarks/TRAINING.md ("The check"): over its 160 seed runs, from zero state the
# healthy runs' directions are within 1.03 of their carry's (whole streams) and the trapped ones
# 1.235 or more above it, the healthy runs' two directions within 1.13 of each other and the
# trapped ones 1.24 apart or more; over 75 evaluations of young models, past the cold start
# (carry_check) healthy ones score 1.000 of their carry's, trapped ones 1.72 or more.
TRAP_RATIO = 1.15       # zero-state / carry perplexity of a direction: the trap, proven
DIRECTION_LIMIT = 10.0  # one direction this many times the other: broken, trap or not
UNIFORM_LIMIT = 2.0     # this many times a uniform guess over the vocabulary: broken
SUSPECT_RATIO = 1.2     # without a carry: one direction this many times the other is worth a note

REFERENCE = 'README, "When a model blows up"'


@dataclasses.dataclass(frozen=True)
class Health:
    """What an evaluation says of a model: `verdict` (healthy, undertrained, suspect, broken),
    the line to print (None when healthy), whether scoring it from its training carry would
    tell more (`needs_carry`), and the carry's perplexities if it was."""
    verdict: str
    line: Optional[str] = None
    needs_carry: bool = False
    from_carry: Optional[HeldoutResult] = None

    def fields(self) -> dict:
        """Its fields in the JSON of --mode=evaluate (not the line, which goes to stderr)."""
        out = {"health": self.verdict, "blown_up": self.verdict == "broken"}
        if self.from_carry is not None:
            carried = self.from_carry.by_direction()
            out.update({f"carry_{d}_perplexity": carried.get(d) for d in DIRECTIONS})
        return out


def _far_off(scores: dict[str, float], vocab_size: int) -> Optional[str]:
    """Why one of these perplexities is orders of magnitude off, or None."""
    worst = max(scores, key=scores.get)
    if scores[worst] > UNIFORM_LIMIT * vocab_size:
        return f"worse than a uniform guess over its {vocab_size} tokens"
    if len(scores) == 2 and scores[worst] > DIRECTION_LIMIT * min(scores.values()):
        other = min(scores, key=scores.get)
        return f"{scores[worst] / scores[other]:.3g} times the {other} LM's"
    return None


def diagnose(result: HeldoutResult, from_carry: Optional[HeldoutResult] = None,
             state_resets: Optional[float] = None) -> Health:
    """The Health of an evaluation's result (see the module docstring). `from_carry` is the same
    model's evaluation from the LSTM state training ended in, if there is one; `state_resets`
    the probability its training reset the carry with (None: unknown), for the advice."""
    scores = result.by_direction()
    worst = max(scores, key=scores.get)
    listed = ", ".join(f"{d} {p:.6g}" for d, p in scores.items())
    if from_carry is not None:
        carried = from_carry.by_direction()
        far = _far_off(carried, result.vocab_size)
        if far:
            bad = max(carried, key=carried.get)
            return Health("broken", f"warning: the {bad} LM is broken: heldout perplexity {carried[bad]:.6g} from the "
                          f"LSTM state training ended in, {far} (from zero state: {listed}): it has not learnt. Do not "
                          f"use it: train it again, with a smaller --config.train.learning_rate or another seed.",
                          from_carry=from_carry)
        ratios = from_carry.trap_ratio or {d: scores[d] / carried[d] for d in scores}
        trapped = {d: r for d, r in ratios.items() if r >= TRAP_RATIO}
        if trapped:
            bad = max(trapped, key=trapped.get)
            return Health("broken", f"warning: the {bad} LM is broken: heldout perplexity {scores[bad]:.6g} from the "
                          f"zero LSTM state, where evaluation and embeddings start, but {carried[bad]:.6g} from the "
                          f"state training ended in: from zero it falls into a state that training, which carries "
                          f"the state from batch to batch, never visits ({REFERENCE}). {_trap_advice(state_resets)}",
                          from_carry=from_carry)
    else:
        far = _far_off(scores, result.vocab_size)
        if far:
            return Health("broken", f"warning: the {worst} LM is broken: heldout perplexity {scores[worst]:.6g}, "
                          f"{far} ({listed}). Do not use it. A direction this far off has fallen into the zero-state "
                          f"trap ({REFERENCE}) or has not learnt; evaluating the workdir it was trained in, whose "
                          f"checkpoints hold the state training ended in, tells which.", needs_carry=True)
        baseline = result.unigram_perplexity
        learnt = baseline is None or min(scores.values()) < baseline  # (young models' directions differ more)
        if len(scores) == 2 and scores[worst] > SUSPECT_RATIO * min(scores.values()) and learnt:
            other = min(scores, key=scores.get)
            return Health("suspect", f"note: from the zero LSTM state the {worst} LM scores {scores[worst] / scores[other]:.3g} "
                          f"times the {other} LM ({listed}); in a trained model that is a sign of the zero-state trap "
                          f"({REFERENCE}), which evaluating the workdir it was trained in (its checkpoints hold the "
                          f"state training ended in) confirms or rules out.", needs_carry=True)
    baseline = result.unigram_perplexity
    if baseline is not None and scores[worst] > baseline:
        return Health("undertrained", f"note: the {worst} LM does not yet beat a unigram model of the training data "
                      f"(heldout perplexity {scores[worst]:.6g} against {baseline:.6g}): train it longer.",
                      from_carry=from_carry)
    return Health("healthy", from_carry=from_carry)


def _trap_advice(state_resets: Optional[float]) -> str:
    if state_resets is None:
        return ("Do not use it; train again with state resets (elmojax: --config.train.state_reset_probability=0.05) "
                "or another seed.")
    if state_resets == 0:
        return ("Do not use it: train again with --config.train.state_reset_probability=0.05 (each row's carried LSTM "
                "state is zeroed now and then, so that the model learns to start from it), or with another seed.")
    return (f"Do not use it: it fell in although its training reset the state with probability {state_resets:g}; the "
            f"trap comes and goes from checkpoint to checkpoint, so train on, or again with another seed or a higher "
            f"--config.train.state_reset_probability.")
