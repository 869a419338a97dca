"""elmojax's training step against bilm-tf's, replaying a run bilm_tf_training.py recorded.

  python benchmarks/training_parity.py RECORD.npz [--steps N] [--perturbation 1e-7] [--corpus DIR]

The record holds bilm-tf's initial variables (its model's and Adagrad's), the batches it was fed
and what it computed. elmojax starts from the same variables (elmojax.formats.tf_variables), trains on
the same batches from the same zero state with its own jitted train step, given the negatives
bilm-tf's sampler drew and the dropout masks bilm-tf applied (when the record has them), and
is compared with bilm-tf at every step (loss, gradient norm), on the first step's gradients,
variable by variable, and on every variable at each recorded snapshot. Prints a table on stderr
and one JSON object on stdout: for each quantity the largest relative difference,
|elmojax - bilm-tf| / max(|bilm-tf|), taken per variable (so that a tiny entry's rounding does
not read as a large error).

Over hundreds of steps two float32 runs of the same training drift apart, however exact each
step: --perturbation replays a second time from initial weights changed by that relative amount
and compares it with elmojax's own replay, to show how far rounding alone takes a trajectory.
--corpus DIR (a python -m elmojax.prepare directory) scores both final models on its heldout
text with elmojax's evaluator.

The replay itself is elmojax.train.replay, which the test suite runs on small records of this
kind (tests/fixtures/bilm_tf_training/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # noqa: E402  (run from a checkout without installing)
from elmojax.train.replay import (Record, expected_count_difference, first_step_gradients,  # noqa: E402
                                  relative_difference, replay, trainer_for)


def compare(record: Record, steps: Optional[int] = None, perturbation: float = 0.0, corpus: str = "") -> dict:
    """elmojax's replay against the record (and, with `perturbation`, a perturbed replay against
    elmojax's own, the yardstick); with `corpus` (its heldout/ and vocab.txt), the heldout
    perplexity of bilm-tf's and elmojax's final weights by elmojax's evaluator."""
    trainer = trainer_for(record)
    runs = {"elmojax": replay(record, steps, trainer)}
    if perturbation:
        runs["perturbed"] = replay(record, steps, trainer, perturbation)
    n = len(runs["elmojax"][0])
    result = {"record": os.path.basename(record.path), "steps": n, "char_inputs": record.char_inputs,
              "sampled_softmax": record.sampled, "dropout": record.dropout}
    want = {"loss": record.arrays["loss"][:n], "grad_norm": record.arrays["grad_norm"][:n],
            **{k: record.snapshot(k) for k in record.snapshots() if k <= n}}
    result["first_step_gradients"] = worst(first_step_gradients(trainer, record), record.variables("grad"))
    if record.sampled:
        result["expected_counts"] = expected_count_difference(record)
    for name, (losses, norms, snapshots) in runs.items():
        # the perturbed run is compared with elmojax's own, bilm-tf's with the record
        base = want if name == "elmojax" else {"loss": runs["elmojax"][0], "grad_norm": runs["elmojax"][1],
                                               **runs["elmojax"][2]}
        against = "bilm-tf" if name == "elmojax" else "elmojax"
        result[f"{name} vs {against}"] = {
            "loss": per_step(losses, base["loss"]), "grad_norm": per_step(norms, base["grad_norm"]),
            **{f"after_{k}": worst(snapshots[k], base[k]) for k in snapshots}}
    if corpus:
        result["heldout_perplexity"] = heldout_perplexities(record, trainer, runs, corpus)
    return result


def heldout_perplexities(record: Record, trainer, runs: dict, corpus: str) -> dict:
    """Heldout perplexities (elmojax's evaluator) of bilm-tf's and each replay's variables at
    the last snapshot both have."""
    from elmojax.train import config as config_lib
    from elmojax.formats import tf_variables
    from elmojax.train import evaluation, trained_models

    config = config_lib.config_from_options_json(record.options, source=record.path)
    config.data.update(heldout_prefix=os.path.join(corpus, "heldout", "*"), vocab_file=os.path.join(corpus, "vocab.txt"))
    vocab = trained_models.load_vocab(config)
    tokens = [vocab.id_to_word(i) for i in range(vocab.size)]
    options = config_lib.options_json(config, vocab.size)
    step = max(runs["elmojax"][2])
    variables = {"bilm-tf": record.variables(f"after_{step}"), **{name: run[2][step] for name, run in runs.items()}}
    share = bool(record.options.get("share_embedding_softmax", False))
    out = {"after_step": step}
    for name, v in variables.items():
        trained = trained_models.Trained(tf_variables.params_from_tf(v, trainer.options, share), options, tokens,
                                      config.data.vocab_file, name)
        r = evaluation.evaluate(config, corpus, trained, diagnosed=False).heldout.to_json()
        out[name] = {k: r[k] for k in ("perplexity", "forward_perplexity", "backward_perplexity")}
    return out


def per_step(got: np.ndarray, want: np.ndarray) -> dict:
    rel = np.abs(got - want) / np.abs(want)
    return {"max_relative": float(rel.max()), "at_step": int(rel.argmax()) + 1, "last_relative": float(rel[-1]),
            "last": float(got[-1]), "reference_last": float(want[-1])}


def worst(got: dict, want: dict) -> dict:
    """The variable that differs most (relative_difference) between two sets of variables."""
    differences = {k: relative_difference(got[k], want[k]) for k in want}
    name = max(differences, key=differences.get)
    return {"max_relative": differences[name], "variable": name, "variables": len(differences)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("record", help="an npz written by bilm_tf_training.py record")
    parser.add_argument("--steps", type=int, default=0, help="replay only the first N steps")
    parser.add_argument("--perturbation", type=float, default=0.0,
                        help="also replay from initial weights perturbed by this relative amount (e.g. 1e-7), "
                             "against elmojax's own replay: what rounding alone does to the trajectory")
    parser.add_argument("--corpus", default="", help="a python -m elmojax.prepare directory: heldout perplexity "
                                                    "of the final weights")
    args = parser.parse_args(argv)
    import elmojax

    elmojax.setup()  # the process-wide settings the command lines apply
    result = compare(Record(args.record), args.steps or None, args.perturbation, args.corpus)
    for key, value in result.items():
        print(f"{key:24s} {value}", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
