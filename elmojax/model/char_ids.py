"""Char id arrays cut to what the char CNN needs, in NumPy on the host, for training batches
and inference alike: each distinct token once (distinct_tokens), and rows cut short past their
longest word (trim_char_ids, for CharCNNEmbedder's `tail_ids`)."""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np


@functools.lru_cache(maxsize=None)
def _row_hash_multipliers(width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(1, 2**63, size=width, dtype=np.uint64) | np.uint64(1)


def distinct_tokens(char_ids: np.ndarray, min_bucket: int = 64, size: Optional[int] = None,
                    multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(distinct char-id rows, index of each token's row). The rows are padded with zeros to
    `size`, or else to a power of two (at least min_bucket), then to a multiple of `multiple`."""
    rows = np.ascontiguousarray(char_ids.reshape(-1, char_ids.shape[-1]))
    # Rows are told apart by a 64-bit hash (sorting integers is twice as fast as sorting rows as
    # byte strings), checked: on a collision, by the rows themselves.
    keys = rows.astype(np.uint64) @ _row_hash_multipliers(rows.shape[1])
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    if not np.array_equal(rows[first][inverse], rows):
        keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    size = size or max(min_bucket, 1 << (len(first) - 1).bit_length())
    size = -(-size // multiple) * multiple
    distinct = np.zeros((size, rows.shape[1]), rows.dtype)
    distinct[: len(first)] = rows[first]
    return distinct, inverse.reshape(char_ids.shape[:-1]).astype(np.int32)


def trim_char_ids(char_ids: np.ndarray, max_width: int, multiple: int = 8) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Cuts (tokens, chars) ids short for CharCNNEmbedder's `tail_ids`: (ids[:, :k], tail_ids),
    where each row's tail id is its last id, which fills the row from its tail's start on, and k
    (a multiple of `multiple`) reaches max_width - 1 past the latest tail start, so that every
    window left out lies wholly in its row's tail. (ids, None) when nothing would be cut."""
    tokens, n_chars = char_ids.shape
    tail_ids = char_ids[:, -1]
    differs = char_ids != tail_ids[:, None]
    tail_start = np.where(differs.any(axis=1), n_chars - np.argmax(differs[:, ::-1], axis=1), 0)
    keep = max(-(-(int(tail_start.max(initial=0)) + max_width - 1) // multiple) * multiple, max_width)
    if keep >= n_chars:
        return char_ids, None
    return np.ascontiguousarray(char_ids[:, :keep]), tail_ids
