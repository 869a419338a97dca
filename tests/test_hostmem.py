"""elmojax.process.hostmem: elmojax.setup() makes malloc keep freed memory, so that repeated jitted
calls stop page-faulting their buffers in; MALLOC_TOP_PAD_ in the environment opts out;
give_back_freed_memory() returns what it kept."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's M_TOP_PAD is glibc's"),
              pytest.mark.slow]

# Repeated calls of a jitted function whose temporaries (several MiB) are allocated anew on every
# call, after `elmojax.setup()`: calls(n) makes n of them.
CALLS = r"""
import resource
import elmojax
elmojax.setup()
import jax, jax.numpy as jnp

@jax.jit
def step(x):
    y = jnp.tanh(x) * 2.0
    z = jnp.concatenate([y, x], axis=0) @ jnp.ones((x.shape[1], x.shape[1]), x.dtype)
    return jnp.sum(z) + jnp.sum(y[::-1] * x)

x = jnp.ones((2048, 512), jnp.float32)

def calls(n):
    for _ in range(n):
        jax.block_until_ready(step(x))
"""

# Minor page faults per call.
FAULTS_PER_CALL = CALLS + r"""
calls(3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
calls(20)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""

# VmRSS before and after give_back_freed_memory(), once the calls have left freed memory in
# malloc's heaps.
GIVE_BACK = CALLS + r"""
from elmojax.process import hostmem

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

calls(10)
before = rss_mib()
print(hostmem.give_back_freed_memory(), before, rss_mib())
"""


def run_python(code: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_TOP_PAD_"}
    environment.update(JAX_PLATFORMS="cpu", **env)
    return subprocess.run([sys.executable, "-c", code], env=environment, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_keep_freed_memory_takes_unless_the_environment_says_otherwise():
    code = "from elmojax.process import hostmem; print(hostmem.keep_freed_memory())"
    assert run_python(code) == "True"
    assert run_python(code, MALLOC_TOP_PAD_="131072") == "False"


def test_import_stops_page_faults_of_repeated_calls():
    kept = float(run_python(FAULTS_PER_CALL))
    # glibc's default top pad (128 KiB), as if elmojax had not set it
    default = float(run_python(FAULTS_PER_CALL, MALLOC_TOP_PAD_="131072"))
    # ~8,300 faults per call with glibc's default, ~260 with the pad, on the development machine
    if default < 1000:  # e.g. transparent huge pages: few faults to save, nothing to compare
        pytest.skip(f"only {default:.0f} page faults per call with glibc's default here")
    assert kept < default / 4


def test_give_back_freed_memory_returns_what_malloc_kept():
    took, before, after = run_python(GIVE_BACK).split()
    assert took == "True"
    # 30-50 MiB on the development machine (the calls' 4-16 MiB buffers, kept by the pad)
    assert float(after) < float(before) - 8, (before, after)
