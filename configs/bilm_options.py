"""A config from a bilm-tf training options.json: --config=configs/bilm_options.py:/path/options.json

Every field of the file is honoured (n_epochs, n_train_tokens, batch_size, unroll_steps,
n_negative_samples_batch, dropout, all_clip_norm_val, learning_rate, bidirectional,
share_embedding_softmax, char_cnn, lstm); give the data with --config.data.* flags.
"""

from elmojax.config import config_from_options_json
from elmojax.formats import files


def get_config(options_file: str = ""):
    if not options_file:
        raise ValueError("name the options.json after a colon: --config=configs/bilm_options.py:/path/options.json")
    return config_from_options_json(files.read_json(options_file), source=options_file)
