"""Heldout perplexity of bilm-tf and elmojax trained from one options.json over several seeds.

  python benchmarks/training_seeds.py --options O.json --corpus DIR --seeds 0-9 --out RUNS.jsonl \
      [--implementations bilm-tf,elmojax] [--set dropout=0.0 --set sample_softmax=false] \
      [--elmojax train.state_reset_probability=0.05] [--tf-python /tmp/tf/bin/python]

DIR is a corpus written by `python -m elmojax.prepare` (train/, heldout/, vocab.txt). Each seed
trains bilm-tf (bilm_tf_training.py train, its own train() in bilm_tf.py's environment) and
elmojax (elmojax.train.loop.train on configs/bilm_options.py's reading of the same file) for the
options' n_epochs * int(n_train_tokens / (batch_size * unroll_steps)) batches; --set overrides
options fields (JSON values), --elmojax elmojax config fields. Both trained models are then scored by one evaluator, elmojax's
(full softmax, state carried, every heldout token once), from the zero LSTM state, as
embeddings start, and again from the state training left the LSTMs in (carry_perplexity: the
model's quality apart from where it starts); bilm-tf's own test() figure (batch 256, unroll 1,
which leaves out the tails of the last sentences of its 256 rows) is recorded beside them. A run's line also says whether its model blew up (the verdict of
elmojax.train.evaluation.diagnose, which compares the two). Appends one JSON line per
run to --out (runs already there are skipped, so a stopped sweep resumes) and prints the
summary: per implementation the median, min and max, and the blown-up seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # noqa: E402
from elmojax.train.replay import carry_from_arrays  # noqa: E402

IMPLEMENTATIONS = ("bilm-tf", "elmojax")


def seeds(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        out.extend(range(int(first), int(last or first) + 1))
    return out


def corpus_config(options: dict, corpus: str, seed: int, source: str, overrides: tuple = ()):
    from elmojax.train import config as config_lib

    config = config_lib.config_from_options_json(options, source=source)
    for field, value in overrides:  # elmojax's own config fields (train.*), beyond options.json's
        section, _, name = field.rpartition(".")
        config[section][name] = value
    config.data.update(train_prefix=os.path.join(corpus, "train", "*"),
                       heldout_prefix=os.path.join(corpus, "heldout", "*"),
                       vocab_file=os.path.join(corpus, "vocab.txt"))
    config.train.update(seed=seed, log_every=100, checkpoint_every=10**9, keep_checkpoints=1)
    return config


def evaluate(config, corpus: str, params: dict, options: dict, carry: dict) -> dict:
    """elmojax's heldout evaluation of params trained on the corpus (whose vocab.txt they index):
    from the zero LSTM state (what embeddings start from), and from `carry`, the state training
    left the LSTMs in (carry_* figures), with the verdict of elmojax.train.evaluation.diagnose given
    both (blown_up: "broken")."""
    from elmojax.train import config as config_lib
    from elmojax.train import evaluation, trained_models
    from elmojax.train.trainer import Trainer, local_mesh

    model_config = config_lib.config_from_options_json(options, source=corpus)
    vocab = trained_models.load_vocab(model_config, config.data.vocab_file)
    evaluator = evaluation.heldout_evaluator(config, vocab, Trainer(model_config, vocab.size, local_mesh()))
    zero = evaluator(params)
    from_carry = evaluator.carry_check(params, carry)
    result = zero.to_json()
    result.update({f"carry_{k}": getattr(from_carry, k) for k in ("perplexity", "forward_perplexity",
                                                                   "backward_perplexity")})
    health = evaluation.diagnose(zero, from_carry, config.train.state_reset_probability)
    result.update(trap_ratio=from_carry.trap_ratio, health=health.verdict, blown_up=health.verdict == "broken")
    return result


def run_elmojax(options: dict, corpus: str, seed: int, source: str, overrides: tuple = ()) -> dict:
    import jax

    from elmojax.train import config as config_lib
    from elmojax.train import loop, trained_models

    config = corpus_config(options, corpus, seed, source, overrides)
    workdir = tempfile.mkdtemp(prefix="elmojax_seed_")
    start = time.perf_counter()
    state = loop.train(config, workdir)
    seconds = time.perf_counter() - start
    params = jax.tree.map(np.asarray, jax.device_get(state.params))
    vocab = trained_models.load_vocab(config)
    result = evaluate(config, corpus, params, config_lib.options_json(config, vocab.size),
                      jax.device_get(state.lstm_state))
    return {**result, "train_seconds": seconds}


def run_bilm_tf(options: dict, corpus: str, seed: int, tf_python: str) -> dict:
    from elmojax.formats import tf_variables
    from elmojax.formats.options import BiLMOptions

    with tempfile.TemporaryDirectory(prefix="bilm_tf_seed_") as tmp:
        options_file = os.path.join(tmp, "options.json")
        with open(options_file, "w") as f:
            json.dump(options, f)
        out = os.path.join(tmp, "run.npz")
        command = [tf_python, os.path.join(HERE, "bilm_tf_training.py"), "train", "--options", options_file,
                   "--vocab", os.path.join(corpus, "vocab.txt"), "--train", os.path.join(corpus, "train", "*"),
                   "--heldout", os.path.join(corpus, "heldout", "*"), "--seed", str(seed), "--out", out]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bilm-tf seed {seed} failed:\n{done.stderr[-3000:]}")
        with np.load(out, allow_pickle=False) as f:
            variables = {k[len("trained/"):]: f[k] for k in f.files if k.startswith("trained/")}
            facts = json.loads(str(f["result"]))
            carry = carry_from_arrays(f, "lstm_state", options)
    share = bool(options.get("share_embedding_softmax", False))
    params = tf_variables.params_from_tf(variables, BiLMOptions.from_dict(options), share, source=f"bilm-tf seed {seed}")
    result = evaluate(corpus_config(options, corpus, seed, "options"), corpus, params, options, carry)
    return {**result, "train_seconds": facts["train_seconds"],
            "bilm_tf_test_perplexity": facts.get("bilm_tf_test_perplexity")}


def _spread(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def summary(runs: list[dict]) -> dict:
    """Per implementation: the heldout perplexity's median, min and max over all seeds and over
    those not blown up (elmojax.train.evaluation.diagnose), the same from the training carry, and the
    blown-up seeds; then elmojax's medians over bilm-tf's."""
    out = {}
    for implementation in IMPLEMENTATIONS:
        mine = [r for r in runs if r["implementation"] == implementation]
        if mine:
            out[implementation] = {
                "seeds": len(mine), "all": _spread([r["perplexity"] for r in mine]),
                "not_blown_up": _spread([r["perplexity"] for r in mine if not r["blown_up"]]),
                "from_carry": _spread([r["carry_perplexity"] for r in mine if "carry_perplexity" in r]),
                "blown_up_seeds": [r["seed"] for r in mine if r["blown_up"]]}
    if len(out) == 2:
        out["elmojax_over_bilm_tf"] = {
            key: out["elmojax"][key]["median"] / out["bilm-tf"][key]["median"]
            for key in ("all", "not_blown_up", "from_carry") if out["elmojax"][key] and out["bilm-tf"][key]}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--options", required=True, help="a bilm-tf training options.json")
    parser.add_argument("--corpus", required=True, help="a directory written by python -m elmojax.prepare")
    parser.add_argument("--seeds", default="0-4", help="e.g. 0-9 or 0,3,7")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="override an options field")
    parser.add_argument("--elmojax", action="append", default=[], metavar="SECTION.FIELD=JSON",
                        help="set an elmojax config field (e.g. train.state_reset_probability=0.05); elmojax only")
    parser.add_argument("--tf-python", default="/tmp/tf/bin/python", help="bilm_tf.py's environment's python")
    parser.add_argument("--out", required=True, help="JSON lines, one per run (appended; resumes)")
    args = parser.parse_args(argv)
    import elmojax

    elmojax.setup()  # the process-wide settings the command lines apply

    from elmojax.formats import files

    options = files.read_json(args.options)
    for item in args.set:
        field, _, value = item.partition("=")
        options[field] = json.loads(value)
    with open(os.path.join(args.corpus, "vocab.txt"), encoding="utf-8") as f:
        options["n_tokens_vocab"] = sum(1 for line in f if line.strip())
    overrides = tuple((field, json.loads(value)) for field, _, value in (item.partition("=") for item in args.elmojax))
    if overrides and args.implementations != "elmojax":
        parser.error("--elmojax sets elmojax's config: use it with --implementations elmojax")
    label = {"options": os.path.basename(args.options), "corpus": os.path.basename(os.path.normpath(args.corpus)),
             "set": sorted(args.set + args.elmojax)}
    runs = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            runs = [r for r in map(json.loads, f) if {k: r.get(k) for k in label} == label]
    for seed in seeds(args.seeds):
        for implementation in args.implementations.split(","):
            if any(r["seed"] == seed and r["implementation"] == implementation for r in runs):
                continue
            if implementation == "elmojax":
                result = run_elmojax(options, args.corpus, seed, args.options, overrides)
            else:
                result = run_bilm_tf(options, args.corpus, seed, args.tf_python)
            run = {**label, "implementation": implementation, "seed": seed, **result}
            runs.append(run)
            with open(args.out, "a") as f:
                f.write(json.dumps(run) + "\n")
            print(f"{implementation:8s} seed {seed}: heldout perplexity {run['perplexity']:.2f} "
                  f"(forward {run['forward_perplexity']:.2f}, backward {run['backward_perplexity']:.2f}); "
                  f"from the training carry {run['carry_perplexity']:.2f}", file=sys.stderr)
    result = {**label, "summary": summary(runs)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
