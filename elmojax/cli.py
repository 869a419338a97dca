"""The `elmojax` command: one program for the jobs, each a subcommand.

  elmojax train --workdir=DIR [--config=FILE] [--config.FIELD=VALUE ...]    (python -m elmojax.main)
  elmojax evaluate --workdir=DIR | --model=FILE.hdf5 [--config.data.heldout_prefix=GLOB]
  elmojax export --workdir=DIR --output=FILE.hdf5
  elmojax prepare --input=corpus.txt --output=DIR [--heldout_fraction=0.01 ...]  (python -m elmojax.prepare)
  elmojax dump bilm|tokens|elmo|sentences|score --input=... --output=... --options=O --weights=W
                                                                            (python -m elmojax.dump)

Flags are spelled with underscores everywhere (--batch_size), inputs and outputs are --input
and --output. The older spellings (--batch-size, dump's --dataset/--out, positional INPUT
OUTPUT) still work, with a one-line note naming the new one. bilm-tf's script flags that map one
to one (--train_prefix, --vocab_file, --save_dir, --test_prefix, --outfile) are accepted as they
are. This module only translates: the jobs are elmojax.main, elmojax.prepare and elmojax.dump.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

PROG = "elmojax"

# subcommand -> its line in `elmojax --help`
COMMANDS = {
    "train": "train a biLM in --workdir, resuming a stopped run (python -m elmojax.main)",
    "evaluate": "heldout perplexity of a workdir or a weight file (python -m elmojax.main --mode=evaluate)",
    "export": "write a trained model as bilm-tf's weight file, --output=FILE.hdf5 (--mode=export)",
    "prepare": "turn tokenized text into training shards, heldout shards and a vocabulary",
    "dump": "embed text with a biLM into hdf5: bilm, tokens, elmo, sentences, score",
}

# main.py's flags shown by `elmojax train|evaluate|export --help`, in this order
_MAIN_FLAGS = ("workdir", "model", "output", "coordinator_address", "num_processes", "process_id")

# what each field of base_config means (`elmojax train --help` lists them)
CONFIG_FIELDS = {
    "model.char_cnn.filters": "the character CNN's [width, number of filters] pairs",
    "model.char_cnn.embedding.dim": "character embedding size",
    "model.char_cnn.n_highway": "highway layers after the CNN",
    "model.char_cnn.activation": "the CNN's activation (relu or tanh)",
    "model.char_cnn.n_characters": "character ids (261 training, 262 prediction: the same weights)",
    "model.char_cnn.max_characters_per_token": "characters a token is cut or padded to",
    "model.lstm.dim": "LSTM cell size",
    "model.lstm.projection_dim": "LSTM output size (the embedding size per direction)",
    "model.lstm.n_layers": "LSTM layers per direction",
    "model.lstm.cell_clip": "clip of the LSTM cell values",
    "model.lstm.proj_clip": "clip of the LSTM projection values",
    "model.lstm.use_skip_connections": "residual connections between LSTM layers",
    "model.bidirectional": "train the backward LM too",
    "model.share_embedding_softmax": "the softmax shares the token embedding (word inputs)",
    "train.batch_size": "sentences per batch and device (bilm-tf's per-GPU batch_size)",
    "train.unroll_steps": "time steps per batch row (truncated backpropagation)",
    "train.n_negative_samples_batch": "negative samples per batch (sampled softmax)",
    "train.sample_softmax": "the sampled softmax (False: the full softmax, bilm-tf's option)",
    "train.state_reset_probability": "chance a row's carried LSTM state is zeroed at a step (0: bilm-tf)",
    "train.dropout": "dropout on the LSTM inputs and the top output",
    "train.all_clip_norm_val": "the gradients' global norm clip",
    "train.learning_rate": "Adagrad's learning rate",
    "train.n_epochs": "passes over the training data",
    "train.n_train_tokens": "training tokens per epoch (unset: counted from the data)",
    "train.max_steps": "stop after this many steps (smoke runs)",
    "train.seed": "the random seed (initialization, batches, dropout, samples)",
    "train.log_every": "steps between log lines",
    "train.eval_every": "steps between heldout evaluations (0: only at the end)",
    "train.checkpoint_every": "steps between checkpoints",
    "train.keep_checkpoints": "checkpoints kept",
    "train.matmul_precision": "matmul precision (highest: full float32 on GPUs with TF32)",
    "train.scan_unroll": "LSTM time steps per loop iteration (a speed knob)",
    "train.compute_dtype": "float32, or bfloat16 matmul operands with float32 sums (GPUs)",
    "data.train_prefix": "training shards (a glob; elmojax prepare writes them)",
    "data.heldout_prefix": "heldout shards (a glob; empty: none)",
    "data.vocab_file": "the vocabulary, one token per line, <S> </S> <UNK> first",
    "eval.batch_size": "sentences per batch in heldout evaluation",
    "eval.unroll_steps": "time steps per batch row in heldout evaluation",
    "init_from": "start from a checkpoint, a workdir or an exported weight file",
    "init_softmax_from": "the softmax file to start from (default: the one beside init_from)",
    "export_after_training": "export the model here once training ends (relative to the workdir)",
    "example_sentences": "sentences embedded with the exported model after training",
}

# bilm-tf's script flags (bin/train_elmo.py, run_test.py, restart.py, dump_weights.py) -> elmojax's
BILM_TF_FLAGS = {"--train_prefix": "--config.data.train_prefix", "--vocab_file": "--config.data.vocab_file",
                 "--save_dir": "--workdir", "--test_prefix": "--config.data.heldout_prefix", "--outfile": "--output"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help with the description as written and each option's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def options(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings `parser` knows."""
    return {name for action in parser._actions for name in action.option_strings}


