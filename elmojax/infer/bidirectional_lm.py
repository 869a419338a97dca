"""Computing ELMo representations with a trained biLM.

`BidirectionalLanguageModel` wraps one jit-compiled pure function,
`embed_fn(params, ids, state) -> (outputs, new_state)`, that JAX users can call directly.
Sequence lengths and batch sizes are padded to a few bucket sizes so that new shapes rarely
recompile; padding never changes a result (padded steps and rows are masked).

Devices: each call's batch is split over all of this process's devices (a `jax.sharding.Mesh`
with one axis, 'batch': ids, state and the batch's distinct tokens sharded along it, params
replicated), its size padded to a multiple of their number. In a multi-process run each
process embeds on its own devices; nothing is exchanged between processes.

Determinism: by default every call starts from a zero LSTM state, so a sentence's embedding
does not depend on what was embedded before. bilm-tf instead carries each batch row's final
state into the next call (its most reported surprise); `stateful=True` reproduces that.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from elmojax.formats import hdf5, remote, tf_checkpoint, tf_variables
from elmojax.formats.checks import check_bool, check_int, check_path
from elmojax.formats.options import BiLMOptions, N_CHARACTERS_TRAIN, load_options
from elmojax.formats.vocab import _check_sentences, batch_char_ids
from elmojax.infer import scoring
from elmojax.model import numerics
from elmojax.model.bilm import BiLM, BiLMOutput, zero_state
from elmojax.model.char_ids import distinct_tokens, full_shapes, pack_chars, trim_char_ids
from elmojax.process import hostmem

log = logging.getLogger(__name__)

# The char CNN's convolutions run over as many distinct tokens at a time as keep their outputs
# (tokens x characters x filters, float32) within this many bytes: a few hundred tokens at
# ELMo's size, every token at once for small models.
CNN_CHUNK_BYTES = 100 * 2**20


def cnn_chunk_size(options: BiLMOptions) -> int:
    cnn = options.char_cnn
    return max(1, CNN_CHUNK_BYTES // (4 * cnn.max_characters_per_token * cnn.n_filters))

# The LSTMs' input products (directions x steps x batch x 4 * dim, float32) are made at most this
# many bytes at a time in inference (elmojax.model.lstm.chunked_recurrence): 4 steps of 64 rows at
# ELMo's size (a peak about 35 MiB lower than 8 steps', at the same speed), 16 at ELMo small's (1.05x
# the speed of all 32 at once: benchmarks/RESULTS.md), all steps at once for smaller models.
LSTM_INPUT_CHUNK_BYTES = 32 * 2**20

# A model with at least this many bytes of weights gives the memory its call freed back to the kernel
# after each call (elmojax.process.hostmem): a lower peak for large models, while small models' short
# calls need the memory kept (benchmarks/RESULTS.md).
GIVE_BACK_MEMORY_BYTES = 256 * 2**20

# A call of at most this many padded tokens (batch x length) embeds every token's characters at
# full width: its shape depends on its batch size and length bucket alone, not on its words.
FIXED_LAYOUT_TOKENS = 512

# Sequence lengths (with <S> and </S>) are padded up to one of these, then to multiples of 512.
LENGTH_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def bucket_length(length: int) -> int:
    for bucket in LENGTH_BUCKETS:
        if length <= bucket:
            return bucket
    return -(-length // 512) * 512


def bucket_batch(n: int, max_batch_size: int, multiple: int = 1) -> int:
    """The next power of two, at most max_batch_size, then up to a multiple of `multiple` (the
    number of devices a batch is split over)."""
    return -(-min(1 << max(n - 1, 0).bit_length(), max_batch_size) // multiple) * multiple


def elmo_outputs(output: BiLMOutput) -> dict:
    """The biLM's layers with <S> and </S> removed, as bilm-tf returns them.

    lm_embeddings (batch, n_layers + 1, time - 2, 2 * dim): layer 0 is the token embedding
    repeated for both directions, then each LSTM layer as [forward, backward]; positions past a
    sentence's end are zero. token_embeddings keep <S> and </S>, as in bilm-tf.
    """
    embedding = output.embedding
    layers = [jnp.concatenate([embedding, embedding], axis=-1)]
    layers += [jnp.concatenate([f, b], axis=-1) for f, b in zip(output.forward, output.backward)]
    lm = jnp.stack(layers, axis=1)[:, :, 1:-1]
    lengths = jnp.maximum(output.lengths - 2, 0)
    mask = jnp.arange(lm.shape[2])[None, :] < lengths[:, None]
    return {
        "lm_embeddings": jnp.where(mask[:, None, :, None], lm, 0.0),
        "lengths": lengths,
        "mask": mask,
        "token_embeddings": embedding,
    }


def _initial_state(model: BiLM, batch_size: int, state, sharding: Optional[NamedSharding]):
    if state is not None:
        return state
    state = zero_state(model.options, batch_size)
    return state if sharding is None else jax.lax.with_sharding_constraint(state, sharding)


def make_embed_fn(model: BiLM, state_sharding: Optional[NamedSharding] = None) -> Callable:
    """jit((params, ids, state) -> (elmo_outputs dict, new_state)); ids in Batcher's layout,
    state None for a zero state (laid out by state_sharding when given)."""

    def embed_fn(params, ids, state):
        state = _initial_state(model, ids.shape[0], state, state_sharding)
        output, new_state = model.apply({"params": params}, ids, state)
        return elmo_outputs(output), new_state

    return numerics.jit(embed_fn)


def make_distinct_embed_fn(model: BiLM, state_sharding: Optional[NamedSharding] = None) -> Callable:
    """Like `make_embed_fn`, with the char CNN run once per distinct token of the batch:
    jit((params, ids, distinct_char_ids, tail_ids, token_index, state) -> (outputs, new_state)),
    where token_index (batch, time) points into distinct_char_ids (n_distinct, chars), cut short
    by `trim_char_ids` when tail_ids is not None."""

    def embed_fn(params, ids, distinct_char_ids, tail_ids, token_index, state):
        state = _initial_state(model, ids.shape[0], state, state_sharding)
        table = model.apply({"params": params}, distinct_char_ids, tail_ids, method=BiLM.embed)
        output, new_state = model.apply({"params": params}, ids, state,
                                        embedding=jnp.take(table, token_index, axis=0))
        return elmo_outputs(output), new_state

    return numerics.jit(embed_fn)


def read_options(options_file: str) -> BiLMOptions:
    """options.json by path or http(s) URL (downloaded once into the cache, formats/remote)."""
    return load_options(remote.local_path(options_file), source=options_file)


def embed_tokens(params: dict, options: BiLMOptions, char_ids: np.ndarray, batch_size: int = 4096,
                 report: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """The char CNN's embedding (n, projection_dim) of spelled tokens, char_ids (n, chars) + 1,
    `batch_size` at a time in one padded shape (one compilation); report(done) after each."""
    batch_size = check_int("batch_size", batch_size, 1)
    model = BiLM(options, cnn_chunk_size=cnn_chunk_size(options))  # batches of 4096 tokens, in chunks
    embed = numerics.jit(lambda p, ids: model.apply({"params": p}, ids, method=BiLM.embed))
    out = np.zeros((len(char_ids), options.projection_dim), np.float32)
    for start in range(0, len(char_ids), batch_size):
        chunk = char_ids[start : start + batch_size]
        padded = np.zeros((batch_size,) + chunk.shape[1:], np.int32)
        padded[: len(chunk)] = chunk
        out[start : start + len(chunk)] = np.asarray(embed(params, padded))[: len(chunk)]
        if report is not None:
            report(start + len(chunk))
    return out


def load_bilm_params(options_file: str, options: BiLMOptions, weight_file: str,
                     use_character_inputs: bool = True, sharding: Optional[jax.sharding.Sharding] = None) -> dict:
    """The biLM's params on the device (with `sharding`, if given), from an hdf5 weight file (a
    path or an http(s) URL, elmojax.formats.remote) or a bilm-tf training checkpoint (its softmax left
    unread); without the embedder's for token inputs."""
    weight_file = remote.local_path(weight_file)
    if tf_checkpoint.is_checkpoint(weight_file):  # read from memory maps
        params = tf_variables.read_training_checkpoint(weight_file, options_file, softmax=False).params["bilm"]
        if not use_character_inputs:
            params.pop("embedder", None)
        return jax.device_put(params, sharding)
    # each array goes to the device as it is read, and is there before the next is read: the
    # model is never held twice (transfers left in flight keep their host copies alive together)
    return hdf5.load_weights(weight_file, options, use_character_inputs,
                             convert=lambda x: jax.block_until_ready(jax.device_put(x, sharding)))


