"""bilm-tf on the work of inference.py, train.py and dump.py, for side-by-side figures on one machine.

It runs in an environment of its own (TensorFlow has no place in elmojax's):

  python -m venv /tmp/tf && /tmp/tf/bin/pip install 'tensorflow-cpu==2.15.1' bilm h5py
  python benchmarks/inference.py --size original        # writes the weights both read
  /tmp/tf/bin/python benchmarks/bilm_tf.py inference --size original
  /tmp/tf/bin/python benchmarks/bilm_tf.py inference --size fixture --latency
  /tmp/tf/bin/python benchmarks/bilm_tf.py train --config small_char
  python benchmarks/dump.py --size original --stateful   # writes the dataset both dump
  /tmp/tf/bin/python benchmarks/bilm_tf.py dump --size original

`bilm` is bilm-tf's package on PyPI (0.1.post5), written for TensorFlow 1.x; it runs here under
tf.compat.v1, as the issue's reference figures (TF 2.15) did.

inference: bilm-tf's BidirectionalLanguageModel on the same hdf5 files (benchmarks/.cache/SIZE/,
written by inference.py) and the same sentences; the tokens are the real tokens. As in bilm-tf's
own use, its LSTM state carries over from call to call. --outputs FILE writes the first call's
lm_embeddings (from zero state) to hdf5, to compare with elmojax's.

dump: bilm-tf's own dump_bilm_embeddings (bilm.dump_bilm_embeddings: one line a session call,
the state carried from line to line, one dataset per line) on the same weight files and dataset
file (benchmarks/.cache/dump/, written by dump.py with the same --lines, --min-length,
--max-length and --seed) into a temporary directory; each run is the whole call, building the
graph included, like dump.py's. Compare with `dump.py --stateful` (the same computation) and
with dump.py's default (batches from zero state).

train: the graph bilm-tf's train() builds for one tower (its LanguageModel, Adagrad with initial
accumulator 1.0, the loss scaled by unroll_steps, gradient averaging and clipping), fed by its own
BidirectionalLMDataset from the bundled sample, with train.py's model configs, vocabulary sizes,
negatives and batch. train() also writes summaries and checkpoints; those are left out.

Prints a table on stderr and one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import dump as dump_benchmark  # noqa: E402  (only its table, no JAX)
import train as train_benchmark  # noqa: E402  (only its configs, no JAX)


def _import_bilm():
    """tf.compat.v1 standing in for TensorFlow 1.x, which bilm imports as `tensorflow`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow.compat.v1 as tf

    tf.disable_v2_behavior()
    tf.logging.set_verbosity(tf.logging.ERROR)
    sys.modules["tensorflow"] = tf
    import bilm

    return tf, bilm


def _time(run, n_tokens: int, runs: int):
    """(the first call's result, its seconds, tokens/s of each later call)"""
    start = time.perf_counter()
    first = run()
    first_seconds = time.perf_counter() - start
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        rates.append(n_tokens / (time.perf_counter() - start))
    return first, first_seconds, rates


def inference(args, tf, bilm) -> dict:
    directory = os.path.join(common.CACHE, args.size)
    options_file = os.path.join(directory, "options.json")
    weight_file = os.path.join(directory, "lm_weights.hdf5")
    if not os.path.exists(weight_file):
        sys.exit(f"{weight_file} is missing: run `python benchmarks/inference.py --size {args.size}` first")
    batcher = bilm.Batcher(os.path.join(common.SAMPLE, "vocab.txt"), 50)
    sentences = common.sample_sentences(args.batch, args.min_length, args.max_length)
    ids = batcher.batch_sentences(sentences)
    n_tokens = sum(len(s) for s in sentences)
    char_ids = tf.placeholder("int32", shape=(None, None, 50))
    lm_embeddings = bilm.BidirectionalLanguageModel(options_file, weight_file)(char_ids)["lm_embeddings"]
    with tf.Session() as session:
        session.run(tf.global_variables_initializer())
        if args.latency:  # inference.py --latency's sentences, one call each, after one call to warm up
            n, shortest, longest = common.LATENCY_SENTENCES
            single = [batcher.batch_sentences([s]) for s in common.sample_sentences(n, shortest, longest)]
            session.run(lm_embeddings, {char_ids: single[0]})
            seconds = []
            for one in single:
                start = time.perf_counter()
                session.run(lm_embeddings, {char_ids: one})
                seconds.append(time.perf_counter() - start)
            return {"benchmark": "latency", "size": args.size, **common.latency_result(seconds)}
        first, first_seconds, rates = _time(lambda: session.run(lm_embeddings, {char_ids: ids}), n_tokens, args.runs)
    if args.outputs:
        import h5py

        with h5py.File(args.outputs + ".tmp", "w") as f:
            f.create_dataset("lm_embeddings", data=first)
        os.replace(args.outputs + ".tmp", args.outputs)
    flops = common.inference_flops(common.SIZES[args.size])
    return {"benchmark": "inference", "size": args.size, "batch": args.batch, "tokens_per_batch": n_tokens,
            "sentence_lengths": [args.min_length, args.max_length], "runs": args.runs,
            **_speed(rates, first_seconds, flops, args.peak_gflops)}


