"""Converter between bilm-tf's hdf5 weight files and the Flax params pytree.

The weight file (lm_weights.hdf5) holds, for options.json's architecture:

  char_embed                                        (261, char_dim)     the trained table, no padding row
  CNN/W_cnn_{i}, CNN/b_cnn_{i}                      (1, width, char_dim, n), (n,)
  CNN_high_{i}/W_carry, b_carry, W_transform, b_transform
  CNN_proj/W_proj, CNN_proj/b_proj                  only when the filters do not sum to projection_dim
  RNN_{0|1}/RNN/MultiRNNCell/Cell{i}/LSTMCell/W_0, B, W_P_0   forward (0) and backward (1) LSTMs

A word-input model's file holds `embedding` (vocab, projection_dim) instead of the char CNN, as
does a token-embedding file (from `dump_token_embeddings`).
Both directions check every dataset's name and shape and name the one at fault. Params keep
the file's values, so load -> save -> load is bit-identical, in the model's layout: each LSTM
dataset is one direction's row of a stacked param (the forward LM's at 0, the backward's at 1),
and W_0 is held as its two row blocks W_x and W_h. `place` and `take` map a layout entry to
and from the params (elmojax.formats.tf_variables uses them too).
"""

from __future__ import annotations

import io
from typing import Any, Callable, Iterator, Optional

import h5py
import numpy as np

from elmojax.formats import files
from elmojax.formats.directions import directions
from elmojax.formats.options import BiLMOptions, N_CHARACTERS_TRAIN

Params = dict[str, Any]
# (hdf5 dataset, params path, shape); an LSTM entry's path ends in its direction's index
# into the stacked param: (..., 'lstm', 'layer_i', 'W_0' | 'B' | 'W_P_0', d)
Entry = tuple[str, tuple, tuple[int, ...]]


def embedder_layout(options: BiLMOptions) -> list[Entry]:
    """The char CNN's datasets; for a word-input model (no char_cnn), its `embedding` table."""
    c = options.char_cnn
    if c is None:
        if options.n_tokens_vocab is None:
            return []
        return [("embedding", ("embedder", "embedding"), (options.n_tokens_vocab, options.projection_dim))]
    entries: list[Entry] = [("char_embed", ("embedder", "char_embed"), (N_CHARACTERS_TRAIN, c.embedding_dim))]
    for i, (width, num) in enumerate(c.filters):
        entries.append((f"CNN/W_cnn_{i}", ("embedder", f"W_cnn_{i}"), (1, width, c.embedding_dim, num)))
        entries.append((f"CNN/b_cnn_{i}", ("embedder", f"b_cnn_{i}"), (num,)))
    n = c.n_filters
    for i in range(c.n_highway):
        for name, shape in (("W_carry", (n, n)), ("b_carry", (n,)), ("W_transform", (n, n)), ("b_transform", (n,))):
            entries.append((f"CNN_high_{i}/{name}", ("embedder", f"{name}_{i}"), shape))
    if n != options.projection_dim:
        entries.append(("CNN_proj/W_proj", ("embedder", "W_proj"), (n, options.projection_dim)))
        entries.append(("CNN_proj/b_proj", ("embedder", "b_proj"), (options.projection_dim,)))
    return entries


def lstm_layout(options: BiLMOptions) -> list[Entry]:
    lstm = options.lstm
    entries: list[Entry] = []
    for d in range(n_directions(options)):
        for i in range(lstm.n_layers):
            in_dim = options.projection_dim if i == 0 else lstm.output_dim
            root = f"RNN_{d}/RNN/MultiRNNCell/Cell{i}/LSTMCell"
            path = ("lstm", f"layer_{i}")
            entries.append((f"{root}/W_0", path + ("W_0", d), (in_dim + lstm.output_dim, 4 * lstm.dim)))
            entries.append((f"{root}/B", path + ("B", d), (4 * lstm.dim,)))
            if lstm.use_projection:
                entries.append((f"{root}/W_P_0", path + ("W_P_0", d), (lstm.dim, lstm.projection_dim)))
    return entries


def _pieces(path: tuple, shape: tuple[int, ...], options: BiLMOptions) -> list[tuple[tuple, Optional[int], slice]]:
    """Where an entry's value goes in the params: (leaf path, direction index or None, the
    value's rows there). An LSTM kernel W_0 (in + out, 4 * dim) is the model's two row blocks
    W_x and W_h."""
    if not isinstance(path[-1], int):
        return [(path, None, slice(None))]
    *node, name, d = path
    if name != "W_0":
        return [((*node, name), d, slice(None))]
    split = shape[0] - options.lstm.output_dim
    return [((*node, "W_x"), d, slice(0, split)), ((*node, "W_h"), d, slice(split, None))]


def n_directions(options: BiLMOptions) -> int:
    return len(directions(options.bidirectional))