def _check_devices(devices) -> list:
    """The devices a model's batches are split over: all of this process's when None."""
    if devices is None:
        return list(jax.local_devices())
    if isinstance(devices, (str, bytes, jax.Device)):
        raise TypeError(f"devices must be a list of jax devices (e.g. jax.local_devices()), got {devices!r:.60}")
    try:
        devices = list(devices)
    except TypeError:
        raise TypeError(f"devices must be a list of jax devices, got {type(devices).__name__}") from None
    for k, device in enumerate(devices):
        if not isinstance(device, jax.Device):
            raise TypeError(f"devices[{k}] must be a jax device (e.g. from jax.local_devices()), got {device!r:.60}")
    if not devices:
        raise ValueError("devices must hold at least one device")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices lists a device twice: {devices}")
    return devices


class BidirectionalLanguageModel:
    """A trained biLM that maps Batcher (or TokenBatcher) ids to ELMo layers.

    options_file, weight_file: bilm-tf's options.json and hdf5 weights (n_characters 261 or 262);
    the weights may also be a bilm-tf training checkpoint (a TensorFlow checkpoint's prefix, one
    of its files or its directory: elmojax.formats.tf_checkpoint), whose softmax is then left
    unread, a published name ("small", elmojax.pretrained) or an http(s) URL; options_file None:
    the options.json beside the weights (`from_pretrained(model)` says so in one argument).
    use_character_inputs=False reads token ids (TokenBatcher) and needs embedding_weight_file,
    written by `dump_token_embeddings` for the same vocabulary file.
    max_batch_size: the largest batch a call embeds at once (a larger one is split, or refused
    when stateful, where it is the number of rows whose state is kept).
    stateful: carry each row's final LSTM state into the next call, as bilm-tf does; rows
    beyond a call's batch size keep theirs. `reset_state()` zeroes it. The default, False,
    starts every call from zero state, so results do not depend on call order.
    compute_dtype: "float32" (the default, bilm-tf's numerics) or "bfloat16" (matrix products
    with bfloat16 operands and float32 accumulation: faster on GPUs, about 3 significant digits).
    devices: the devices each call's batch is split over (default: all of this process's,
    jax.local_devices()); a batch is padded to a multiple of their number.

    Calling it returns numpy arrays: lm_embeddings (n, n_layers + 1, T, 2 * projection_dim),
    lengths (n,), mask (n, T) and token_embeddings (n, T + 2, projection_dim), where T + 2 is
    the ids' time dimension.
    """

    def __init__(self, options_file: str, weight_file: str, use_character_inputs: bool = True,
                 embedding_weight_file: Optional[str] = None, max_batch_size: int = 128,
                 stateful: bool = False, compute_dtype: str = "float32", softmax_file: Optional[str] = None,
                 devices: Optional[Sequence[jax.Device]] = None):
        check_path("options_file", options_file, optional=True)
        check_path("weight_file", weight_file)
        use_character_inputs = check_bool("use_character_inputs", use_character_inputs)
        check_path("embedding_weight_file", embedding_weight_file, optional=True)
        max_batch_size = check_int("max_batch_size", max_batch_size, 1)
        stateful = check_bool("stateful", stateful)
        if not isinstance(compute_dtype, str) or compute_dtype not in numerics.COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(numerics.COMPUTE_DTYPES)}, got {compute_dtype!r:.60}")
        check_path("softmax_file", softmax_file, optional=True)
        devices = _check_devices(devices)
        # scoring without softmax_file looks beside the weights, when it is first asked for
        self._softmax_source = weight_file if softmax_file is None else None
        options_file, weight_file, _ = remote.model_paths(options_file, weight_file)
        options = read_options(options_file)
        if not options.bidirectional:
            raise ValueError(f"{options_file}: ELMo needs a bidirectional LM (bidirectional is false)")
        self.mesh = Mesh(np.array(devices), ("batch",))
        self._replicated = NamedSharding(self.mesh, P())
        self._batch_sharding = NamedSharding(self.mesh, P("batch"))
        # read straight onto the devices, replicated (not put there once more after loading)
        params = load_bilm_params(options_file, options, weight_file, use_character_inputs, self._replicated)
        if use_character_inputs:
            if options.char_cnn is None:
                raise ValueError(f"{options_file}: character inputs need a char_cnn section")
        else:
            if embedding_weight_file is None:
                raise ValueError("use_character_inputs=False needs embedding_weight_file "
                                 "(write one with dump_token_embeddings)")
            table = hdf5.load_token_embeddings(embedding_weight_file, options.projection_dim)
            params["embedder"] = {"embedding": jax.device_put(table, self._replicated)}
            options = dataclasses.replace(options, n_tokens_vocab=table.shape[0])
        self.options: BiLMOptions = options
        self.use_character_inputs = use_character_inputs
        self.max_batch_size = max_batch_size
        self.stateful = stateful
        self.model = BiLM(options, use_character_inputs,
                          cnn_chunk_size=cnn_chunk_size(options) if use_character_inputs else None,
                          numerics=numerics.Numerics("highest", compute_dtype),
                          lstm_input_chunk_bytes=LSTM_INPUT_CHUNK_BYTES)
        self.params = params
        self._give_back_memory = sum(x.nbytes for x in jax.tree.leaves(params)) >= GIVE_BACK_MEMORY_BYTES
        self._compiled_shapes: set = set()  # the call shapes a large model compiled ahead (_run)
        self.embed_fn = make_embed_fn(self.model, self._batch_sharding)
        self._distinct_embed_fn = (make_distinct_embed_fn(self.model, self._batch_sharding)
                                   if use_character_inputs else None)
        self._state = None
        self.reset_state()
        self._scoring = None
        if softmax_file is not None:
            self._load_softmax(softmax_file)

    @classmethod
    def from_pretrained(cls, model: str, **kwargs) -> "BidirectionalLanguageModel":
        """The biLM `model` names: a published name (small, medium, original, original_5.5B,
        pubmed: downloaded once into the cache), a weight file's path or its http(s) URL, with
        its options.json (and, when scoring needs it, its softmax) found beside it; kwargs as the
        constructor's (options_file or softmax_file to give them)."""
        return cls(kwargs.pop("options_file", None), model, **kwargs)

    def _load_softmax(self, softmax_file: str) -> None:
        weights, biases, index = scoring.load_scorer_softmax(remote.local_path(softmax_file))
        if weights.shape[1] != self.options.projection_dim:
            raise ValueError(f"{softmax_file}: softmax/W has {weights.shape[1]} columns, the biLM's top layer "
                             f"{self.options.projection_dim}")
        self._scoring = (jax.device_put(weights), jax.device_put(biases), index, scoring.make_log_prob_fn(self.model))

    @property
    def state(self):
        """The carried LSTM state (stateful models): rows of max_batch_size, per direction and layer."""
        return self._state

    @state.setter
    def state(self, state) -> None:
        """Sets the carried state (as `state` gave it: a stateful dump resumes with it)."""
        if not self.stateful:
            raise ValueError("only a stateful model carries state (stateful=True)")
        want = jax.tree.map(np.shape, self._state)
        if jax.tree.structure(state) != jax.tree.structure(self._state) or jax.tree.map(np.shape, state) != want:
            raise ValueError(f"a state of max_batch_size={self.max_batch_size} rows has shapes {want}")
        self._state = jax.tree.map(lambda s: np.asarray(s, np.float32), state)

    def reset_state(self) -> None:
        self._state = jax.tree.map(np.asarray, zero_state(self.options, self.max_batch_size)) if self.stateful else None

    def _check_ids(self, ids: np.ndarray, name: str = "ids") -> np.ndarray:
        try:
            ids = np.asarray(ids)
        except (ValueError, TypeError) as e:
            raise TypeError(f"{name} must be an array of integers (Batcher's or TokenBatcher's output); got "
                            f"{type(ids).__name__} ({e})") from None
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{name} must be integers (Batcher's or TokenBatcher's output), got {ids.dtype}")
        if self.use_character_inputs:
            width = self.options.char_cnn.max_characters_per_token
            if ids.ndim != 3 or ids.shape[2] != width:
                raise ValueError(f"{name}: character ids must have shape (batch, time, {width}) (Batcher's output), "
                                 f"got {ids.shape}")
            limit = N_CHARACTERS_TRAIN
        else:
            if ids.ndim != 2:
                raise ValueError(f"{name}: token ids must have shape (batch, time) (TokenBatcher's output), got "
                                 f"{ids.shape}")
            limit = self.options.n_tokens_vocab
        if ids.shape[1] < 2:
            raise ValueError(f"{name} need <S> and </S> around each sentence (time >= 2), got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() > limit):
            raise ValueError(f"{name} must lie in [0, {limit}] (ids + 1, 0 = padding); got [{ids.min()}, {ids.max()}]")
        return ids.astype(np.int32)

    def __call__(self, ids) -> dict:
        ids = self._check_ids(ids)
        n, length = ids.shape[:2]
        if self.stateful and n > self.max_batch_size:
            raise ValueError(f"a stateful model keeps state for max_batch_size={self.max_batch_size} rows; "
                             f"got a batch of {n}")
        if n <= self.max_batch_size:
            return self._embed_chunk(ids)
        # A large batch goes in chunks of similar lengths, each cut to its own longest sentence,
        # so that short sentences do not run the LSTMs over long ones' padding.
        real = ids.any(axis=-1) if self.use_character_inputs else ids != 0
        order = np.argsort(-real.sum(axis=1), kind="stable")
        out = {"lm_embeddings": np.zeros((n, self.options.lstm.n_layers + 1, length - 2,
                                          2 * self.options.lstm.output_dim), np.float32),
               "lengths": np.zeros(n, np.int32), "mask": np.zeros((n, length - 2), bool),
               "token_embeddings": np.zeros((n, length, self.options.projection_dim), np.float32)}
        for start in range(0, n, self.max_batch_size):
            rows = order[start : start + self.max_batch_size]
            chunk_length = max(int(real[rows].sum(axis=1).max()), 2)
            piece = self._embed_chunk(ids[rows, :chunk_length])
            out["lengths"][rows] = piece["lengths"]
            out["lm_embeddings"][rows, :, : chunk_length - 2] = piece["lm_embeddings"]
            out["mask"][rows, : chunk_length - 2] = piece["mask"]
            out["token_embeddings"][rows, :chunk_length] = piece["token_embeddings"]
        return out

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    def _embed_chunk(self, ids: np.ndarray) -> dict:
        n, length = ids.shape[:2]
        padded_n, padded_length = bucket_batch(n, self.max_batch_size, self.n_devices), bucket_length(length)
        padded = np.zeros((padded_n, padded_length) + ids.shape[2:], np.int32)
        padded[:n, :length] = ids  # all-zero rows have length 0: no effect on anything
        if self.stateful:
            state = jax.tree.map(lambda s: np.concatenate([s[:n], np.zeros((padded_n - n,) + s.shape[1:], s.dtype)]),
                                 self._state)
        else:
            state = None  # zeros, made inside the compiled function
        # rows split over the devices (the distinct tokens too: each device runs the char CNN
        # over its share of them), params replicated; one transfer for all (each device_put
        # call costs about 0.2 ms, a tenth of a small model's call)
        if self._distinct_embed_fn is not None:
            args = jax.device_put(((padded, *self._char_layout(padded)), state), self._batch_sharding)
            outputs, new_state = self._run(self._distinct_embed_fn, *args[0], args[1])
        else:
            outputs, new_state = self._run(self.embed_fn, *jax.device_put((padded, state), self._batch_sharding))
        if self.stateful:
            self._state = jax.tree.map(lambda old, new: np.concatenate([np.asarray(new)[:n], old[n:]]),
                                       self._state, new_state)
        outputs = jax.device_get(outputs)  # numpy from here: slicing device arrays would dispatch ops
        if self._give_back_memory:
            hostmem.give_back_freed_memory()
        return {
            "lm_embeddings": outputs["lm_embeddings"][:n, :, : length - 2],
            "lengths": outputs["lengths"][:n],
            "mask": outputs["mask"][:n, : length - 2],
            "token_embeddings": outputs["token_embeddings"][:n, :length],
        }

    def _run(self, fn: Callable, *args):
        """fn(self.params, *args). A large model compiles each new shape of its call ahead of
        running it and gives the compiler's freed memory back to the kernel in between: the
        first call's peak is then the larger of the two, not their sum (benchmarks/RESULTS.md)."""
        if self._give_back_memory:
            key = (fn, jax.tree.structure(args), tuple((x.shape, x.dtype) for x in jax.tree.leaves(args)))
            if key not in self._compiled_shapes:  # (the jitted fn's call below finds the program compiled)
                fn.lower(self.params, *args).compile()
                hostmem.give_back_freed_memory()
                self._compiled_shapes.add(key)
        return fn(self.params, *args)

    def _char_layout(self, padded: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
        """(distinct tokens' char ids, their tail ids or None, each token's row) for a padded
        batch. A small one (at most FIXED_LAYOUT_TOKENS) gives all its tokens at full width:
        one shape per batch size and length, which warm_up compiles ahead. A larger one gives
        each distinct token once, cut short: fewer FLOPs, in shapes that vary with its words."""
        max_width, n_tokens = self.options.char_cnn.max_width, padded.shape[0] * padded.shape[1]
        if n_tokens <= FIXED_LAYOUT_TOKENS:
            packed = pack_chars(padded, full_shapes(n_tokens, padded.shape[2], self.n_devices), max_width)
            return packed.short, None, packed.index
        distinct, token_index = distinct_tokens(padded, multiple=self.n_devices)
        return (*trim_char_ids(distinct, max_width), token_index)

    def warm_up(self, max_length: int = 100, batch_sizes: Sequence[int] = (1,)) -> int:
        """Compiles ahead every call of `batch_sizes` sentences (ids of at most max_length + 2
        positions, with <S> and </S>) that embeds its characters in the fixed layout (at most
        FIXED_LAYOUT_TOKENS padded tokens: 512 for one sentence, 64 for 8), so that no such call
        stalls on a compile later; returns how many shapes that is. (JAX's compilation cache,
        on in the command lines, keeps them for the next process.) The carried state is kept."""
        max_length = check_int("max_length", max_length, 1)
        if isinstance(batch_sizes, (int, np.integer)):
            batch_sizes = (batch_sizes,)
        if not isinstance(batch_sizes, (list, tuple, range)) or not batch_sizes:
            raise ValueError(f"batch_sizes must be a list of positive integers, got {batch_sizes!r:.60}")
        sizes = sorted({bucket_batch(check_int("batch_sizes", b, 1), self.max_batch_size, self.n_devices)
                        for b in batch_sizes})
        lengths = [b for b in LENGTH_BUCKETS if b < max_length + 2] + [bucket_length(max_length + 2)]
        width = (self.options.char_cnn.max_characters_per_token,) if self.use_character_inputs else ()
        if self.use_character_inputs and sizes[-1] * lengths[-1] > FIXED_LAYOUT_TOKENS:
            raise ValueError(f"warm_up: {sizes[-1]} sentences of {max_length} tokens are past the fixed layout "
                             f"({FIXED_LAYOUT_TOKENS} padded tokens a call); their shapes depend on their words")
        state = self._state
        for n in sizes:
            for length in lengths:
                self._embed_chunk(np.zeros((n, length) + width, np.int32))
        self._state = state
        return len(sizes) * len(lengths)

    def sentence_vectors(self, sentences: Sequence[Sequence[str]], layers: Union[str, int] = "average",
                         pooling: str = "mean") -> np.ndarray:
        """One vector per sentence (n, 2 * projection_dim), pooled over its tokens (padding
        excluded), <S> and </S> left out: of the average of the layers ("average"), the top
        layer ("top") or layer k (0: the token embeddings); pooling "mean" or "max". (The FAQ's
        sentence embedding, after Perone et al. 2018: mean of the averaged layers.)"""
        n_layers = self.options.lstm.n_layers + 1
        layer_index = (isinstance(layers, (int, np.integer)) and not isinstance(layers, (bool, np.bool_))
                       and 0 <= layers < n_layers)
        if not ((isinstance(layers, str) and layers in ("average", "top")) or layer_index):
            raise ValueError(f"layers must be 'average', 'top' or a layer 0..{n_layers - 1}, got {layers!r:.60}")
        if layer_index:
            layers = int(layers)
        if not isinstance(pooling, str) or pooling not in ("mean", "max"):
            raise ValueError(f"pooling must be 'mean' or 'max', got {pooling!r:.60}")
        if not self.use_character_inputs:
            raise ValueError("sentence_vectors spells the sentences: it needs use_character_inputs=True")
        sentences = _check_sentences(sentences)
        for k, sentence in enumerate(sentences):
            if len(sentence) == 0:
                raise ValueError(f"sentence {k} has no tokens, so no vector")
        width = self.options.char_cnn.max_characters_per_token
        out = np.zeros((len(sentences), 2 * self.options.projection_dim), np.float32)
        for start in range(0, len(sentences), self.max_batch_size):
            lm = self(batch_char_ids(sentences[start:start + self.max_batch_size], width))["lm_embeddings"]
            x = lm.mean(axis=1) if layers == "average" else lm[:, -1 if layers == "top" else layers]
            for k, sentence in enumerate(sentences[start:start + self.max_batch_size]):
                tokens = x[k, :len(sentence)]
                out[start + k] = tokens.mean(axis=0) if pooling == "mean" else tokens.max(axis=0)
        return out

    def log_probs(self, char_ids: np.ndarray) -> dict:
        """Each token's log-probability under the full softmax (needs softmax_file), from zero
        state, for Batcher ids: forward (n, T) log p(w_j | w_<j) and backward (n, T) log p(w_j |
        w_>j), mask (n, T), and forward_end / backward_end (n,), the scores of </S> and <S>
        (see elmojax.infer.scoring). The targets are the tokens the ids spell."""
        self._need_scoring()
        char_ids = self._check_ids(char_ids, "char_ids")
        return self._scores(char_ids, scoring.tokens_of(char_ids))

    def sentence_log_probs(self, sentences: Sequence[Sequence[str]]) -> dict:
        """log_probs of tokenized sentences (any iterable of token lists; the targets are the
        tokens as given)."""
        self._need_scoring()
        sentences = _check_sentences(sentences)
        return self._scores(batch_char_ids(sentences, self.options.char_cnn.max_characters_per_token), sentences)

    def _need_scoring(self) -> None:
        if self._scoring is None and self._softmax_source is not None:
            source = self._softmax_source
            found = remote.softmax_beside(source)
            if found is None:
                raise ValueError(f"log_probs needs the softmax: there is no "
                                 f"{' or '.join(remote.names_beside(remote.model_source(source)[0])[1])} beside "
                                 f"{source}; BidirectionalLanguageModel(..., softmax_file=FILE)")
            self._load_softmax(found)
            self._softmax_source = None
        if self._scoring is None:
            raise ValueError("log_probs needs the softmax: BidirectionalLanguageModel(..., softmax_file=FILE)")
        if not self.use_character_inputs:
            raise ValueError("log_probs scores character ids: it needs use_character_inputs=True")

    def _scores(self, char_ids: np.ndarray, sentences: Sequence[Sequence[str]]) -> dict:
        if self._scoring is None:
            raise ValueError("log_probs needs the softmax: BidirectionalLanguageModel(..., softmax_file=FILE)")
        weights, biases, index, fn = self._scoring
        return scoring.score(fn, self.params, weights, biases, index, char_ids, sentences)

    def perplexity(self, sentences: Sequence[Sequence[str]]) -> float:
        """bilm-tf's perplexity of the sentences (elmojax.infer.scoring.perplexity), max_batch_size at a time."""
        self._need_scoring()
        sentences = _check_sentences(sentences)
        return scoring.perplexity([self.sentence_log_probs(sentences[k:k + self.max_batch_size])
                                   for k in range(0, len(sentences), self.max_batch_size)])
