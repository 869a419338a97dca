#!/usr/bin/env bash
# The billion_word recipe and ELMo's original size on one GPU, in one run: benchmarks/gpu.py
# (its docstring says what runs). On a machine whose Python has JAX for the GPU, flax, optax,
# orbax-checkpoint and h5py but not this package's other needs, put their wheels in .whl/ (here,
# with network: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12
# --implementation cp --platform manylinux2014_x86_64 -d .whl ml_collections PyYAML tqdm); this
# installs them into /tmp/site first, where that interpreter lacks them. The elmojax it
# measures is this checkout's. PYTHON names the interpreter (default python3).
#
#   bash benchmarks/gpu.sh [--out DIR] [--only PART,...]
#   bash benchmarks/gpu.sh --smoke --out DIR     # on the CPU, small, under a minute
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"   # or another interpreter (a virtualenv's)
if ! "$PYTHON" -c "import ml_collections, yaml, tqdm" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" benchmarks/gpu.py "$@"
