"""bilm-tf's training, recorded step by step or run to the end, for elmojax's parity harness.

It runs in bilm_tf.py's environment (TensorFlow 2.15 compat.v1 and the `bilm` package, 0.1.post5):

  /tmp/tf/bin/python benchmarks/bilm_tf_training.py record --options O.json --vocab V.txt \
      --train 'DIR/train/*' --steps 20 --snapshots 1,20 --seed 0 --out RECORD.npz
  /tmp/tf/bin/python benchmarks/bilm_tf_training.py train --options O.json --vocab V.txt \
      --train 'DIR/train/*' --heldout 'DIR/heldout/*' --seed 0 --out RUN.npz
  /tmp/tf/bin/python benchmarks/bilm_tf_training.py checkpoint --options O.json --vocab V.txt \
      --train 'DIR/train/*' --steps 3 --seed 0 --out CHECKPOINT_DIR

Both build the graph of bilm-tf's `train()` for one tower (bilm.training: LanguageModel, Adagrad
with initial accumulator 1.0, the loss times unroll_steps, average_gradients, clip_grads), seed
TensorFlow's graph and Python's `random` (which shuffles bilm's data) with --seed, and feed
batches of bilm's own BidirectionalLMDataset with each batch's final LSTM state fed to the next,
as train() does. The options file is a bilm-tf training options.json (`sample_softmax: false`
selects the full softmax, as in bilm-tf).

record: writes an npz (plain arrays, no pickles; names are TensorFlow's) with
  options                  the options.json text (a 0-d string array)
  init/<variable>          every trainable variable and its Adagrad slot before the first step
  batch/<name>             the fed batches, stacked over steps (bilm's ids: no + 1)
  loss, forward_loss, backward_loss, grad_norm   per step (the norm is clip_grads' global norm)
  grad/<variable>          the first step's gradients before clipping (dense)
  after_<k>/<variable>     every variable after step k, for each of --snapshots
  lstm_state_after_<k>/<d>/<l>/{c,h}   the LSTM carry after step k (direction d, layer l)
  sampled/ids, sampled/true_expected_count, sampled/sampled_expected_count
                           per step and direction: what TensorFlow's log-uniform sampler drew
                           (recorded from the graph; it is TF's own sampler, as bilm-tf calls it)
  mask/input_<d>_<l>, mask/output_<d>   per step: the dropout keep masks of direction d's layer
                           l input (batch, unroll, dim) and of its top output (batch * unroll,
                           dim). To record them, DropoutWrapper's dropout and tf.nn.dropout are
                           replaced by x * (1 / keep_prob) * (uniform >= 1 - keep_prob), the same
                           distribution, at the same places of bilm-tf's graph.

train: runs train()'s loop for n_epochs * int(n_train_tokens / (batch_size * unroll_steps))
batches (train()'s own loop, but for its summaries and checkpoints, so that the final LSTM carry
can be kept) and writes the trained variables (TF names, trained/<variable>), the carry
(lstm_state/<d>/<l>/{c,h}) and JSON facts (result) to an npz; with --heldout it also runs
bilm-tf's own test() (batch 256, unroll 1, as bin/run_test.py) on them and records its
perplexity.

checkpoint: runs --steps of train()'s loop and saves what train() saves, where it saves it: a
TensorFlow checkpoint of every global variable (its Saver: the variables, their Adagrad slots,
global_step) as CHECKPOINT_DIR/model.ckpt-STEP with TF's `checkpoint` file, and options.json
beside it (the .meta graph is left out: nothing reads it). Then, as records of what TensorFlow
itself reads there: reference.npz (every variable by name, through tf.train.load_checkpoint)
and dump_weights.hdf5 (bilm-tf's own dump_weights on the directory); and vocab.txt, a copy of
--vocab.

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bilm_tf import _import_bilm  # noqa: E402

DIRECTION_SUFFIXES = ("", "_reverse")


class Recorder:
    """Stands in for TF's sampled softmax and dropout while bilm-tf builds its graph, keeping the
    tensors a step should fetch: the sampler's draws and the dropout keep masks."""

    def __init__(self, tf):
        self.tf = tf
        self.sampled: list = []        # per direction: (ids, true expected, sampled expected)
        self.output_masks: list = []   # per direction
        self.input_masks: dict = {}    # wrapper creation index -> list over time steps

    def install(self):
        tf, recorder = self.tf, self
        real_sampled_softmax_loss = tf.nn.sampled_softmax_loss

        def sampled_softmax_loss(weights, biases, labels, inputs, num_sampled, num_classes, num_true=1, **kwargs):
            # what tf.nn.sampled_softmax_loss draws when not given sampled_values
            sampled = tf.nn.log_uniform_candidate_sampler(
                true_classes=tf.cast(labels, tf.int64), num_true=num_true, num_sampled=num_sampled, unique=True,
                range_max=num_classes)
            recorder.sampled.append(sampled)
            return real_sampled_softmax_loss(weights, biases, labels, inputs, num_sampled, num_classes,
                                             num_true=num_true, sampled_values=sampled, **kwargs)

        def keep(x, keep_prob):
            mask = tf.cast(tf.random_uniform(tf.shape(x)) >= 1.0 - keep_prob, x.dtype)
            return x * (1.0 / keep_prob) * mask, mask

        def dropout(x, keep_prob=None, **kwargs):
            if keep_prob == 1.0:  # what tf.nn.dropout gives
                return x
            out, mask = keep(x, keep_prob)
            recorder.output_masks.append(mask)
            return out

        class DropoutWrapper(tf.nn.rnn_cell.DropoutWrapper):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._index = len(recorder.input_masks)
                recorder.input_masks[self._index] = []

            def _dropout(self, values, salt_prefix, recurrent_noise, keep_prob, shallow_filtered_substructure=None):
                assert salt_prefix == "input", "bilm-tf drops LSTM inputs only"
                out, mask = keep(values, keep_prob)
                recorder.input_masks[self._index].append(mask)
                return out

        tf.nn.sampled_softmax_loss = sampled_softmax_loss
        tf.nn.dropout = dropout
        tf.nn.rnn_cell.DropoutWrapper = DropoutWrapper

    def fetches(self, n_layers: int) -> dict:
        tf, out = self.tf, {}
        for d, (ids, true_expected, sampled_expected) in enumerate(self.sampled):
            out[f"sampled/ids/{d}"] = ids
            out[f"sampled/true_expected_count/{d}"] = tf.reshape(true_expected, [-1])
            out[f"sampled/sampled_expected_count/{d}"] = sampled_expected
        for d, mask in enumerate(self.output_masks):
            out[f"mask/output_{d}"] = mask
        for index, masks in self.input_masks.items():
            if masks:  # cells are built direction by direction, layer by layer
                out[f"mask/input_{index // n_layers}_{index % n_layers}"] = tf.stack(masks, axis=1)
        return out


