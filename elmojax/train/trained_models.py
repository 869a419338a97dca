"""Model files in and out: the vocabulary, a trained model from a workdir, an exported weight
file or a bilm-tf training checkpoint (load_trained), the start of a fine-tuning run
(init_from), and export in bilm-tf's format.

A workdir holds checkpoints (elmojax.train.checkpoint), options.json and a copy of the vocabulary
(VOCAB_FILE). An export is bilm-tf's hdf5 weight file with options.json, the softmax
(FILE_softmax.hdf5) and the vocabulary beside it. A bilm-tf checkpoint (elmojax.formats.tf_variables)
is a TensorFlow checkpoint with bilm-tf's options.json beside it, and the vocabulary it was
trained with (vocab.txt, or the only vocab*.txt).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import TYPE_CHECKING, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import SingleDeviceSharding

from elmojax.formats import files, hdf5, remote, tf_checkpoint, tf_variables
from elmojax.formats.dicts import flatten
from elmojax.formats.options import BiLMOptions, N_CHARACTERS_PREDICT
from elmojax.formats.vocab import UnicodeCharsVocabulary, Vocabulary
from elmojax.model.bilm import BiLM
from elmojax.train import checkpoint, config as config_lib
from elmojax.train.step import INITIAL_ACCUMULATOR, TrainState, make_optimizer, new_state

if TYPE_CHECKING:
    from elmojax.train.trainer import Trainer

log = logging.getLogger(__name__)

VOCAB_FILE = "vocab.txt"  # the vocabulary, copied into the workdir


def load_vocab(config: ml_collections.ConfigDict, vocab_file: Optional[str] = None) -> Vocabulary:
    vocab_file = vocab_file or config.data.vocab_file
    if not vocab_file:
        raise ValueError("no vocabulary: set --config.data.vocab_file=FILE")
    if config_lib.use_character_inputs(config):
        return UnicodeCharsVocabulary(vocab_file, config.model.char_cnn.max_characters_per_token, validate_file=True)
    return Vocabulary(vocab_file, validate_file=True)


def vocab_tokens(vocab: Vocabulary) -> list[str]:
    return [vocab.id_to_word(i) for i in range(vocab.size)]


def remap_rows(old: np.ndarray, old_vocab: list[str], new: np.ndarray, new_vocab: list[str]) -> tuple[np.ndarray, int]:
    """Rows of `new` (fresh init) overwritten by `old`'s rows for tokens both vocabularies have."""
    index = {token: i for i, token in enumerate(old_vocab)}
    out = np.array(new, copy=True)
    shared = [(j, index[t]) for j, t in enumerate(new_vocab) if t in index]
    if shared:
        new_ids, old_ids = map(np.array, zip(*shared))
        out[new_ids] = np.asarray(old)[old_ids]
    return out, len(shared)


@dataclasses.dataclass(frozen=True)
class ExportedFiles:
    """An exported model's files in bilm-tf's format: the weights (hdf5), options.json, the softmax
    (hdf5) and the vocabulary (None: an export of a bilm-tf checkpoint without one)."""
    weights: str
    options: str
    softmax: str
    vocab: Optional[str]

    def to_json(self) -> dict:
        """The files as --mode=export prints them (no "vocab" where there is none)."""
        out = {"weights": self.weights, "options": self.options, "softmax": self.softmax, "vocab": self.vocab}
        return out if self.vocab is not None else {k: v for k, v in out.items() if k != "vocab"}


def exported_files(weight_file: str, softmax_file: str = "") -> ExportedFiles:
    """The files an export writes beside its weight file."""
    stem, _ = os.path.splitext(weight_file)
    directory = os.path.dirname(os.path.abspath(weight_file))
    return ExportedFiles(weight_file, os.path.join(directory, "options.json"), softmax_file or f"{stem}_softmax.hdf5",
                      os.path.join(directory, VOCAB_FILE))


