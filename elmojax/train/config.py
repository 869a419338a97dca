"""Training configs: ml_collections ConfigDicts whose model part mirrors bilm-tf's options.json.

  config.model  char_cnn (or None for word inputs), lstm, bidirectional, share_embedding_softmax:
                the options.json fields, same names and meaning
  config.train  batch_size (per device), unroll_steps, n_negative_samples_batch, sample_softmax
                (False: the full softmax, as bilm-tf's option), state_reset_probability (elmojax's
                remedy for the zero-state blow-up; 0 for a bilm-tf options.json), dropout,
                all_clip_norm_val, learning_rate, n_epochs, n_train_tokens (None: counted from
                the data), seed, logging and checkpoint cadence; speed knobs matmul_precision,
                scan_unroll and compute_dtype ("float32", or "bfloat16" for GPUs)
  config.data   train_prefix, heldout_prefix (globs), vocab_file
  config.eval   batch_size
  config.init_from / init_softmax_from   start from a checkpoint or an exported weight file
  config.export_after_training, example_sentences   what to do once training ends

The typed values the rest of training takes are built from a config here and nowhere else:
step_settings (the step and its model), optimizer_settings, numerics and streams (the datasets).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Optional

import ml_collections
from ml_collections import config_dict

from elmojax.data.datasets import Streams
from elmojax.formats.options import BiLMOptions
from elmojax.model.numerics import Numerics

# options.json's training fields and where they live in the config.
TRAIN_FIELDS = ("n_epochs", "n_train_tokens", "batch_size", "unroll_steps", "n_negative_samples_batch",
                "sample_softmax", "dropout", "all_clip_norm_val", "learning_rate")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        char_cnn=ml_collections.ConfigDict(dict(
            filters=[[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]],
            embedding=dict(dim=16), n_highway=2, activation="relu", n_characters=261,
            max_characters_per_token=50)),
        lstm=ml_collections.ConfigDict(dict(
            dim=4096, projection_dim=512, n_layers=2, cell_clip=3.0, proj_clip=3.0, use_skip_connections=True)),
        bidirectional=True,
        share_embedding_softmax=False,
    ))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=128,                 # per device, as bilm-tf's batch_size is per GPU
        unroll_steps=20,
        n_negative_samples_batch=8192,
        sample_softmax=True,            # False: train with the full softmax (bilm-tf's option)
        # Each batch row's carried LSTM state is zeroed with this probability at every step, so that
        # the model also learns to start from the zero state that evaluation and embeddings start
        # from, where bilm-tf's recipe often blows up (benchmarks/TRAINING.md).
        # bilm-tf has no resets: an options.json config sets 0.
        state_reset_probability=0.05,
        dropout=0.1,
        all_clip_norm_val=10.0,
        learning_rate=0.2,
        n_epochs=10,
        n_train_tokens=config_dict.placeholder(int),  # None: counted from the training data
        max_steps=config_dict.placeholder(int),       # stop early (tests, smoke runs)
        seed=0,
        log_every=100,
        eval_every=5000,                # heldout perplexity during training (0: only at the end)
        checkpoint_every=1000,
        keep_checkpoints=3,
        matmul_precision="default",     # "highest" for full float32 on GPUs with TF32
        scan_unroll=1,                  # LSTM time steps per loop iteration (a speed knob)
        compute_dtype="float32",        # "bfloat16": bf16 matmul operands, f32 accumulation (GPUs)
    ))
    c.data = ml_collections.ConfigDict(dict(train_prefix="", heldout_prefix="", vocab_file=""))
    c.eval = ml_collections.ConfigDict(dict(batch_size=64, unroll_steps=20))
    c.init_from = ""
    c.init_softmax_from = ""
    c.export_after_training = ""   # e.g. "export/elmo.hdf5", relative to the workdir
    c.example_sentences = []        # embedded with the exported model after training
    return c


def use_character_inputs(config: ml_collections.ConfigDict) -> bool:
    return config.model.get("char_cnn") is not None


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What the training and evaluation steps (elmojax.train.step) and their model need to know
    of a config; static under jit."""
    bidirectional: bool
    use_character_inputs: bool
    share_embedding_softmax: bool
    dropout: float
    unroll_steps: int
    n_negative_samples_batch: int
    n_vocab: int
    sample_softmax: bool = True  # False: train with the full softmax (bilm-tf's sample_softmax option)
    state_reset_probability: float = 0.0  # each batch row's LSTM carry is zeroed with this probability
    numerics: Numerics = Numerics()  # every product's precision and operand dtype
    scan_unroll: int = 1  # the model's LSTM time steps per loop iteration


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """bilm-tf's optimizer: Adagrad at `learning_rate` after clipping the gradients' global norm."""
    learning_rate: float
    clip_norm: float


def _train_field(config: ml_collections.ConfigDict, name: str) -> Any:
    """config.train's field, or base_config's where the config has none."""
    return config.train[name] if name in config.train else base_config().train[name]


def numerics(config: ml_collections.ConfigDict) -> Numerics:
    """The products' numerics a config trains with (train.matmul_precision, train.compute_dtype)."""
    return Numerics(_train_field(config, "matmul_precision"), _train_field(config, "compute_dtype"))