def training_graph(tf, options: dict):
    """bilm-tf's train() graph for one tower: (model, raw gradients, global norm, train op, optimizer)."""
    from bilm.training import LanguageModel, average_gradients, clip_grads

    global_step = tf.get_variable("global_step", [], initializer=tf.constant_initializer(0), trainable=False)
    optimizer = tf.train.AdagradOptimizer(learning_rate=options.get("learning_rate", 0.2),
                                          initial_accumulator_value=1.0)
    with tf.variable_scope("lm"):
        model = LanguageModel(options, True)
        grads = optimizer.compute_gradients(model.total_loss * options["unroll_steps"],
                                            aggregation_method=tf.AggregationMethod.EXPERIMENTAL_TREE)
    grads = average_gradients([grads], options["batch_size"], options)
    norm = tf.global_norm([g for g, _ in grads])  # what clip_by_global_norm computes
    clipped, _ = clip_grads(grads, options, False, global_step)
    train_op = optimizer.apply_gradients(clipped, global_step=global_step)
    return model, grads, norm, train_op, optimizer


def all_variables(tf, optimizer) -> dict:
    """name -> variable for the trainable variables and their Adagrad slots."""
    out = {}
    for v in tf.trainable_variables():
        out[v.op.name] = v
        out[optimizer.get_slot(v, "accumulator").op.name] = optimizer.get_slot(v, "accumulator")
    return out


def input_names(model, options: dict) -> list[str]:
    names = ["tokens_characters" if "char_cnn" in options else "token_ids", "next_token_id"]
    return [n + s for s in DIRECTION_SUFFIXES[:1 + bool(options.get("bidirectional"))] for n in names]


def _feed(model, batch: dict, names: list[str], state_tensors, state_values) -> dict:
    feed = dict(zip(state_tensors, state_values))
    feed.update({getattr(model, name): batch[name] for name in names})
    return feed