def files_beside(weight_file: str, softmax_file: str = "") -> ExportedFiles:
    """The files that go with a weight file: an export's (exported_files), or AllenNLP's
    published names (X_weights.hdf5 with X_options.json and X_softmax_weights.hdf5) and a
    vocabulary as the only vocab*.txt beside it, where an export's are not there."""
    found = exported_files(weight_file, softmax_file)
    stem = os.path.splitext(weight_file)[0]
    if stem.endswith("_weights"):
        published = stem[:-len("_weights")]
        if not os.path.isfile(found.options):
            found = dataclasses.replace(found, options=published + "_options.json")
        if not softmax_file and not os.path.isfile(found.softmax):
            found = dataclasses.replace(found, softmax=published + "_softmax_weights.hdf5")
    if not os.path.isfile(found.vocab):
        beside = tf_variables.vocab_beside(os.path.dirname(os.path.abspath(weight_file)))
        found = dataclasses.replace(found, vocab=beside or found.vocab)
    return found


def is_tf_checkpoint(path: str) -> bool:
    """Whether `path` is a TensorFlow checkpoint (a prefix, one of its files, its directory)
    rather than a workdir."""
    return not os.path.isdir(checkpoint.checkpoint_dir(path)) and tf_checkpoint.is_checkpoint(path)


def trained_vocab_file(path: str) -> str:
    """The vocabulary of a workdir (copied into it), of an exported weight file or of a bilm-tf
    checkpoint (beside it)."""
    if is_tf_checkpoint(path):
        directory = os.path.dirname(tf_checkpoint.resolve_prefix(path)) or "."
        return tf_variables.vocab_beside(directory) or os.path.join(directory, VOCAB_FILE)
    return os.path.join(path, VOCAB_FILE) if os.path.isdir(path) else files_beside(path).vocab


@dataclasses.dataclass
class Trained:
    """A trained model as load_trained reads it."""
    params: dict                    # {"bilm": ..., "softmax": {"W", "b"}} (host arrays)
    options: dict                   # its options.json, as a dict
    vocab: Optional[list[str]]      # the softmax rows' tokens; None: a bilm-tf checkpoint without a vocabulary
    vocab_file: Optional[str]       # the file they were read from (None: an export's softmax file held them)
    source: str                     # where it was read from
    step: Optional[int] = None      # a workdir's checkpoint step
    carry: Optional[dict] = None    # the LSTM state training ended in (a workdir's checkpoint, when asked for)


def load_tf_checkpoint(path: str, vocab_file: str = "", need_vocab: bool = True
                       ) -> tuple[tf_variables.TrainingCheckpoint, Optional[list[str]]]:
    """A bilm-tf training checkpoint and its vocabulary's tokens: the vocabulary beside it, or
    else `vocab_file` (said in a log line); with neither, an error if `need_vocab`, else None."""
    trained = tf_variables.read_training_checkpoint(path)
    vocab = trained.vocab_file
    if vocab is None and vocab_file:
        log.info("%s: no vocabulary beside the checkpoint; using %s (--config.data.vocab_file) as its vocabulary",
                 trained.prefix, vocab_file)
        vocab = trained.vocab_file = vocab_file
    if vocab is None:
        if not need_vocab:
            return trained, None
        directory = os.path.dirname(trained.prefix) or "."
        raise ValueError(f"{trained.prefix}: no vocabulary beside the checkpoint; copy the one it was trained with "
                         f"into {directory} as vocab.txt (the released ELMo's: vocab-2016-09-10.txt), or give it "
                         f"with --config.data.vocab_file=FILE")
    tokens = vocab_tokens(Vocabulary(vocab, validate_file=True))
    rows = trained.params["softmax"]["b"].shape[0]
    if len(tokens) != rows:
        raise ValueError(f"{vocab}: {len(tokens)} tokens, but the checkpoint's softmax has {rows} rows "
                         f"(n_tokens_vocab); not the vocabulary it was trained with")
    return trained, tokens


