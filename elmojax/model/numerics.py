"""How the matrix products and convolutions compute (`Numerics`, one value given to the model,
the training step, the losses and scoring), and the jit that compiles the steps.

float32 operands (compute_dtype "float32") are the default and the parity reference.
"bfloat16", for GPUs, rounds the operands of every matrix product and convolution to bfloat16
(their gradients' products too) and accumulates in float32; everything else (gates, cell
state, softmax) stays float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
PRECISIONS = ("default", "high", "highest")


# Wider vectors speed up the LSTM's elementwise tanh and exp on CPUs with AVX-512
# (benchmarks/RESULTS.md); other backends do not read xla_cpu_* options.
CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


def jit(fun, **kwargs):
    """jax.jit, with CPU_COMPILER_OPTIONS when JAX computes on the CPU."""
    if jax.default_backend() == "cpu":
        kwargs["compiler_options"] = {**CPU_COMPILER_OPTIONS, **kwargs.get("compiler_options", {})}
    return jax.jit(fun, **kwargs)


@dataclasses.dataclass(frozen=True)
class Numerics:
    """The numerics of every matrix product and convolution: lax's matmul `precision`
    ("default", which lets GPUs use TF32; "high"; "highest": full float32) and the operands'
    `compute_dtype` ("float32", or "bfloat16" with float32 accumulation)."""

    precision: str = "default"
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"matmul precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")

    @property
    def lax_precision(self) -> Optional[str]:
        """The precision as lax takes it (None: JAX's default)."""
        return None if self.precision == "default" else self.precision

    @property
    def dtype(self) -> Optional[Any]:
        """The operands' dtype (None: as they come, float32)."""
        return COMPUTE_DTYPES[self.compute_dtype]

    def einsum(self, subscripts: str, x: jax.Array, y: jax.Array) -> jax.Array:
        """jnp.einsum of two operands with these numerics."""
        return self._product(_Einsum(subscripts, self.lax_precision), x, y)

    def conv1d(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """'VALID' 1-D convolution of x (batch, width, in) with kernel (window, in, out)."""
        return self._product(_Conv1d(self.lax_precision), x, kernel)

    def _product(self, product: Callable, x: jax.Array, y: jax.Array) -> jax.Array:
        if self.dtype is None:
            return product(x, y, None)
        return _low_precision_product(product, x.astype(self.dtype), y.astype(self.dtype))


# Inference's numerics, the model's default: full float32 products (TF32 on GPUs would break
# parity with bilm-tf).
PARITY = Numerics(precision="highest")


@dataclasses.dataclass(frozen=True)
class _Einsum:
    subscripts: str
    precision: Optional[str]

    def __call__(self, x, y, result_type):
        return jnp.einsum(self.subscripts, x, y, precision=self.precision, preferred_element_type=result_type)


@dataclasses.dataclass(frozen=True)
class _Conv1d:
    precision: Optional[str]

    def __call__(self, x, kernel, result_type):
        return lax.conv_general_dilated(x, kernel, window_strides=(1,), padding="VALID",
                                        dimension_numbers=("NWC", "WIO", "NWC"), precision=self.precision,
                                        preferred_element_type=result_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _low_precision_product(product: Callable, x: jax.Array, y: jax.Array) -> jax.Array:
    """product(x, y) of low-precision operands, accumulated in float32. Its gradient's products
    take the float32 cotangent rounded to the operands' dtype (autodiff's would mix float32 and
    low-precision operands, which runs them in float32)."""
    return product(x, y, jnp.float32)


def _low_precision_fwd(product, x, y):
    return product(x, y, jnp.float32), (x, y)


def _low_precision_bwd(product, residuals, cotangent):
    x, y = residuals
    cotangent = cotangent.astype(x.dtype)  # the transposed products in the operands' dtype throughout
    (dx,) = jax.linear_transpose(lambda a: product(a, y, None), x)(cotangent)
    (dy,) = jax.linear_transpose(lambda b: product(x, b, None), y)(cotangent)
    return dx, dy


_low_precision_product.defvjp(_low_precision_fwd, _low_precision_bwd)
