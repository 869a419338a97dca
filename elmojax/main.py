"""Train, evaluate and export a biLM.

  python -m elmojax.main --config=configs/quickstart.py --workdir=DIR               train (resumes)
  python -m elmojax.main --mode=evaluate --workdir=DIR --config.data.heldout_prefix=GLOB
  python -m elmojax.main --mode=evaluate --model=FILE.hdf5 --config.data.heldout_prefix=GLOB
  python -m elmojax.main --mode=export --workdir=DIR --output=FILE.hdf5

Any config field can be overridden: --config.train.batch_size=64. Without --config the bundled
quickstart config is used.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from elmojax import train

_QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py")

_CONFIG = config_flags.DEFINE_config_file("config", _QUICKSTART, "a config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "where checkpoints, logs and the vocabulary go")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "export"], "what to do")
_MODEL = flags.DEFINE_string("model", None, "evaluate/export: a workdir or an exported weight file "
                                            "(default: --workdir)")
_OUTPUT = flags.DEFINE_string("output", None, "export: the weight file to write (FILE.hdf5)")


def main(argv) -> None:
    del argv
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    config = _CONFIG.value
    model = _MODEL.value or _WORKDIR.value
    try:
        if _MODE.value == "train":
            train.train(config, _WORKDIR.value)
            for line in train.after_training(config, _WORKDIR.value):
                print(line)
        elif _MODE.value == "evaluate":
            print(json.dumps(train.evaluate(config, model)))
        else:
            if not _OUTPUT.value:
                raise ValueError("--mode=export needs --output=FILE.hdf5")
            written = train.export(model, _OUTPUT.value)
            print(json.dumps(written))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