def place(params: Params, path: tuple, value: np.ndarray, options: BiLMOptions) -> list[tuple]:
    """Puts a layout entry's value into the params (numpy), allocating a stacked LSTM param at
    its first direction; returns the leaf paths it wrote."""
    written = []
    for leaf, d, rows in _pieces(path, value.shape, options):
        part = value[rows]
        if d is None:
            _set(params, leaf, part)
        else:
            node = params
            for key in leaf[:-1]:
                node = node.setdefault(key, {})
            if leaf[-1] not in node:
                node[leaf[-1]] = np.empty((n_directions(options),) + part.shape, part.dtype)
            node[leaf[-1]][d] = part
        written.append(leaf)
    return written


def take(params: Params, path: tuple, shape: tuple[int, ...], options: BiLMOptions, what: str) -> np.ndarray:
    """A layout entry's value from the params (inverse of `place`); `what` names the file in errors."""
    values = []
    for leaf, d, _ in _pieces(path, shape, options):
        value = np.asarray(_get(params, leaf, what))
        if d is not None:
            if value.ndim == 0 or value.shape[0] != n_directions(options):
                raise ValueError(f"{what}: params entry {'/'.join(leaf)} has shape {value.shape}, but the options' "
                                 f"{n_directions(options)} direction(s) need it stacked on its first axis")
            value = value[d]
        values.append(value)
    return values[0] if len(values) == 1 else np.concatenate(values)


def leaf_paths(layout: list[Entry], options: BiLMOptions) -> set[tuple]:
    """The params' leaf paths a layout's entries fill."""
    return {leaf for _, path, shape in layout for leaf, _, _ in _pieces(path, shape, options)}


