"""Char id arrays cut to what the char CNN needs, in NumPy on the host, for training batches
and inference alike: each distinct token once (distinct_tokens), and rows cut short past their
longest word (trim_char_ids, for CharCNNEmbedder's `tail_ids`). Training lays every batch out in
one fixed CharShapes (pack_chars), chosen from the run's first batches (choose_shapes), so that
its step compiles once, whatever each batch's longest word."""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

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
    n_chars = char_ids.shape[1]
    keep = max(-(-(int(_tail_starts(char_ids).max(initial=0)) + max_width - 1) // multiple) * multiple, max_width)
    if keep >= n_chars:
        return char_ids, None
    return np.ascontiguousarray(char_ids[:, :keep]), char_ids[:, -1]


def _tail_starts(rows: np.ndarray) -> np.ndarray:
    """Per row, where its tail begins: the run of its last id that fills it to the end."""
    differs = rows != rows[:, -1:]
    return np.where(differs.any(axis=1), rows.shape[1] - np.argmax(differs[:, ::-1], axis=1), 0)


class CharShapes(NamedTuple):
    """A character batch's fixed layout for the char CNN: `n_short` distinct tokens cut to
    `width` characters (with tail ids, see trim_char_ids) and `n_long` more at full width. A
    step compiled for it takes every batch that fits, whatever its longest word."""
    n_short: int
    width: int
    n_long: int = 0


def full_shapes(n_tokens: int, n_chars: int, multiple: int = 1) -> CharShapes:
    """The layout every batch of `n_tokens` tokens fits: all of them distinct, at full width."""
    return CharShapes(-(-n_tokens // multiple) * multiple, n_chars)


def _needed_widths(rows: np.ndarray, max_width: int) -> np.ndarray:
    """Per row, the fewest characters it can be cut to (as in trim_char_ids, without rounding)."""
    return np.minimum(_tail_starts(rows) + max_width - 1, rows.shape[1])


def _distinct_rows(char_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    distinct, index = distinct_tokens(char_ids, min_bucket=1)
    return distinct[: index.max(initial=-1) + 1], index


def choose_shapes(samples: Sequence[np.ndarray], max_width: int, multiple: int = 1,
                  margin: float = 1.25) -> CharShapes:
    """The layout for batches like `samples` (char id arrays) at the least char CNN work (rows x
    characters): a width in steps of 8, its short rows and the long ones the samples had, each
    count with `margin` to spare (at least 8 long rows), so that a batch rarely fits none but
    full_shapes (which it is when nothing less would do)."""
    needs = [_needed_widths(_distinct_rows(s)[0], max_width) for s in samples]
    n_chars = samples[0].shape[-1]
    round_up = lambda n, step: -(-int(np.ceil(n)) // step) * step  # noqa: E731
    step = int(np.lcm(8, multiple))
    every = full_shapes(int(np.prod(samples[0].shape[:-1])), n_chars, multiple)
    best = full_shapes(min(round_up(margin * max(len(n) for n in needs), step), every.n_short), n_chars, multiple)
    for width in range(round_up(max_width, 8), n_chars, 8):
        n_long = round_up(max(margin * max(int((n > width).sum()) for n in needs), 8), step)
        n_short = round_up(margin * max(int((n <= width).sum()) for n in needs), step)
        if n_short * width + n_long * n_chars < best.n_short * best.width + best.n_long * n_chars:
            best = CharShapes(n_short, width, n_long)
    return best


class PackedChars(NamedTuple):
    """A batch's distinct tokens laid out as CharShapes say: the short rows (cut to the width)
    with their tail ids (None at full width), the long rows (None if none), and each token's
    row in [short rows, long rows]."""
    short: np.ndarray
    tails: Optional[np.ndarray]
    long: Optional[np.ndarray]
    index: np.ndarray


def pack_chars(char_ids: np.ndarray, shapes: CharShapes, max_width: int) -> Optional[PackedChars]:
    """char_ids' distinct tokens in `shapes`' layout; None if they do not fit it. Short rows
    that do not fit their table go to the long one while it has room."""
    rows, index = _distinct_rows(char_ids)
    n_chars = rows.shape[1]
    is_long = (_needed_widths(rows, max_width) > shapes.width) if shapes.width < n_chars else np.zeros(len(rows), bool)
    short_rows, long_rows = np.flatnonzero(~is_long), np.flatnonzero(is_long)
    spill = max(len(short_rows) - shapes.n_short, 0)
    if len(long_rows) + spill > shapes.n_long:
        return None
    short_rows, long_rows = short_rows[: len(short_rows) - spill], np.concatenate([long_rows, short_rows[len(short_rows) - spill:]])
    order = np.concatenate([short_rows, long_rows])
    position = np.empty(len(rows), np.int32)  # each distinct row's place in [short table, long table]
    position[order] = np.concatenate([np.arange(len(short_rows)), shapes.n_short + np.arange(len(long_rows))])
    short = np.zeros((shapes.n_short, shapes.width), rows.dtype)
    short[: len(short_rows)] = rows[short_rows, : shapes.width]
    tails = None
    if shapes.width < n_chars:
        tails = np.zeros(shapes.n_short, rows.dtype)
        tails[: len(short_rows)] = rows[short_rows, -1]
    long = None
    if shapes.n_long:
        long = np.zeros((shapes.n_long, n_chars), rows.dtype)
        long[: len(long_rows)] = rows[long_rows]
    return PackedChars(short, tails, long, position[index])