def _initial_state(session, model, batch: dict, names: list[str]):
    return session.run(model.init_lstm_state, {getattr(model, n): batch[n] for n in names if "next" not in n})


def _steps(tf, bilm, args, options: dict, recorder: Optional[Recorder] = None):
    """train()'s loop over bilm-tf's graph, seeded: yields (step, batch, fetched values, session,
    variables) after each of the options' batches. The fetched values hold the loss, the
    directions' losses, the global norm, the new LSTM carry (fed to the next step), what the
    recorder records, and at step 1 the gradients before the update."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    tf.set_random_seed(args.seed)
    if recorder is not None:
        recorder.install()
    model, grads, norm, train_op, optimizer = training_graph(tf, options)
    variables = all_variables(tf, optimizer)
    names = input_names(model, options)
    vocab = bilm.training.load_vocab(args.vocab, options.get("char_cnn", {}).get("max_characters_per_token"))
    batches = bilm.data.BidirectionalLMDataset(args.train, vocab, test=False, shuffle_on_load=True).iter_batches(
        options["batch_size"], options["unroll_steps"])
    fetch = {"loss": model.total_loss, "losses": model.individual_losses, "grad_norm": norm,
             "state": model.final_lstm_state, "train": train_op,
             "stochastic": recorder.fetches(options["lstm"].get("n_layers", 1)) if recorder else {}}
    first = {"grads": {v.op.name: tf.convert_to_tensor(g) for g, v in grads if g is not None}}
    with tf.Session() as session:
        session.run(tf.global_variables_initializer())
        yield 0, None, None, session, variables
        state = None
        for step in range(1, n_batches(options, args.steps) + 1):
            batch = next(batches)
            state = _initial_state(session, model, batch, names) if state is None else state
            values = session.run({**fetch, **(first if step == 1 else {})},
                                 _feed(model, batch, names, model.init_lstm_state, state))
            state = values["state"]
            yield step, {name: batch[name] for name in names}, values, session, variables


def n_batches(options: dict, steps: int = 0) -> int:
    """`steps`, or train()'s number: n_epochs * int(n_train_tokens / (batch_size * unroll_steps))."""
    return steps or options["n_epochs"] * int(options["n_train_tokens"] / (options["batch_size"] * options["unroll_steps"]))


def _carry(state, options: dict, prefix: str) -> dict:
    """The LSTM carry as arrays named prefix/<direction>/<layer>/{c,h}."""
    out = {}
    for d, direction_state in enumerate(state):
        layers = direction_state if options["lstm"].get("n_layers", 1) > 1 else (direction_state,)
        for layer, (c, h) in enumerate(layers):
            out[f"{prefix}/{d}/{layer}/c"], out[f"{prefix}/{d}/{layer}/h"] = c, h
    return out


def record(args, tf, bilm) -> dict:
    options = json.loads(open(args.options).read())
    snapshots = {int(s) for s in args.snapshots.split(",") if s}
    out: dict = {"options": np.array(json.dumps(options))}
    per_step: dict = {}
    for step, batch, values, session, variables in _steps(tf, bilm, args, options, Recorder(tf)):
        if step == 0:
            out.update({f"init/{k}": v for k, v in session.run(variables).items()})
            continue
        for name, value in batch.items():
            per_step.setdefault(f"batch/{name}", []).append(value)
        per_step.setdefault("loss", []).append(values["loss"])
        for d, loss in enumerate(values["losses"]):
            per_step.setdefault(("forward_loss", "backward_loss")[d], []).append(loss)
        per_step.setdefault("grad_norm", []).append(values["grad_norm"])
        for k, v in values["stochastic"].items():
            per_step.setdefault(k, []).append(v)
        if step == 1:
            out.update({f"grad/{k}": v for k, v in values["grads"].items()})
        if step in snapshots:
            out.update({f"after_{step}/{k}": v for k, v in session.run(variables).items()})
            out.update(_carry(values["state"], options, f"lstm_state_after_{step}"))
    for k, v in per_step.items():
        v = np.stack(v)
        if k.startswith("mask/"):
            v = v.astype(bool)
        elif k.startswith("batch/"):
            v = v.astype(np.int16 if "characters" in k else np.int32)
        out[k] = v
    _save_npz(args.out, out)
    return {"record": args.out, "steps": len(out["loss"]), "final_loss": float(out["loss"][-1]),
            "sample_softmax": options.get("sample_softmax", True), "dropout": options["dropout"]}