def local_model(path: str) -> str:
    """`path` as it is; a published model's name (remote.pretrained) or an exported or published
    weight file's http(s) URL as its file in the cache, the files that go with it (files_beside)
    fetched beside it where the server has them."""
    if remote.is_published(path):
        path = remote.pretrained(path)[1]
    if not remote.is_url(path):
        return path
    weight_url = path
    name = weight_url.split("?")[0].rsplit("/", 1)[-1]
    stem = os.path.splitext(name)[0]
    published = stem[:-len("_weights")] if stem.endswith("_weights") else stem
    return remote.local_path_beside(weight_url, ["options.json", f"{stem}_softmax.hdf5", VOCAB_FILE,
                                                 f"{published}_options.json", f"{published}_softmax_weights.hdf5"])


def load_trained(path: str, softmax_file: str = "", vocab_file: str = "", need_vocab: bool = True,
                 with_carry: bool = False) -> Trained:
    """The model of a workdir's latest readable checkpoint (its LSTM carry too, `with_carry`), of
    an export (a path, or an http(s) URL with its files beside it) or of a bilm-tf training
    checkpoint (whose vocabulary, where none lies beside it, is `vocab_file`; with neither,
    an error if `need_vocab`, else a Trained without one)."""
    path = local_model(path)
    softmax_file = remote.local_path(softmax_file) if softmax_file else softmax_file
    if is_tf_checkpoint(path):
        trained, tokens = load_tf_checkpoint(path, vocab_file, need_vocab)
        return Trained(trained.params, trained.options, tokens, trained.vocab_file, trained.prefix, trained.global_step)
    if os.path.isdir(path):
        return _load_workdir(path, with_carry)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: neither a workdir with checkpoints, an exported weight file nor a TensorFlow "
                         f"checkpoint")
    return _load_export(path, softmax_file)


def abstract_train_state(config: ml_collections.ConfigDict, n_vocab: int, batch_size: int) -> TrainState:
    """The shapes and dtypes of a TrainState of `config`'s model and optimizer over `n_vocab`
    tokens, with a carry of `batch_size` rows, on this process's first device: what a
    workdir's checkpoint is read into for its params (no trainer, mesh or compilation)."""
    settings = config_lib.step_settings(config, n_vocab)
    model = BiLM(config_lib.bilm_options(config, n_vocab), settings.use_character_inputs)
    tx = make_optimizer(config_lib.optimizer_settings(config))
    shapes = jax.eval_shape(lambda: new_state(model, tx, settings, jax.random.PRNGKey(0), batch_size))
    device = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


def _load_workdir(path: str, with_carry: bool) -> Trained:
    """The model of a workdir's latest readable checkpoint (with its carry, `with_carry`)."""
    if not checkpoint.steps(path):
        raise ValueError(f"{path}: no checkpoint in this workdir yet ({checkpoint.checkpoint_dir(path)}); a run "
                         f"saves one every --config.train.checkpoint_every steps and when it ends")
    vocab = Vocabulary(trained_vocab_file(path))

    def abstract_state(meta: checkpoint.Meta) -> TrainState:  # the carry as saved
        config = ml_collections.ConfigDict(json.loads(meta.config))
        return abstract_train_state(config, vocab.size, meta.global_batch_size)

    step, state, meta, _ = checkpoint.restore(path, abstract_state)
    carry = jax.device_get(state.lstm_state) if with_carry else None
    return Trained(jax.device_get(state.params), meta.options, vocab_tokens(vocab), vocab.filename, path, step, carry)


