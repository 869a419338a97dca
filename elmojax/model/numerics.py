"""Matrix products and convolutions in a chosen compute dtype, and the jit that compiles the steps.

float32 (compute_dtype None) is the default and the parity reference. compute_dtype
jnp.bfloat16, for GPUs, rounds the operands of every matrix product and convolution to
bfloat16 and accumulates in float32; everything else (gates, cell state, softmax) stays float32.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


# XLA:CPU vectorizes elementwise code 256 bits wide unless told otherwise; at 512 its tanh and
# exp, most of an LSTM step's elementwise work, run about 1.6x faster on CPUs with AVX-512 (and
# as before on others). Other backends do not read xla_cpu_* options.
CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


def jit(fun, **kwargs):
    """jax.jit, with CPU_COMPILER_OPTIONS when JAX computes on the CPU."""
    if jax.default_backend() == "cpu":
        kwargs["compiler_options"] = {**CPU_COMPILER_OPTIONS, **kwargs.get("compiler_options", {})}
    return jax.jit(fun, **kwargs)


def compute_dtype(name: str) -> Optional[Any]:
    """The compute dtype for its config name ("float32" or "bfloat16")."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[name]


def _operands(dtype, *arrays):
    if dtype is None:
        return arrays, None
    return tuple(a.astype(dtype) for a in arrays), jnp.float32


def einsum(subscripts: str, x: jax.Array, y: jax.Array, *, precision: Any = None,
           compute_dtype: Optional[Any] = None) -> jax.Array:
    (x, y), result_type = _operands(compute_dtype, x, y)
    return jnp.einsum(subscripts, x, y, precision=precision, preferred_element_type=result_type)


def conv1d(x: jax.Array, kernel: jax.Array, *, precision: Any = None,
           compute_dtype: Optional[Any] = None) -> jax.Array:
    """'VALID' 1-D convolution of x (batch, width, in) with kernel (window, in, out)."""
    (x, kernel), result_type = _operands(compute_dtype, x, kernel)
    return lax.conv_general_dilated(x, kernel, window_strides=(1,), padding="VALID",
                                    dimension_numbers=("NWC", "WIO", "NWC"), precision=precision,
                                    preferred_element_type=result_type)