def dump(args, tf, bilm) -> dict:
    import shutil
    import tempfile

    directory = os.path.join(common.CACHE, args.size)
    options_file = os.path.join(directory, "options.json")
    weight_file = os.path.join(directory, "lm_weights.hdf5")
    if not os.path.exists(weight_file):
        sys.exit(f"{weight_file} is missing: run `python benchmarks/dump.py --size {args.size}` first")
    dataset = common.dump_dataset(args.lines, args.min_length, args.max_length, args.seed)
    n_lines, n_tokens = common.dataset_counts(dataset)
    seconds = []
    out_directory = tempfile.mkdtemp(prefix="bilm-tf-dump-benchmark-")
    try:
        for run in range(args.runs):
            out = os.path.join(out_directory, f"run{run}.hdf5")
            tf.reset_default_graph()  # each run builds its own graph, as a fresh process would
            start = time.perf_counter()
            bilm.dump_bilm_embeddings(os.path.join(common.SAMPLE, "vocab.txt"), dataset, options_file, weight_file,
                                      out)
            seconds.append(time.perf_counter() - start)
            output_mib = os.path.getsize(out) / 2**20
            os.remove(out)
    finally:
        shutil.rmtree(out_directory)
    return {"benchmark": "dump", "size": args.size, "lines": n_lines, "tokens": n_tokens,
            "sentence_lengths": [args.min_length, args.max_length], "seed": args.seed, "stateful": True,
            "runs": args.runs, "seconds": common.summarize(seconds),
            "sentences_per_second": common.summarize([n_lines / s for s in seconds]),
            "tokens_per_second": common.summarize([n_tokens / s for s in seconds]),
            "peak_rss_mib": common.peak_rss_mib(), "output_mib": output_mib}


def train(args, tf, bilm) -> dict:
    from bilm.training import LanguageModel, average_gradients, clip_grads

    c = train_benchmark.CONFIGS[args.config]
    batch, unroll = c["batch"], args.unroll
    vocab_file = train_benchmark.padded_vocab(c["vocab_size"])
    options = {"bidirectional": True, "char_cnn": c["char_cnn"], "lstm": c["lstm"], "dropout": 0.1,
               "n_tokens_vocab": c["vocab_size"], "n_negative_samples_batch": c["negatives"], "batch_size": batch,
               "unroll_steps": unroll, "all_clip_norm_val": 10.0, "n_epochs": 1, "n_train_tokens": 10**6}
    vocab = bilm.training.load_vocab(vocab_file, c["char_cnn"]["max_characters_per_token"])
    data = bilm.data.BidirectionalLMDataset(os.path.join(common.SAMPLE, "train", "shard-*.txt"), vocab,
                                            test=False, shuffle_on_load=True)
    # train()'s graph for one tower
    global_step = tf.get_variable("global_step", [], initializer=tf.constant_initializer(0), trainable=False)
    optimizer = tf.train.AdagradOptimizer(learning_rate=0.2, initial_accumulator_value=1.0)
    with tf.variable_scope("lm"):
        model = LanguageModel(options, True)
        grads = optimizer.compute_gradients(model.total_loss * unroll,
                                            aggregation_method=tf.AggregationMethod.EXPERIMENTAL_TREE)
    grads = average_gradients([grads], batch, options)
    grads, _ = clip_grads(grads, options, False, global_step)
    train_op = optimizer.apply_gradients(grads, global_step=global_step)

    inputs = ["tokens_characters", "tokens_characters_reverse", "next_token_id", "next_token_id_reverse"]
    batches = data.iter_batches(batch, unroll)
    with tf.Session() as session:
        session.run(tf.global_variables_initializer())
        state = session.run(model.init_lstm_state, {getattr(model, name): next(batches)[name] for name in inputs[:2]})
        last = {}

        def step():  # one batch, its final LSTM state fed to the next, as train() does
            nonlocal state
            feed = dict(zip(model.init_lstm_state, state))
            feed.update({getattr(model, name): values for name, values in next(batches).items() if name in inputs})
            _, last["loss"], *state = session.run([train_op, model.total_loss] + model.final_lstm_state, feed)

        _, first_seconds, rates = _time(step, batch * unroll, args.runs)
    flops = train_benchmark.training_flops(c, c["negatives"])
    return {"benchmark": "train", "config": args.config, "batch_per_device": batch, "unroll_steps": unroll,
            "negatives": c["negatives"], "vocab_size": c["vocab_size"], "runs": args.runs,
            **_speed(rates, first_seconds, flops, args.peak_gflops), "final_loss": float(last["loss"])}


