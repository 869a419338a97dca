"""Checks of arguments where they enter the public API (inference's classes and functions, the
dumps, the datasets): one TypeError or ValueError naming the argument, instead of a failure deep
inside jnp."""

from __future__ import annotations

import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r:.60}")
    return bool(value)


def check_int(name: str, value, minimum: Optional[int] = None, wrong_type: type = TypeError) -> int:
    """`value` as an int (numpy's integers too; not a bool) of at least `minimum`: otherwise an
    error naming the argument, a `wrong_type` for another type (a ValueError where a caller
    documents one error for any wrong value), a ValueError for a smaller integer."""
    wanted = ("an integer" if minimum is None else "a positive integer" if minimum == 1
              else f"an integer of at least {minimum}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise wrong_type(f"{name} must be {wanted}, got {value!r:.60}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {wanted}, got {value}")
    return int(value)


def check_real(name: str, value, low: Optional[float] = None, high: Optional[float] = None,
               high_open: bool = False, what: str = "") -> float:
    """A finite real number in [low, high] (or [low, high) when high_open)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r:.60}")
    value = float(value)
    if (not math.isfinite(value) or (low is not None and value < low)
            or (high is not None and (value >= high if high_open else value > high))):
        interval = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {'in ' + interval if low is not None or high is not None else 'finite'}"
                         f"{what}, got {value!r}")
    return value


def check_path(name: str, value, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise TypeError(f"{name} must be a file name or an http(s) URL, got {value!r:.60}")
    return value


def check_array(name: str, value, ndim: Optional[int] = None, kind: str = "real", shape_doc: str = ""):
    """value as an array (jax and numpy arrays, tracers too, as they are; lists made numpy),
    of `ndim` dimensions and of `kind`: 'real' (floats or integers), 'float', 'int' or 'mask'
    (booleans, or numbers that check_mask_values then finds 0 or 1)."""
    wanted = {"float": "floats", "int": "integers", "mask": "booleans (or 0s and 1s)", "real": "numbers"}[kind]
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        try:
            value = np.asarray(value)
        except (ValueError, TypeError) as e:
            raise TypeError(f"{name} must be an array of {wanted}{shape_doc}; got {type(value).__name__} "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    dtype = value.dtype
    ok = {"float": jnp.issubdtype(dtype, jnp.floating),
          "int": jnp.issubdtype(dtype, jnp.integer),
          "mask": jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.number),
          "real": jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)}[kind]
    if not ok:
        raise TypeError(f"{name} must be an array of {wanted}{shape_doc}, got dtype {dtype}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{shape_doc}, got shape {tuple(value.shape)}")
    return value


def check_mask_values(name: str, mask) -> None:
    """A mask of numbers holds only 0s and 1s (looked at where its values are known)."""
    if not jnp.issubdtype(mask.dtype, jnp.bool_) and concrete(mask):
        values = np.asarray(mask)
        if values.size and not np.all((values == 0) | (values == 1)):
            raise ValueError(f"{name} must hold only 0s and 1s (or booleans), got values in "
                             f"[{values.min()}, {values.max()}]")


def concrete(x) -> bool:
    """Whether x's values can be looked at (not a tracer inside jit or grad)."""
    return not isinstance(x, jax.core.Tracer)
