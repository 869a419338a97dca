"""Train, evaluate and export a biLM.

  python -m elmojax.main --config=configs/quickstart.py --workdir=DIR               train (resumes)
  python -m elmojax.main --mode=evaluate --workdir=DIR --config.data.heldout_prefix=GLOB
  python -m elmojax.main --mode=evaluate --model=FILE.hdf5 --config.data.heldout_prefix=GLOB
  python -m elmojax.main --mode=export --workdir=DIR --output=FILE.hdf5

Any config field can be overridden: --config.train.batch_size=64. Without --config, a workdir
that holds a run uses the run's own config (WORKDIR/config.json, with any overrides); a new run
uses the bundled quickstart config; evaluating or exporting a model file uses the defaults of
elmojax.config.base_config (name the heldout data with --config.data.heldout_prefix). Several
processes (hosts) train together when launched with --coordinator_address, --num_processes and
--process_id, or as the tasks of a SLURM job step (see launch/README.md). After training, the
config's end-of-run work follows (elmojax.after_training).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import signal
import sys
from typing import Optional

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

import elmojax
from elmojax.after_training import after_training
from elmojax.cli import bilm_tf_flags
from elmojax.process import runtime
from elmojax.train import config as config_lib, evaluation, loop, metrics, runconfig, trained_models
from elmojax.train.checkpoint import CheckpointError
from elmojax.train.config import base_config

log = logging.getLogger(__name__)


def configs_dir() -> str:
    """Where the bundled configs are: elmojax/configs/ in an installed package (the wheel carries
    the checkout's configs/ there), the checkout's top-level configs/ otherwise."""
    package = os.path.dirname(os.path.abspath(elmojax.__file__))
    installed = os.path.join(package, "configs")
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), "configs")


def config_names() -> list[str]:
    """The bundled configs' names (--config=NAME): their files' names without .py."""
    return sorted(name[:-3] for name in os.listdir(configs_dir()) if name.endswith(".py") and name != "__init__.py")


def resolve_config(value: str) -> str:
    """--config's value as a file for config_flags: a file's path (PATH or PATH:ARG) as it is; a
    bundled config's name (quickstart, bilm_options:/path/options.json) as its file's path."""
    path, colon, arg = value.partition(":")
    if os.path.isfile(path):
        return value
    if path in config_names():
        return os.path.join(configs_dir(), path + ".py") + colon + arg
    raise ValueError(f"--config={value}: no such config file or name (the bundled configs by name: "
                     f"{', '.join(config_names())})")


_QUICKSTART = os.path.join(configs_dir(), "quickstart.py")
_CONFIG_HELP = "a config file (PATH or PATH:ARG), or the name of a bundled one: "

_CONFIG: flags.FlagHolder  # defined by parse_flags: its default is parsed at once, with the overrides
_config_given = False      # whether --config was on the command line
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "where checkpoints, logs and the vocabulary go")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "export"], "what to do")
_MODEL = flags.DEFINE_string("model", None, "evaluate/export: a workdir or an exported weight file "
                                            "(default: --workdir)")
_OUTPUT = flags.DEFINE_string("output", None, "export: the weight file to write (FILE.hdf5)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: how many processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index")


def main(argv) -> None:
    del argv
    elmojax.setup()
    runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.getLogger().setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    handler = runtime.LogHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.WARNING, handlers=[handler],
                        force=True)
    model = _MODEL.value or _WORKDIR.value
    # SIGTERM and Ctrl-C: the training loop saves and stops by itself; elsewhere they raise
    # Stopped, so that nothing half-written stays (with several processes JAX's preemption
    # service has SIGTERM, and the loop alone answers it)
    stoppable = runtime.stop_on_signals() if jax.process_count() == 1 else contextlib.nullcontext()
    try:
        with stoppable:
            _run(model)
    except runtime.Stopped as e:
        print(f"{e}; {_AFTER_STOP[_MODE.value]}", file=sys.stderr)
        runtime.exit_command(e.exit_status)
    except KeyboardInterrupt:  # a second Ctrl-C while the training loop saves: at once
        print(f"stopped by a second SIGINT; {_AFTER_STOP[_MODE.value]}", file=sys.stderr)
        runtime.exit_command(128 + signal.SIGINT)
    except loop.Interrupted as e:
        print(e, file=sys.stderr)
    except (ValueError, KeyError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a full disk, a file system gone read-only
        print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)


_AFTER_STOP = {"train": "the run's checkpoints are as they were saved: run the same command again to go on",
               "evaluate": "nothing was written", "export": "nothing was written (an earlier export is as it was)"}


def _run(model: str) -> None:
    config = _config(_WORKDIR.value if _MODE.value == "train" else model)
    if missing := missing_data(config, _MODE.value):
        raise ValueError(missing)
    if _MODE.value == "train":
        run = loop.run_training(config, _WORKDIR.value)
        for line in after_training(run):
            print(line)
    elif jax.process_index() != 0:
        return  # evaluation and export run in process 0
    elif _MODE.value == "evaluate":
        result = evaluation.evaluate(config_lib.validate(config), model)
        log.info("%s", evaluation.summary(result.heldout))
        if result.health.line:
            print(result.health.line, file=sys.stderr)
        print(metrics.dumps(result.to_json()))
    else:
        if not _OUTPUT.value:
            raise ValueError("--mode=export needs --output=FILE.hdf5")
        written = trained_models.export(model, _OUTPUT.value)
        print(json.dumps(written.to_json()))


def _config(path: str) -> ml_collections.ConfigDict:
    """The config to use: --config's; else the run's own when `path` is a workdir holding one;
    else the quickstart's for a new run, base_config's for a model file (with the overrides)."""
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    if _config_given:
        return _CONFIG.value
    stored = runconfig.stored(path) if os.path.isdir(path) else None
    if stored is not None:
        return runconfig.with_overrides(stored, overrides)
    if _MODE.value == "train":
        return _CONFIG.value
    return runconfig.with_overrides(base_config(), overrides)


# config.data's fields in the order training reads them, and what `prepare --output DIR` makes of each
_DATA_FIELDS = {"vocab_file": "DIR/vocab.txt", "train_prefix": "DIR/train/", "heldout_prefix": "DIR/heldout/"}


def missing_data(config: ml_collections.ConfigDict, mode: str) -> Optional[str]:
    """One line naming the first config.data field whose file or glob is not there (training reads
    all three, evaluation the heldout data) and the `prepare` command that makes it; None when
    they are there or unset (what reads an unset one says what it needs)."""
    fields = list(_DATA_FIELDS) if mode == "train" else ["heldout_prefix"] if mode == "evaluate" else []
    for field in fields:
        value = config.data[field]
        if not value or (os.path.isfile(value) if field == "vocab_file" else _matches(value)):
            continue
        what, them = ("no such file", "it") if field == "vocab_file" else ("no files match", "them")
        output = _prepared_dir(field, value)
        them += f" (as {_DATA_FIELDS[field]}...)" if output == "DIR" else ""
        return (f"--config.data.{field}={value}: {what}; `python -m elmojax.prepare --input CORPUS.txt "
                f"--output {output}` makes {them} from a tokenized corpus (or set the field to your data)")
    return None


def _prepared_dir(field: str, value: str) -> str:
    """The --output DIR of the prepare run that makes `value` (DIR/vocab.txt, DIR/train/*, ...);
    DIR itself where the path does not have that form."""
    parts = value.split("/")
    if field == "vocab_file":
        return "/".join(parts[:-1]) or "."
    folder = _DATA_FIELDS[field].split("/")[1]
    return next(("/".join(parts[:i]) or "." for i in range(len(parts) - 1, -1, -1) if parts[i] == folder), "DIR")


def _matches(pattern: str) -> bool:
    """Whether a dataset glob matches a file (as data.list_shards reads it)."""
    return any(os.path.isfile(p) for p in glob.iglob(os.path.expanduser(pattern)))


def _config_first(argv: list[str]) -> list[str]:
    """argv with --config's value (--config=VALUE, or VALUE next) as resolve_config gives it, ahead
    of the other flags: absl reads the overrides of its fields (--config.FIELD, bilm-tf's
    --train_prefix) only after it."""
    config, rest, args = [], [], iter(argv[1:])
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key in ("-config", "--config"):
            config.append(f"{key}={resolve_config(value)}")
        elif arg in ("-config", "--config"):
            value = next(args, None)
            config += [arg] if value is None else [arg, resolve_config(value)]
        else:
            rest.append(arg)
    return [*argv[:1], *config, *rest]


def _train_elmo_recipe(args: list[str], translated: list[str]) -> list[str]:
    """["--config=billion_word"] for bin/train_elmo.py's command line (--train_prefix, no
    --config, a new run in --save_dir/--workdir; `translated`: args with bilm-tf's flags as
    elmojax's): bilm-tf's recipe, as that script trains it."""
    if (not any(re.match(r"-{1,2}train_prefix(=|$)", a) for a in args)
            or any(re.match(r"-{1,2}config(=|$)", a) for a in args)
            or any(re.match(r"-{1,2}mode=", a) and a.split("=", 1)[1] != "train" for a in args)):
        return []
    workdirs = [a.split("=", 1)[1] for a in translated if a.startswith("--workdir=")]
    if os.path.exists(runconfig.config_file(workdirs[-1] if workdirs else _WORKDIR.default)):
        return []  # a run already there goes on with its own config
    print("note: bilm-tf's --train_prefix without --config: bilm-tf's recipe (--config=billion_word, as "
          "bin/train_elmo.py trains it); --config=NAME for another", file=sys.stderr)
    return ["--config=billion_word"]


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad --config file or field reported in one line (exit 2)
    instead of a traceback."""
    global _CONFIG, _config_given
    translated = bilm_tf_flags(argv[1:])  # bilm-tf's flags as elmojax's
    argv = [*argv[:1], *_train_elmo_recipe(argv[1:], translated), *translated]
    config_file = ([a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")] or [None])[-1]  # absl: the last
    _config_given = any(re.match(r"-{1,2}config(=|$)", a) for a in argv[1:])
    try:
        argv = _config_first(argv)
    except ValueError as e:
        _usage_error(str(e))
    try:
        _CONFIG = config_flags.DEFINE_config_file("config", _QUICKSTART, _CONFIG_HELP + ", ".join(config_names()),
                                                  lock_config=True, sys_argv=argv)
        return flags.FLAGS(argv)
    except Exception as e:  # config_flags raises whatever loading or overriding raised
        text = str(e)
        if isinstance(e, (AttributeError, KeyError)):  # an override of a field the config does not have
            key = re.search(r"'([A-Za-z0-9_]+)", text)
            flag = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.") and key
                         and key.group(1) in a.split("=", 1)[0].split(".")), "--config")
            hint = re.search(r'Did you mean "([^"]+)"', text)
            _usage_error(f"{flag}: no such config field" + (f" (did you mean '{hint.group(1)}'?)" if hint else ""))
        if type(e).__name__ == "UnsupportedOperationError":  # (ml_collections' own, not exported)
            field = re.search(r"field config\.([\w.]+)", text)
            _usage_error(f"--config.{field.group(1) if field else '...'}: this field cannot be set on the command line "
                         f"(a list); copy the config file, change it there and give it with --config=FILE")
        if "Traceback" in text:  # raised by the config file's get_config: its last line says what
            _usage_error(f"--config={config_file}: {text.strip().splitlines()[-1]}")
        _usage_error(" ".join(text.split()))


def run(argv: list[str]) -> None:
    """The command line with `argv` (argv[0] the program's name) in this process: its flags
    parsed afresh, so that it can run more than once (the tests' bad command lines)."""
    flags.FLAGS.unparse_flags()
    for name in [name for name in flags.FLAGS if name == "config" or name.startswith("config.")]:
        delattr(flags.FLAGS, name)  # --config and its overrides: parse_flags defines them for this argv
    main(parse_flags(argv))


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
