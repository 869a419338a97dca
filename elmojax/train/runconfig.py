"""The workdir is the run: the config a run was started with, stored in it, and what may change
when it resumes.

  WORKDIR/config.json   every field of the run's resolved config, written when the run starts
                        (and again when it resumes with changed settings), beside its
                        vocab.txt and options.json

Train, evaluate and export on an existing workdir use its stored config when no --config is
given (--config.* overrides apply to it). A config given for an existing run is compared with
the stored one field by field, and the vocabulary by its tokens, before any checkpoint is read:
the fields in RESUMABLE take effect, each change logged in one line; a difference in any other
field (the model, the vocabulary's tokens, the data, the batch, the softmax, the seed) stops the
run with one error naming each such field with both values. A workdir without checkpoints has
nothing to lose: its stored config is replaced, the changes logged. Workdirs written before
config.json existed have the config in each checkpoint's metadata, which is used instead.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Optional

import ml_collections

from elmojax.train.config import base_config
from elmojax.formats import files
from elmojax.formats.dicts import flatten
from elmojax.train import checkpoint

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"

# What a resumed run may change (a field, or a section and everything in it): how long it trains
# and how often it logs, evaluates and saves; the step size and clipping (what the divergence
# message advises to resume with); dropout and state resets (the blow-up remedy); the speed
# knobs; evaluation, and what happens after training; the vocabulary file's path (its tokens are
# compared). init_from and init_softmax_from only matter to a run's first step. The training
# data's pattern may change where only the data's place did (see _moved).
RESUMABLE = ("train.n_epochs", "train.n_train_tokens", "train.max_steps", "train.log_every", "train.eval_every",
             "train.checkpoint_every", "train.keep_checkpoints", "train.learning_rate", "train.all_clip_norm_val",
             "train.dropout", "train.state_reset_probability", "train.matmul_precision", "train.scan_unroll",
             "train.compute_dtype", "data.heldout_prefix", "data.vocab_file", "eval", "init_from",
             "init_softmax_from", "export_after_training", "example_sentences")


def resumable(field: str) -> bool:
    return any(field == r or field.startswith(r + ".") for r in RESUMABLE)


def config_file(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def from_dict(d: dict, source: str) -> ml_collections.ConfigDict:
    """A config from its stored dict; a field the dict lacks (a newer elmojax's) gets
    base_config's value."""
    if not isinstance(d, dict) or not isinstance(d.get("model"), dict) or not isinstance(d.get("train"), dict):
        raise ValueError(f"{source}: not an elmojax run's config (no model and train sections)")
    config = ml_collections.ConfigDict(d)

    def fill(node: ml_collections.ConfigDict, base: dict) -> None:
        for key, value in base.items():
            if key not in node:
                node[key] = value
            elif isinstance(value, dict) and isinstance(node[key], ml_collections.ConfigDict):
                fill(node[key], value)  # (a section stored as None, a word model's char_cnn, stays so)

    fill(config, base_config().to_dict())
    return config


def set_field(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
    """config's dotted field set to value; a KeyError for a field it lacks (a word model's
    char_cnn.*, say), a TypeError if the field's type does not take the value."""
    *sections, key = field.split(".")
    node = config
    for section in sections:
        node = node.get(section) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        raise KeyError(field)
    node[key] = value


def _plain(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


def stored(workdir: str) -> Optional[ml_collections.ConfigDict]:
    """The run's stored config: WORKDIR/config.json, else (a workdir of an earlier elmojax) the
    config in its newest checkpoint's metadata; None for a workdir that holds no run."""
    path = config_file(workdir)
    if os.path.isfile(path):
        return from_dict(files.read_json(path), path)
    meta = checkpoint.read_meta(workdir) if os.path.isdir(checkpoint.checkpoint_dir(workdir)) else None
    if meta is None:
        return None
    return from_dict(json.loads(meta.config), f"{checkpoint.checkpoint_dir(workdir)} (its metadata)")


def save(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the config as WORKDIR/config.json (atomically): one field a line, lists on one."""
    def dumps(value, indent: str = "") -> str:
        if isinstance(value, dict) and value:
            inner = ",\n".join(f'{indent}  {json.dumps(k)}: {dumps(v, indent + "  ")}' for k, v in value.items())
            return f"{{\n{inner}\n{indent}}}"
        return json.dumps(value, ensure_ascii=False)

    with files.atomic_output(config_file(workdir)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps(_plain(config)) + "\n")


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of config with the command line's --config.FIELD=VALUE overrides ({field: value})."""
    out = ml_collections.ConfigDict(config.to_dict())
    for field, value in overrides.items():
        try:
            set_field(out, field, value)
        except (KeyError, AttributeError):
            raise ValueError(f"--config.{field}: no such field in the run's stored config") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"--config.{field}={value!r}: {e}") from None
    return out


def differences(then: ml_collections.ConfigDict, now: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
    """(field, value then, value now) for every field whose values differ, in field order."""
    a, b = flatten(_plain(then)), flatten(_plain(now))
    return [(f, a.get(f), b.get(f)) for f in list(a) + [f for f in b if f not in a] if a.get(f) != b.get(f)]


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def reconcile(workdir: str, config: ml_collections.ConfigDict, vocab_tokens: list[str],
              stored_vocab: Optional[list[str]], has_checkpoints: bool) -> None:
    """Checks a config given for the run in `workdir` against its stored one (a ValueError
    naming every field that cannot change, before anything is restored) and logs each change
    that takes effect. `vocab_tokens` are the given vocabulary's, `stored_vocab` the run's copy's."""
    then = stored(workdir)
    if then is None:
        return
    changes = differences(then, config)
    fixed = [c for c in changes if not resumable(c[0]) and not (c[0] == "data.train_prefix" and _moved(c[1], c[2]))]
    listed = [f"{field}: {_show(a)} in the run, {_show(b)} now" for field, a, b in fixed]
    if stored_vocab is not None and stored_vocab != vocab_tokens:
        listed.append(f"the vocabulary's tokens: {len(stored_vocab)} in the run ({os.path.join(workdir, 'vocab.txt')}), "
                      f"{len(vocab_tokens)} now ({config.data.vocab_file}), "
                      f"{_first_difference(stored_vocab, vocab_tokens)}")
    if listed and has_checkpoints:
        listed = "; ".join(listed)
        raise ValueError(f"{workdir}: this run was started with another config ({config_file(workdir)}): {listed}. "
                         f"These define the run and cannot change when it resumes: leave them as they were (without "
                         f"--config a run goes on with its own config), or start a new run from this one in another "
                         f"workdir (--workdir=NEW --config.init_from={workdir})")
    for field, a, b in changes:
        log.info("config: %s: %s in the run, %s now%s", field, _show(a), _show(b),
                 "" if has_checkpoints else " (no checkpoint yet: the run starts afresh with it)")


def _moved(then: str, now: str) -> bool:
    """Whether a training data pattern changed only where the data lies: the run's pattern
    matches no file any more (moved), or both match files of the same names and sizes (copied)."""
    def shards(pattern: str) -> list[tuple[str, int]]:
        return sorted((os.path.basename(p), os.path.getsize(p)) for p in glob.glob(os.path.expanduser(pattern))
                      if os.path.isfile(p))

    old = shards(then)
    return not old or old == shards(now)


def _first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first differing at line {i + 1} ({x!r} in the run's, {y!r} now)"
    return f"the same up to line {min(len(a), len(b))}"
