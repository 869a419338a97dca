#!/usr/bin/env bash
# Train (or evaluate, or export) an elmojax biLM on one host with all of its GPUs: one
# process drives every local device (data parallel over a jax.sharding Mesh of all of them).
#
#   launch/local.sh                                   billion_word recipe on data/1b (see launch/README.md)
#   DATA=data/mine WORKDIR=workdir/mine CONFIG=configs/small.py launch/local.sh
#   EXTRA_ARGS='--mode=evaluate' launch/local.sh      arguments after the script's name are passed on too
#
# Rerunning the same command resumes from the workdir's latest checkpoint. Every variable is
# explained in launch/README.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PYTHON="${PYTHON:-python}"
CONFIG="${CONFIG:-$REPO/configs/billion_word.py}"
WORKDIR="${WORKDIR:-workdir/billion_word}"
DATA="${DATA:-data/1b}"
# Unset: the layout python -m elmojax.prepare writes under $DATA. Set to override (globs are
# passed to elmojax unexpanded); HELDOUT_PREFIX='' turns the heldout evaluation after training off.
TRAIN_PREFIX="${TRAIN_PREFIX-$DATA/train/shard-*.txt}"
HELDOUT_PREFIX="${HELDOUT_PREFIX-$DATA/heldout/shard-*.txt}"
VOCAB_FILE="${VOCAB_FILE-$DATA/vocab.txt}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

# XLA/JAX for GPUs. JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of each
# GPU's memory; left at its default here (see launch/README.md). Overlapping the gradient
# all-reduce with compute helps with several GPUs; set XLA_FLAGS yourself (even to '') to replace it.
export XLA_FLAGS="${XLA_FLAGS---xla_gpu_enable_latency_hiding_scheduler=true}"
# elmojax from this checkout, whether or not it is pip-installed.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

read -r -a extra <<< "$EXTRA_ARGS"
cmd=("$PYTHON" -m elmojax.main
     "--config=$CONFIG"
     "--workdir=$WORKDIR"
     "--config.data.train_prefix=$TRAIN_PREFIX"
     "--config.data.heldout_prefix=$HELDOUT_PREFIX"
     "--config.data.vocab_file=$VOCAB_FILE"
     ${extra[@]+"${extra[@]}"} "$@")

{
    echo "launch/local.sh on $(hostname)"
    if command -v nvidia-smi > /dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null || true
    fi
    for var in XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION XLA_PYTHON_CLIENT_PREALLOCATE JAX_PLATFORMS CUDA_VISIBLE_DEVICES; do
        if [[ -n "${!var+set}" ]]; then
            printf '  %s=%q\n' "$var" "${!var}"
        fi
    done
    printf '+'
    printf ' %q' "${cmd[@]}"
    printf '\n'
} >&2

exec "${cmd[@]}"
