"""Training speed: jitted train steps on packed bidirectional batches.

  python benchmarks/train.py --config small_char --runs 20
  python benchmarks/train.py --config elmo_small --batch 32 --negatives 8192 --vocab-size 13500

Configs: small_char (LSTM 256/64, 2 layers, skip, filters [[1,16],[2,16],[3,32],[4,64],[5,64]], char
dim 8, 1 highway), elmo_small (LSTM 1024/128, 2048 filters, 1 highway), billion_word (the reference
recipe, at its batch of 128 per device). Batches come from the bundled corpus sample through the
real data pipeline; the vocabulary is its own, padded with unused entries to --vocab-size (the
softmax's size). Tokens are batch x unroll_steps per step. Prints a table on stderr and one JSON
object on stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CONFIGS = {
    "small_char": dict(
        char_cnn=dict(filters=[[1, 16], [2, 16], [3, 32], [4, 64], [5, 64]], embedding=dict(dim=8), n_highway=1,
                      activation="relu", n_characters=261, max_characters_per_token=50),
        lstm=dict(dim=256, projection_dim=64, n_layers=2, cell_clip=3.0, proj_clip=3.0, use_skip_connections=True),
        negatives=256, vocab_size=5000, batch=32),
    "elmo_small": dict(
        char_cnn=dict(filters=common.ELMO_FILTERS, embedding=dict(dim=16), n_highway=1, activation="relu",
                      n_characters=261, max_characters_per_token=50),
        lstm=dict(dim=1024, projection_dim=128, n_layers=2, cell_clip=3.0, proj_clip=3.0, use_skip_connections=True),
        negatives=8192, vocab_size=13500, batch=32),
    "billion_word": dict(
        char_cnn=dict(filters=common.ELMO_FILTERS, embedding=dict(dim=16), n_highway=2, activation="relu",
                      n_characters=261, max_characters_per_token=50),
        lstm=dict(dim=4096, projection_dim=512, n_layers=2, cell_clip=3.0, proj_clip=3.0, use_skip_connections=True),
        negatives=8192, vocab_size=793471, batch=128),  # the recipe's batch per device
}


def training_flops(c: dict, negatives: int) -> int:
    """Per token: forward (char CNN on both streams, both LSTMs, sampled softmax both ways) x 3
    for the backward pass."""
    projection_dim = c["lstm"]["projection_dim"]
    forward = 2 * common.char_cnn_flops(c["char_cnn"], projection_dim) + common.lstm_flops(c["lstm"])
    forward += 2 * 2 * projection_dim * (negatives + 1)
    return 3 * forward


def padded_vocab(size: int) -> str:
    """The sample's vocabulary, padded with unused tokens to `size` entries."""
    with open(os.path.join(common.SAMPLE, "vocab.txt"), encoding="utf-8") as f:
        tokens = f.read().split("\n")[:-1]
    tokens += [f"<unused{i}>" for i in range(max(0, size - len(tokens)))]
    path = os.path.join(tempfile.mkdtemp(prefix="elmojax_bench_"), "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small_char")
    parser.add_argument("--batch", type=int, default=0,
                        help="per device; default: the config's (32; billion_word's recipe: 128)")
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--negatives", type=int, default=0, help="default: the config's")
    parser.add_argument("--vocab-size", type=int, default=0, help="default: the config's")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--precision", default="default", help="matmul precision: default or highest")
    parser.add_argument("--unroll-scan", type=int, default=1, help="LSTM steps per scan iteration")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype of the matrix products (bfloat16: for GPUs)")
    parser.add_argument("--device", choices=["cpu", "gpu", "default"], default="default")
    parser.add_argument("--peak-gflops", type=float, default=0.0)
    args = parser.parse_args(argv)
    import elmojax

    elmojax.setup()  # the process-wide settings the command lines apply
    if args.device != "default":
        os.environ["JAX_PLATFORMS"] = args.device

    import jax

    from elmojax import data
    from elmojax.train.config import base_config
    from elmojax.train import config as config_lib, loop, trained_models, trainer as trainer_lib

    c = CONFIGS[args.config]
    batch_size = args.batch or c["batch"]
    negatives = args.negatives or c["negatives"]
    vocab_size = args.vocab_size or c["vocab_size"]
    config = base_config()
    config.model.char_cnn.update(c["char_cnn"])
    config.model.lstm.update(c["lstm"])
    config.train.update(batch_size=batch_size, unroll_steps=args.unroll, n_negative_samples_batch=negatives,
                        matmul_precision=args.precision, scan_unroll=args.unroll_scan, compute_dtype=args.dtype)
    config.data.update(train_prefix=os.path.join(common.SAMPLE, "train", "shard-*.txt"),
                       vocab_file=padded_vocab(vocab_size))
    vocab = trained_models.load_vocab(config)
    trainer = trainer_lib.Trainer(config, vocab.size)
    dataset = data.make_dataset(config_lib.streams(config), vocab, config.data.train_prefix, trainer.batch_size, args.unroll, test=False)
    batches = dataset.iter_batches()
    host_batches = [next(batches) for _ in range(args.runs + 1)]
    shapes = trainer.char_shapes(host_batches[: loop.SHAPE_SAMPLES])  # as the training loop lays its batches out
    device_batches = [trainer.put_batch(b, shapes) for b in host_batches]
    state = trainer.create_state(jax.random.PRNGKey(0))

    start = time.perf_counter()
    state, metrics = trainer.train_step(state, device_batches[0])
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    tokens = trainer.batch_size * args.unroll
    rates, losses = [], []
    for batch in device_batches[1:]:
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        rates.append(tokens / (time.perf_counter() - start))
        losses.append(float(metrics["loss"]))

    flops = training_flops(c, negatives)
    peak = args.peak_gflops or common.measure_matmul_gflops()
    result = {
        "benchmark": "train", "config": args.config, "batch_per_device": batch_size, "devices": trainer.n_devices,
        "unroll_steps": args.unroll, "negatives": negatives, "vocab_size": vocab.size, "runs": args.runs,
        "precision": args.precision, "scan_unroll": args.unroll_scan, "compute_dtype": args.dtype,
        **common.speed_result(rates, compile_seconds, flops, peak),
        "tokens_per_second_overall": len(rates) / sum(1 / r for r in rates),  # all steps' tokens / their time
        "final_loss": float(metrics["loss"]), "last_10_mean_loss": sum(losses[-10:]) / len(losses[-10:]),
        "environment": common.environment(),
    }
    common.report(result, [("config", f"{args.config}: batch {trainer.batch_size} x unroll {args.unroll}, "
                                      f"{negatives} negatives, vocab {vocab.size}, {args.dtype}")]
                  + common.speed_rows(result, "compile + first step"))
    return result


if __name__ == "__main__":
    main()