def _speed(rates, first_seconds, flops, peak_gflops) -> dict:
    result = {"tokens_per_second": common.summarize(rates), "first_call_seconds": first_seconds,
              "peak_rss_mib": common.peak_rss_mib(), "flops_per_token": flops}
    if peak_gflops:
        result["machine_peak_gflops"] = peak_gflops
        result["fraction_of_peak_nominal"] = result["tokens_per_second"]["median"] * flops / (peak_gflops * 1e9)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", choices=["inference", "train", "dump"])
    parser.add_argument("--size", choices=sorted(common.SIZES), default="original", help="inference")
    parser.add_argument("--batch", type=int, default=64, help="inference: sentences per call")
    parser.add_argument("--min-length", type=int, default=None, help="inference: 20 (default), dump: 1")
    parser.add_argument("--max-length", type=int, default=None, help="inference: 30 (default), dump: 50")
    parser.add_argument("--lines", type=int, default=5000, help="dump: sentences in the dataset")
    parser.add_argument("--seed", type=int, default=0, help="dump: which sentences")
    parser.add_argument("--outputs", default="", help="inference: hdf5 file for the first call's lm_embeddings")
    parser.add_argument("--latency", action="store_true", help="inference: as inference.py --latency")
    parser.add_argument("--config", choices=sorted(train_benchmark.CONFIGS), default="small_char", help="train")
    parser.add_argument("--unroll", type=int, default=20, help="train")
    parser.add_argument("--runs", type=int, default=None, help="10 (default), dump: 1 (whole dumps)")
    parser.add_argument("--peak-gflops", type=float, default=0.0,
                        help="the machine's fp32 matmul rate (from elmojax's benchmarks), for the fraction")
    args = parser.parse_args(argv)
    defaults = {"min_length": 1, "max_length": 50, "runs": 1} if args.work == "dump" else \
        {"min_length": 20, "max_length": 30, "runs": 10}  # dump.py's and inference.py's
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.runs < 1:
        parser.error("--runs must be positive")
    with contextlib.redirect_stdout(sys.stderr):  # bilm prints as it builds; stdout is for the JSON
        tf, bilm = _import_bilm()
        work = {"inference": inference, "train": train, "dump": dump}[args.work]
        result = {"implementation": "bilm-tf", **work(args, tf, bilm)}
    import tensorflow

    result["environment"] = {**common.machine(), "tensorflow": tensorflow.__version__}
    if args.work == "dump":
        common.report(result, [("bilm-tf dump", "dump_bilm_embeddings")]
                      + dump_benchmark.dump_rows(result, "one a call, stateful"))
        return result
    if result["benchmark"] == "latency":
        common.report(result, [("bilm-tf latency", args.size)] + common.latency_rows(result))
        return result
    what = f"{args.size} / {args.batch} sentences" if args.work == "inference" else args.config
    rows = [("bilm-tf " + args.work, what),
            ("tokens/s (min/median/max)", "{min:.0f} / {median:.0f} / {max:.0f}".format(**result["tokens_per_second"])),
            ("first call", f"{result['first_call_seconds']:.2f} s"), ("peak RSS", f"{result['peak_rss_mib']:.0f} MiB")]
    common.report(result, rows)
    return result


if __name__ == "__main__":
    main()
