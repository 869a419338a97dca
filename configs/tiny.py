"""The tiny biLM of bilm-tf's training tests, on the toy corpus in tests/fixtures/train.

`--config=configs/tiny.py` trains characters, bidirectionally; `--config=configs/tiny.py:words`
uses word inputs instead. Used by the test suite; it trains in under a minute on a CPU.
"""

import os

from elmojax.config import config_from_options_json

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "train")


def get_config(inputs: str = "chars"):
    options = {
        "n_negative_samples_batch": 16, "n_train_tokens": 134, "batch_size": 2, "unroll_steps": 10,
        "n_epochs": 50, "all_clip_norm_val": 1.0, "dropout": 0.1, "bidirectional": True,
        "lstm": {"dim": 16, "projection_dim": 8, "n_layers": 2},
    }
    if inputs == "chars":
        options["char_cnn"] = {"n_characters": 261, "max_characters_per_token": 10,
                               "filters": [[1, 8], [2, 8], [3, 16], [4, 32], [5, 64]], "activation": "tanh",
                               "embedding": {"dim": 4}, "n_highway": 1}
    elif inputs != "words":
        raise ValueError(f"configs/tiny.py: inputs must be 'chars' or 'words', got {inputs!r}")
    config = config_from_options_json(options, source="configs/tiny.py")
    config.data.update(train_prefix=os.path.join(FIXTURES, "data.txt"), heldout_prefix=os.path.join(FIXTURES, "data.txt"),
                       vocab_file=os.path.join(FIXTURES, "vocab.txt"))
    config.eval.update(batch_size=1, unroll_steps=1)  # as bilm-tf's test()
    config.train.log_every = 100
    return config