def step_settings(config: ml_collections.ConfigDict, n_vocab: int) -> StepSettings:
    """The step's settings for a config and a vocabulary of n_vocab tokens."""
    return StepSettings(
        bidirectional=bool(config.model.bidirectional),
        use_character_inputs=use_character_inputs(config),
        share_embedding_softmax=bool(config.model.share_embedding_softmax),
        dropout=float(config.train.dropout),
        unroll_steps=int(config.train.unroll_steps),
        n_negative_samples_batch=int(config.train.n_negative_samples_batch),
        n_vocab=n_vocab,
        sample_softmax=bool(_train_field(config, "sample_softmax")),
        state_reset_probability=float(_train_field(config, "state_reset_probability")),
        numerics=numerics(config),
        scan_unroll=int(_train_field(config, "scan_unroll")),
    )


def optimizer_settings(config: ml_collections.ConfigDict) -> OptimizerSettings:
    return OptimizerSettings(learning_rate=config.train.learning_rate, clip_norm=config.train.all_clip_norm_val)


def streams(config: ml_collections.ConfigDict) -> Streams:
    """What the datasets of a config's run yield (elmojax.data.make_dataset's first argument)."""
    chars = config.model.char_cnn.max_characters_per_token if use_character_inputs(config) else None
    return Streams(bidirectional=bool(config.model.bidirectional), max_characters_per_token=chars)


def options_json(config: ml_collections.ConfigDict, n_tokens_vocab: Optional[int] = None) -> dict:
    """The config as a bilm-tf options.json dict (architecture and training fields)."""
    d = {"lstm": config.model.lstm.to_dict(), "bidirectional": bool(config.model.bidirectional),
         "share_embedding_softmax": bool(config.model.share_embedding_softmax)}
    if use_character_inputs(config):
        d["char_cnn"] = config.model.char_cnn.to_dict()
    for field in TRAIN_FIELDS:
        d[field] = config.train[field]
    if n_tokens_vocab is not None:
        d["n_tokens_vocab"] = n_tokens_vocab
    return d


def bilm_options(config: ml_collections.ConfigDict, n_tokens_vocab: Optional[int] = None) -> BiLMOptions:
    return BiLMOptions.from_dict(options_json(config, n_tokens_vocab), source="config.model")


def config_from_options_json(d: dict, source: str) -> ml_collections.ConfigDict:
    """A config honouring every field of a bilm-tf training options.json."""
    c = base_config()
    known = set(TRAIN_FIELDS) | {"char_cnn", "lstm", "bidirectional", "share_embedding_softmax", "n_tokens_vocab"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{source}: unknown options field '{unknown[0]}'{nearest(unknown[0], known)}")
    if "lstm" not in d:
        raise ValueError(f"{source}: missing field 'lstm'")
    BiLMOptions.from_dict(d, source=source)  # the architecture, checked before it is copied
    for field in ("bidirectional", "share_embedding_softmax", "sample_softmax"):
        if not isinstance(d.get(field, False), bool):
            raise ValueError(f"{source}: field '{field}' must be true or false, got {d[field]!r}")
    c.model.lstm = ml_collections.ConfigDict({**dict(cell_clip=None, proj_clip=None, n_layers=1,
                                                     use_skip_connections=False), **d["lstm"]})
    c.model.char_cnn = ml_collections.ConfigDict(d["char_cnn"]) if d.get("char_cnn") else None
    c.model.bidirectional = d.get("bidirectional", False)  # bilm-tf's default
    c.model.share_embedding_softmax = d.get("share_embedding_softmax", False)
    for field in TRAIN_FIELDS:
        if field in d:
            c.train[field] = d[field]
    c.train.state_reset_probability = 0.0  # bilm-tf's recipe exactly (set it to opt in)
    BiLMOptions.from_dict(options_json(c), source=source)  # validate early, naming the file
    return c


def nearest(name: str, known) -> str:
    """ " (did you mean 'x'?)" for the known name closest to a misspelt one, or ""."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _integer(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an integer of at least {low}"


def _number(test, what: str):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and test(v), what


# Each checked field: a test of its value, and what the value must be.
_FIELDS = {
    "train.batch_size": _integer(1), "train.unroll_steps": _integer(1), "train.n_negative_samples_batch": _integer(1),
    "train.sample_softmax": (lambda v: isinstance(v, bool), "true or false"),
    "train.state_reset_probability": _number(lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "train.dropout": _number(lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1"),
    "train.all_clip_norm_val": _number(lambda v: v > 0, "a number above 0"),
    "train.learning_rate": _number(lambda v: v >= 0, "a number of at least 0"),  # 0: the params stay
    "train.n_epochs": _integer(1), "train.n_train_tokens": _integer(1), "train.max_steps": _integer(1),
    "train.seed": _integer(0), "train.log_every": _integer(1), "train.eval_every": _integer(0),
    "train.checkpoint_every": _integer(1), "train.keep_checkpoints": _integer(1), "train.scan_unroll": _integer(1),
    "train.matmul_precision": (lambda v: v in ("default", "high", "highest"), "'default', 'high' or 'highest'"),
    "train.compute_dtype": (lambda v: v in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
    "eval.batch_size": _integer(1), "eval.unroll_steps": _integer(1),
}
_OPTIONAL = {"train.n_train_tokens", "train.max_steps", "train.eval_every"}  # None: unset


def validate(config: ml_collections.ConfigDict, source: str = "config") -> ml_collections.ConfigDict:
    """Checks a training config's fields by type and range, and its model by options.json's
    rules; a ValueError names the first bad field and what it must be."""
    for field, (test, what) in _FIELDS.items():
        section, key = field.split(".")
        value = config[section].get(key)
        if value is None and field in _OPTIONAL:
            continue
        if not test(value):
            raise ValueError(f"{source}: {field} must be {what}, got {value!r}")
    bilm_options(config)
    return config