def train(args, tf, bilm) -> dict:
    """train()'s loop to the end, its trained variables and final LSTM carry; with --heldout,
    bilm-tf's test() on them."""
    from bilm.training import test as bilm_test

    options = json.loads(open(args.options).read())
    start = time.perf_counter()
    for step, _, values, session, variables in _steps(tf, bilm, args, options):
        if step == n_batches(options):
            trained = session.run({k: v for k, v in variables.items() if not k.endswith("/Adagrad")})
            carry = _carry(values["state"], options, "lstm_state")
            checkpoint = tf.train.Saver().save(session, os.path.join(tempfile.mkdtemp(prefix="bilm_tf_"), "model.ckpt"))
    result = {"seed": args.seed, "train_seconds": time.perf_counter() - start, "batches": n_batches(options),
              "final_loss": float(values["loss"])}
    if args.heldout:
        tf.reset_default_graph()
        _end_test_streams(bilm)
        vocab = bilm.training.load_vocab(args.vocab, options.get("char_cnn", {}).get("max_characters_per_token"))
        heldout = bilm.data.BidirectionalLMDataset(args.heldout, vocab, test=True, shuffle_on_load=False)
        perplexity = float(bilm_test(options, checkpoint, heldout, batch_size=256))
        # (NaN when the heldout text fills no whole batch of 256 rows: test() drops partial ones)
        result["bilm_tf_test_perplexity"] = perplexity if np.isfinite(perplexity) else None
    _save_npz(args.out, {**{f"trained/{k}": v for k, v in trained.items()}, **carry,
                         "options": np.array(json.dumps(options)), "result": np.array(json.dumps(result))})
    return result


def checkpoint(args, tf, bilm) -> dict:
    """train()'s checkpoint after --steps steps, with TensorFlow's own reading of it."""
    import shutil

    from bilm.training import dump_weights

    options = json.loads(open(args.options).read())
    os.makedirs(args.out, exist_ok=True)
    for step, _, _, session, _ in _steps(tf, bilm, args, options):
        if step == n_batches(options, args.steps):
            saver = tf.train.Saver(tf.global_variables(), max_to_keep=2)  # as train() does
            prefix = saver.save(session, os.path.join(args.out, "model.ckpt"), global_step=step,
                                write_meta_graph=False)
    with open(os.path.join(args.out, "options.json"), "w") as f:  # as train() writes it
        f.write(json.dumps(options))
    shutil.copyfile(args.vocab, os.path.join(args.out, "vocab.txt"))
    reader = tf.train.load_checkpoint(prefix)
    reference = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    _save_npz(os.path.join(args.out, "reference.npz"), reference)
    tf.reset_default_graph()
    dump_weights(args.out, os.path.join(args.out, "dump_weights.hdf5"))
    return {"checkpoint": prefix, "variables": len(reference), "steps": step}


def _end_test_streams(bilm):
    """bilm's test streams end by raising StopIteration inside a generator, which Python 3.7 and
    later turn into a RuntimeError (PEP 479): end them with a return instead, as intended."""
    original = bilm.data.LMDataset.get_sentence

    def get_sentence(self):
        try:
            yield from original(self)
        except RuntimeError as e:
            if not isinstance(e.__cause__, StopIteration):
                raise

    bilm.data.LMDataset.get_sentence = get_sentence


def _save_npz(path: str, arrays: dict) -> None:
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", choices=["record", "train", "checkpoint"])
    parser.add_argument("--options", required=True, help="a bilm-tf training options.json")
    parser.add_argument("--vocab", required=True)
    parser.add_argument("--train", required=True, help="glob of the training shards")
    parser.add_argument("--heldout", default="", help="train: glob of the heldout shards, for bilm-tf's test()")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0,
                        help="record, checkpoint: this many steps (default: the options')")
    parser.add_argument("--snapshots", default="1", help="record: steps after which every variable is saved")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # bilm prints as it builds and trains; stdout is for the JSON
    try:
        tf, bilm = _import_bilm()
        result = {"record": record, "train": train, "checkpoint": checkpoint}[args.work](args, tf, bilm)
    finally:
        sys.stdout = stdout
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