def _datasets(f: h5py.File) -> Iterator[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return iter(names)


def _open(path: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: cannot open as hdf5 ({e})") from None


def _read(f: h5py.File, filename: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise ValueError(f"{filename}: dataset '{name}' is missing (expected shape {shape} for these options)")
    dataset = f[name]
    if tuple(dataset.shape) != tuple(shape):
        raise ValueError(f"{filename}: dataset '{name}' has shape {tuple(dataset.shape)}, "
                         f"but the options need {tuple(shape)}")
    if not np.issubdtype(dataset.dtype, np.floating):
        raise ValueError(f"{filename}: dataset '{name}' has dtype {dataset.dtype}, not a float type")
    return check_finite(dataset[...], filename, name)


def check_finite(value: np.ndarray, filename: str, name: str, what: str = "dataset") -> np.ndarray:
    """`value`, if all of it is finite; otherwise an error naming the file and dataset (or
    `what` it is): weights with NaN or inf in them are never read or written (they come from a
    diverged run)."""
    if not np.all(np.isfinite(value)):
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        raise ValueError(f"{filename}: {what} '{name}' holds {bad} NaN or infinite values: these weights are "
                         f"broken (a diverged training run?)")
    return value


def _set(tree: Params, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Params, path: tuple[str, ...], what: str):
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"{what}: params have no entry {'/'.join(path)}")
        node = node[key]
    return node


def _leaf_paths(tree: Params, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        if isinstance(value, dict) or hasattr(value, "items"):
            yield from _leaf_paths(dict(value), prefix + (key,))
        else:
            yield prefix + (key,)


def load_weights(weight_file: str, options: BiLMOptions, use_character_inputs: bool = True,
                 convert: Optional[Callable[[np.ndarray], Any]] = None) -> Params:
    """Reads a bilm-tf weight file into a params pytree of numpy arrays.

    `convert` is applied to each array as it is read (jax.device_put, say), so that a large
    model is never held twice in memory.

    Every dataset the options call for must be present with its shape, and the file may hold no
    dataset they do not call for (a sign that options and weights do not belong together). With
    `use_character_inputs=False` the embedder's datasets are allowed but not loaded (the token
    embeddings then come from an embedding file).
    """
    layout = embedder_layout(options) + lstm_layout(options)
    wanted = layout if use_character_inputs else lstm_layout(options)
    params: Params = {}
    with _open(weight_file) as f:
        expected = {name for name, _, _ in layout}
        unexpected = sorted(set(_datasets(f)) - expected)
        if unexpected:
            raise ValueError(f"{weight_file}: dataset '{unexpected[0]}' is not part of the architecture in the "
                             f"options ({len(unexpected)} unexpected in all); do options and weights belong together?")
        # a leaf is converted once every dataset that fills it has been read (a stacked LSTM
        # param after its last direction)
        remaining: dict[tuple, int] = {}
        for _, path, shape in wanted:
            for leaf, _, _ in _pieces(path, shape, options):
                remaining[leaf] = remaining.get(leaf, 0) + 1
        for name, path, shape in wanted:
            for leaf in place(params, path, _read(f, weight_file, name, shape), options):
                remaining[leaf] -= 1
                if remaining[leaf] == 0 and convert is not None:
                    _set(params, leaf, convert(_get(params, leaf, weight_file)))
    return params


def _image(datasets: list[tuple[str, np.ndarray]]) -> bytes:
    """An hdf5 file holding the datasets, as bytes. Files are built in memory and then written
    with plain file I/O, so that a full disk is an OSError like any other (HDF5's own writes
    can crash the process on one)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for name, value in datasets:
            if value.dtype == object:  # strings
                f.create_dataset(name, data=value, dtype=h5py.string_dtype("utf-8"))
            else:
                f.create_dataset(name, data=value)
    return buffer.getvalue()


def save_weights(params: Params, options: BiLMOptions, weight_file: str) -> None:
    """Writes the params in bilm-tf's weight-file schema (atomically); inverse of `load_weights`."""
    files.write_bytes({weight_file: weights_image(params, options, weight_file)})


def weights_image(params: Params, options: BiLMOptions, weight_file: str) -> bytes:
    """save_weights' file as bytes, after every check (names in errors are weight_file's)."""
    layout = embedder_layout(options) + lstm_layout(options)
    known = leaf_paths(layout, options)
    extra = [p for p in _leaf_paths(params) if p not in known]
    if extra:
        raise ValueError(f"{weight_file}: params entry {'/'.join(extra[0])} has no place in the weight-file schema")
    arrays = []
    for name, path, shape in layout:
        value = check_finite(take(params, path, shape, options, weight_file), weight_file, name)
        if value.shape != shape:
            raise ValueError(f"{weight_file}: params entry {'/'.join(map(str, path))} (dataset '{name}') has shape "
                             f"{value.shape}, but the options need {shape}")
        arrays.append((name, value))
    return _image(arrays)


def load_token_embeddings(embedding_file: str, dim: Optional[int] = None) -> np.ndarray:
    """Reads the `embedding` dataset (vocab, dim) of a token-embedding file."""
    with _open(embedding_file) as f:
        if "embedding" not in f:
            raise ValueError(f"{embedding_file}: dataset 'embedding' is missing")
        shape = f["embedding"].shape
        if len(shape) != 2 or (dim is not None and shape[1] != dim):
            raise ValueError(f"{embedding_file}: dataset 'embedding' has shape {shape}, "
                             f"expected (vocab_size, {dim if dim is not None else 'dim'})")
        return _read(f, embedding_file, "embedding", shape)


def save_token_embeddings(embeddings: np.ndarray, embedding_file: str) -> None:
    embeddings = check_finite(np.asarray(embeddings, dtype=np.float32), embedding_file, "embedding")
    files.write_bytes({embedding_file: _image([("embedding", embeddings)])})


def save_softmax(weights: np.ndarray, biases: np.ndarray, softmax_file: str,
                 vocab: Optional[list[str]] = None) -> None:
    """Writes softmax/W (vocab, dim) and softmax/b (vocab,), and the vocabulary they index."""
    files.write_bytes({softmax_file: softmax_image(weights, biases, softmax_file, vocab)})


def softmax_image(weights: np.ndarray, biases: np.ndarray, softmax_file: str,
                  vocab: Optional[list[str]] = None) -> bytes:
    """save_softmax's file as bytes, after every check."""
    weights, biases = np.asarray(weights), np.asarray(biases)
    if weights.ndim != 2 or biases.shape != (weights.shape[0],):
        raise ValueError(f"{softmax_file}: softmax W {weights.shape} and b {biases.shape} do not fit together")
    check_finite(weights, softmax_file, "softmax/W")
    check_finite(biases, softmax_file, "softmax/b")
    datasets = [("softmax/W", weights), ("softmax/b", biases)]
    if vocab is not None:
        datasets.append(("vocab", np.array(vocab, dtype=object)))
    return _image(datasets)


def load_softmax(softmax_file: str) -> tuple[np.ndarray, np.ndarray, Optional[list[str]]]:
    """Reads (W, b, vocabulary or None) from a softmax file written by `save_softmax`."""
    with _open(softmax_file) as f:
        if "softmax/W" not in f:
            raise ValueError(f"{softmax_file}: dataset 'softmax/W' is missing")
        weights = _read(f, softmax_file, "softmax/W", f["softmax/W"].shape)
        if weights.ndim != 2:
            raise ValueError(f"{softmax_file}: dataset 'softmax/W' has shape {weights.shape}, expected (vocab, dim)")
        biases = _read(f, softmax_file, "softmax/b", (weights.shape[0],))
        vocab = None
        if "vocab" in f:
            vocab = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in f["vocab"][...]]
            if len(vocab) != weights.shape[0]:
                raise ValueError(f"{softmax_file}: dataset 'vocab' has {len(vocab)} tokens for {weights.shape[0]} rows")
        return weights, biases, vocab