def _load_export(path: str, softmax_file: str) -> Trained:
    """The model of an exported (or AllenNLP's published) weight file and the files beside it."""
    exported = files_beside(path, softmax_file)
    if not os.path.isfile(exported.options):
        raise ValueError(f"{path}: no options.json beside it ({exported.options})")
    options_d = files.read_json(exported.options)
    options = BiLMOptions.from_dict(options_d, source=exported.options)
    if not os.path.isfile(exported.softmax):
        raise ValueError(f"{path}: no softmax file {exported.softmax} (give --config.init_softmax_from=FILE)")
    softmax_w, softmax_b, vocab = hdf5.load_softmax(exported.softmax)
    vocab_file = exported.vocab if os.path.isfile(exported.vocab) else None
    if vocab is None:  # (AllenNLP's published softmax file holds none)
        if not os.path.isfile(exported.vocab):
            raise ValueError(f"{exported.softmax}: holds no vocabulary, and there is no {VOCAB_FILE} (nor a single "
                             f"vocab*.txt) beside {path}; put the vocabulary of the softmax's rows there")
        vocab = vocab_tokens(Vocabulary(exported.vocab, validate_file=True))
    if len(vocab) != softmax_w.shape[0]:
        raise ValueError(f"{exported.vocab}: {len(vocab)} tokens for the {softmax_w.shape[0]} rows of "
                         f"{exported.softmax}; not the softmax's vocabulary")
    if options.char_cnn is None:
        options = dataclasses.replace(options, n_tokens_vocab=softmax_w.shape[0])
    params = {"bilm": hdf5.load_weights(path, options), "softmax": {"W": softmax_w, "b": softmax_b}}
    if options_d.get("share_embedding_softmax"):
        del params["softmax"]["W"]
    return Trained(params, options_d, vocab, vocab_file, path)


def _architecture(options_d: dict) -> dict:
    d = BiLMOptions.from_dict(options_d).to_dict()
    d.pop("n_tokens_vocab", None)
    if "char_cnn" in d:
        d["char_cnn"].pop("n_characters")
    return d


def architecture_difference(trained: dict, ours: dict) -> Optional[str]:
    """The first field in which two options.json dicts' architectures differ, as
    "lstm.dim: 16 in the trained model, 32 in the config"; None if they are the same model."""
    a, b = flatten(_architecture(trained)), flatten(_architecture(ours))
    for field in sorted(set(a) | set(b)):
        if a.get(field) != b.get(field):
            return f"{field}: {a.get(field)} in the trained model, {b.get(field)} in the config"
    return None


def _remapped(trained: dict, start: dict, old_vocab: list[str], vocab: list[str], word_inputs: bool) -> tuple[dict, int]:
    """`trained` (params, or a params-shaped tree such as Adagrad's accumulators) with its
    vocabulary tables re-mapped by token onto `start`'s rows; and how many tokens were shared."""
    out = {"bilm": trained["bilm"], "softmax": dict(start["softmax"])}
    n_shared = len(vocab)
    if word_inputs:
        out["bilm"]["embedder"]["embedding"], n_shared = remap_rows(
            trained["bilm"]["embedder"]["embedding"], old_vocab, start["bilm"]["embedder"]["embedding"], vocab)
    for name in out["softmax"]:
        if name in trained["softmax"]:
            out["softmax"][name], n_shared = remap_rows(trained["softmax"][name], old_vocab, start["softmax"][name], vocab)
    return out, n_shared