def respell(argv: Sequence[str], known: set[str], renamed: Optional[dict] = None):
    """`argv` with old spellings in the new one: --a-b as --a_b, and `renamed`'s names (--dataset:
    --input), where `known` has the new one; also the (old, new) pairs it changed."""
    out, changed = [], []
    for i, arg in enumerate(argv):
        if arg == "--":  # what follows is not an option
            out += argv[i:]
            break
        name, eq, value = arg.partition("=")
        new = (renamed or {}).get(name)
        if new not in known:
            new = None
        if new is None and name.startswith("--") and "-" in name[2:] and "--" + name[2:].replace("-", "_") in known:
            new = "--" + name[2:].replace("-", "_")
        if new is not None:
            changed.append((name, new))
            arg = new + eq + value
        out.append(arg)
    return out, list(dict.fromkeys(changed))


def note_respelled(prog: str, changed) -> None:
    """One line on stderr naming the new spelling of each old one a command line used."""
    if changed:
        said = ", ".join(f"{old} is now {new}" for old, new in changed)
        print(f"note: {prog}: {said} (old spellings still work)", file=sys.stderr)


def bilm_tf_flags(argv: Sequence[str]) -> list[str]:
    """`argv` with bilm-tf's script flags as elmojax's (--save_dir=D: --workdir=D; absl's -flag too)."""
    out, rest = [], iter(argv)
    for arg in rest:
        name, eq, value = arg.partition("=")
        new = BILM_TF_FLAGS.get("--" + name.lstrip("-")) if name.startswith("-") else None
        if new is None:
            out.append(arg)
        elif eq:
            out.append(f"{new}={value}")
        else:  # --save_dir DIR: one flag, so that an override's value is never read as a flag
            following = next(rest, None)
            out.append(new if following is None else f"{new}={following}")
    return out


def config_fields() -> list[tuple[str, object, str]]:
    """Every field of base_config: (dotted name, default, meaning)."""
    from elmojax.train.config import base_config

    def leaves(config, prefix=""):
        for key, value in config.items():
            if hasattr(value, "items"):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    found = dict(leaves(base_config()))
    order = [name for name in CONFIG_FIELDS if name in found] + sorted(set(found) - set(CONFIG_FIELDS))
    return [(name, found[name], CONFIG_FIELDS.get(name, "")) for name in order]


def usage() -> str:
    """What `elmojax --help` prints."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [FLAGS]    ({PROG} COMMAND --help: its flags and their defaults)", "",
             "ELMo in JAX: train, evaluate and export a biLM, prepare a corpus, embed text.", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    lines += ["", "Flags are spelled with underscores (--batch_size); inputs and outputs are --input and --output."]
    return "\n".join(lines)


def main_usage(command: str) -> str:
    """What `elmojax train|evaluate|export --help` prints: the flags, their defaults, the config's fields."""
    from elmojax import main as main_module  # its flags: absl's, defined as it is imported

    lines = [f"usage: {PROG} {command} [--config=FILE|NAME] [--workdir=DIR] [--config.FIELD=VALUE ...] [FLAGS]", "",
             COMMANDS[command][0].upper() + COMMANDS[command][1:] + ".", "", "flags:",
             "  --config=FILE|NAME      a config file (configs/*.py) or a bundled config's name (billion_word);",
             "                          default: the run's own config.json in --workdir, else the quickstart",
             "                          (a new run) or base_config (evaluating or exporting a weight file)"]
    for name in _MAIN_FLAGS:
        flag = main_module.flags.FLAGS[name]
        default = "" if flag.default is None else f" (default: {flag.default})"
        lines.append(f"  --{name:<21} {flag.help}{default}")
    lines += ["", "bilm-tf's flags, accepted as they are:"]
    lines += [f"  {old:<23} is {new}" for old, new in BILM_TF_FLAGS.items()]
    lines += ["", "config fields (--config.FIELD=VALUE; base_config's defaults shown, a config file sets its own):"]
    fields = config_fields()
    width = max(len(name) for name, _, _ in fields)
    lines += [f"  {name:<{width}}  {meaning} (default: {default!r})".replace("  (", " (")
              for name, default, meaning in fields]
    return "\n".join(lines)


def _error(message: str) -> int:
    print(f"error: {PROG}: {message} (see {PROG} --help)", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs `elmojax ARGV` (argv without the program's name; default: sys.argv's); its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        return _error("give a command: " + ", ".join(COMMANDS))
    command, rest = argv[0], argv[1:]
    options_only = rest[:rest.index("--")] if "--" in rest else rest
    if command in ("-h", "--help", "help"):
        print(usage())
        return 0
    if command in ("train", "evaluate", "export"):
        if "-h" in options_only or "--help" in options_only:
            print(main_usage(command))
            return 0
        if any(arg.lstrip("-").split("=")[0] == "mode" for arg in options_only if arg.startswith("-")):
            return _error(f"{command}: no --mode here, the command is the mode")
        from elmojax import main as main_module
        main_module.run([f"{PROG} {command}", f"--mode={command}", *rest])
        return 0
    if command == "prepare":
        from elmojax import prepare
        prepare.main(rest, prog=f"{PROG} prepare")
        return 0
    if command == "dump":
        from elmojax import dump
        from elmojax.process import runtime
        status = dump.main(rest, prog=f"{PROG} dump")
        if status > 128:  # stopped by a signal: at once (runtime.exit_command)
            runtime.exit_command(status)
        return status
    return _error(f"no command {command!r}; the commands: " + ", ".join(COMMANDS))


if __name__ == "__main__":
    sys.exit(main())
