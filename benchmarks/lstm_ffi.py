"""A hand-written CPU LSTM recurrence against elmojax's lax.scan one: the forward recurrence of
both directions (inference), as a prototype XLA FFI custom call with each direction on a thread
of its own (benchmarks/prototypes/lstm_ffi.cc, compiled here with g++), timed side by side with
`lstm_recurrence` on the same inputs, alternating. Not part of elmojax: it measures what such a
kernel would gain where XLA:CPU runs the recurrence on one core (RESULTS.md, issue #27).

  python benchmarks/lstm_ffi.py --size small_char     # training's sizes: 20 steps, batch 32, 256/64
  python benchmarks/lstm_ffi.py --size elmo_small     # one ELMo small layer: 32 steps, batch 64, 1024/128

Prints a table on stderr and one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prototypes", "lstm_ffi.cc")
# (time, batch, dim, projection) of each size; 2 directions
SIZES = {"small_char": (20, 32, 256, 64), "elmo_small": (32, 64, 1024, 128)}


def build() -> str:
    """The kernel's shared library, compiled once per change of its source."""
    import jax.ffi

    library = os.path.join(common.CACHE, "lstm_ffi", "liblstm_ffi.so")
    if not os.path.exists(library) or os.path.getmtime(library) < os.path.getmtime(SOURCE):
        os.makedirs(os.path.dirname(library), exist_ok=True)
        subprocess.run(["g++", "-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC",
                        "-w", "-I", jax.ffi.include_dir(), SOURCE, "-o", library, "-lpthread"], check=True)
    return library


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small_char")
    parser.add_argument("--shape", type=int, nargs=4, metavar=("TIME", "BATCH", "DIM", "PROJECTION"),
                        help="instead of --size")
    parser.add_argument("--calls", type=int, default=50, help="calls a round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import elmojax

    elmojax.setup()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from elmojax.model import lstm, numerics

    time_steps, batch, dim, projection = args.shape or SIZES[args.size]
    jax.ffi.register_ffi_target("elmojax_lstm_forward", jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(build()).LstmForward),
                                platform="cpu")
    rng = np.random.default_rng(0)

    def array(*shape, scale=1.0):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32) * scale)

    inputs = (array(2, time_steps, batch, 4 * dim), jnp.asarray(rng.random((2, time_steps, batch)) < 0.9),
              array(2, batch, dim, scale=0.1), array(2, batch, projection, scale=0.1),
              array(2, projection, 4 * dim, scale=0.1), array(2, 4 * dim, scale=0.1), array(2, dim, projection, scale=0.1))
    settings = lstm.RecurrenceSettings(cell_clip=3.0, proj_clip=3.0)

    def scan(gates, mask, c, h, w_hidden, bias, w_proj):
        outputs, (c, h) = lstm.lstm_recurrence(gates, mask, (c, h), (w_hidden, bias, w_proj), settings)
        return outputs, c, h

    def kernel(gates, mask, c, h, w_hidden, bias, w_proj):
        shapes = [jax.ShapeDtypeStruct(s, jnp.float32)
                  for s in ((2, time_steps, batch, projection), (2, batch, dim), (2, batch, projection))]
        return jax.ffi.ffi_call("elmojax_lstm_forward", shapes)(
            gates, mask, c, h, w_hidden, bias, w_proj, cell_clip=np.float32(3.0), proj_clip=np.float32(3.0))

    functions = {"lax.scan": numerics.jit(scan), "kernel": numerics.jit(kernel)}
    results = {name: jax.device_get(f(*inputs)) for name, f in functions.items()}
    difference = max(float(np.abs(a - b).max()) for a, b in zip(results["lax.scan"], results["kernel"]))
    times = {name: [] for name in functions}
    for _ in range(args.rounds):
        for name, f in functions.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                out = f(*inputs)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / args.calls * 1e3)
    ms = {name: float(np.median(v)) for name, v in times.items()}
    result = {"benchmark": "lstm_ffi", "shape": {"directions": 2, "time": time_steps, "batch": batch, "dim": dim,
                                                 "projection": projection},
              "ms": ms, "ms_rounds": times, "speedup": ms["lax.scan"] / ms["kernel"], "max_abs_difference": difference,
              "environment": common.environment()}
    common.report(result, [("shape", f"2 directions x {time_steps} steps x batch {batch}, LSTM {dim}/{projection}"),
                           ("lax.scan", f"{ms['lax.scan']:.3f} ms a call"),
                           ("kernel", f"{ms['kernel']:.3f} ms a call ({result['speedup']:.2f}x)"),
                           ("max |difference|", f"{difference:.1e}")])
    return result


if __name__ == "__main__":
    main()