def init_from(trainer: Trainer, fresh: dict, path: str, softmax_file: str,
              vocab: list[str]) -> tuple[dict, Optional[dict]]:
    """Params for fine-tuning, and Adagrad's accumulators when `path` is a bilm-tf checkpoint
    (None otherwise: Adagrad starts afresh). The trained model's softmax (and word embedding)
    rows are re-mapped by token onto the new vocabulary; tokens it did not have keep their fresh
    init, and their accumulators the initial value. With the trained model's own vocabulary
    everything carries over as it is, as bilm-tf's restart does."""
    accumulators = None
    if is_tf_checkpoint(path):
        trained, old_vocab = load_tf_checkpoint(path, trainer.config.data.vocab_file)
        params, options_d, accumulators = trained.params, trained.options, trained.accumulators
        what = f"bilm-tf checkpoint {trained.prefix} (global_step {trained.global_step})"
    else:
        model = load_trained(path, softmax_file)
        params, options_d, old_vocab, what = model.params, model.options, model.vocab, path
    difference = architecture_difference(options_d, config_lib.options_json(trainer.config))
    if difference:
        raise ValueError(f"{path}: its architecture differs from the config's model ({difference})")
    as_is = old_vocab == vocab and jax.tree.structure(params) == jax.tree.structure(fresh)
    if as_is:  # nothing to re-map: no copies of the vocabulary-sized tables (1.6 GB each for the released ELMo)
        n_shared = len(vocab)
        out = params
    else:
        fresh = jax.device_get(fresh)
        out, n_shared = _remapped(params, fresh, old_vocab, vocab, trainer.options.char_cnn is None)
        if accumulators is not None:
            initial = jax.tree.map(lambda x: np.full(np.shape(x), INITIAL_ACCUMULATOR, np.float32), fresh)
            accumulators, _ = _remapped(accumulators, initial, old_vocab, vocab, trainer.options.char_cnn is None)
    out = jax.tree.map(lambda x: np.asarray(x, np.float32), out)
    if accumulators is not None:
        accumulators = jax.tree.map(lambda x: np.asarray(x, np.float32), accumulators)
    carried = "params" + (" and Adagrad's accumulators" if accumulators is not None else " (Adagrad starts afresh)")
    if as_is:
        log.info("init from %s: its own vocabulary (%d tokens); %s carried over as they are", what, len(vocab), carried)
    else:
        log.info("init from %s: a new vocabulary; %s carried over, with the softmax%s rows of %d of its %d tokens "
                 "re-mapped from the trained model's and %d initialized fresh", what, carried,
                 " and word embedding" if trainer.options.char_cnn is None else "", n_shared, len(vocab),
                 len(vocab) - n_shared)
    return out, accumulators


def export(path: str, output: str, trained: Optional[Trained] = None) -> ExportedFiles:
    """Writes a trained model as bilm-tf files: weights (hdf5), options.json (n_characters 262)
    beside them, the softmax (softmax/W, softmax/b, and the vocabulary) and vocab.txt (a bilm-tf
    checkpoint without a vocabulary: the softmax without one, and no vocab.txt, as bilm-tf's
    dump_weights needs none). All are written together or not at all (a full disk leaves
    nothing behind). Returns the files written."""
    if os.path.isdir(output):
        raise ValueError(f"--output={output}: a directory; give the weight file to write (FILE.hdf5)")
    trained = trained or load_trained(path, need_vocab=False)
    params, options_d, tokens = trained.params, trained.options, trained.vocab
    options = BiLMOptions.from_dict(options_d, source=path)
    exported = exported_files(output)
    prediction_options = dict(options_d)
    if "char_cnn" in prediction_options:
        prediction_options["char_cnn"] = {**prediction_options["char_cnn"], "n_characters": N_CHARACTERS_PREDICT}
    softmax_w = params["softmax"].get("W")
    if softmax_w is None:  # shared with the word embedding
        softmax_w = params["bilm"]["embedder"]["embedding"]
    contents = {
        output: hdf5.weights_image(params["bilm"], options, output),
        exported.options: (json.dumps(prediction_options, indent=2) + "\n").encode("utf-8"),
        exported.softmax: hdf5.softmax_image(softmax_w, params["softmax"]["b"], exported.softmax, tokens),
    }
    if tokens is None:
        log.info("%s: no vocabulary beside it, so the export has none (no %s; its softmax's rows are the "
                 "vocabulary it was trained with: put that beside the export as %s)", path, VOCAB_FILE, VOCAB_FILE)
        exported = dataclasses.replace(exported, vocab=None)
    else:
        contents[exported.vocab] = "".join(t + "\n" for t in tokens).encode("utf-8")
    files.write_bytes(contents)
    return exported
