"""How many cores XLA:CPU gives a `lax.scan` loop body: time per iteration and cores busy
(the process's CPU time over wall time) for the bodies RESULTS.md's issue #27 fourth part
reports, at the small char recurrence's sizes.

  python benchmarks/loop_cores.py                 # 20 iterations a call, 50 calls a body

  hidden product   the step's hidden-to-gates product alone, 2 directions batched
  two chains       the cell step (product, gates, clip, projection) as two independent
                   per-direction chains in one body
  products N       six NxNxN products, each followed by tanh, in two independent chains

Prints a table on stderr and one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def bodies(batch: int, dim: int, projection: int):
    """{name: (body(carry) -> carry, initial carry)} of the loops measured."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)

    def array(*shape, scale=0.1):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32) * scale)

    w_hidden, w_proj = array(2, projection, 4 * dim), array(2, dim, projection)

    def cell(h, c, w, p):
        i, j, f, o = jnp.split(jnp.tanh(h @ w), 4, axis=-1)
        c = jnp.clip(f * c + i * j, -3, 3)
        return jnp.clip((o * jnp.tanh(c)) @ p, -3, 3), c

    def products(a, b):
        def body(carry):
            x, y = carry
            for _ in range(3):
                x, y = jnp.tanh(x @ a), jnp.tanh(y @ b)
            return x, y
        return body, (a, b)

    h, c = array(batch, projection), jnp.zeros((batch, dim))
    return {
        "hidden product": (lambda h: jnp.einsum("dbk,dkn->dbn", h, w_hidden)[..., :projection],
                           array(2, batch, projection)),
        "two chains": (lambda carry: tuple(cell(*carry[d], w_hidden[d], w_proj[d]) for d in range(2)),
                       ((h, c), (h, c))),
        "products 128": products(array(128, 128, scale=0.05), array(128, 128, scale=0.05)),
        "products 256": products(array(256, 256, scale=0.05), array(256, 256, scale=0.05)),
    }


def measure(body, carry, iterations: int, calls: int) -> tuple[float, float]:
    """(microseconds an iteration, cores busy) of a jitted scan of `iterations` bodies."""
    import jax
    from jax import lax

    loop = jax.jit(lambda x: lax.scan(lambda x, _: (body(x), None), x, None, length=iterations)[0])
    jax.block_until_ready(loop(carry))
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(calls):
        out = loop(carry)
    jax.block_until_ready(out)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall / calls / iterations * 1e6, cpu / wall


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--projection", type=int, default=64)
    args = parser.parse_args(argv)
    import elmojax

    elmojax.setup()
    loops = {}
    for name, (body, carry) in bodies(args.batch, args.dim, args.projection).items():
        us, cores = measure(body, carry, args.iterations, args.calls)
        loops[name] = {"us_per_iteration": us, "cores_busy": cores}
    result = {"benchmark": "loop_cores", "iterations": args.iterations, "calls": args.calls,
              "sizes": {"batch": args.batch, "dim": args.dim, "projection": args.projection},
              "loops": loops, "environment": common.environment()}
    common.report(result, [(name, f"{v['us_per_iteration']:8.1f} us an iteration, {v['cores_busy']:.2f} cores busy")
                           for name, v in loops.items()])
    return result


if __name__ == "__main__":
    main()
