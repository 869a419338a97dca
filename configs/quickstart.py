"""Quickstart: a small character biLM trained on CPU in minutes on a bundled corpus sample.

The sample is 3,000 verses of the King James Bible (public domain; Genesis 1 to Exodus 23),
tokenized and split by `python -m elmojax.prepare`: elmojax/resources/kjv_sample/. After
training it evaluates heldout perplexity, exports the model in bilm-tf's format to
WORKDIR/export/ and embeds the example sentences with the export.
"""

import os

import elmojax
from elmojax.config import base_config

SAMPLE = os.path.join(os.path.dirname(elmojax.__file__), "resources", "kjv_sample")


def get_config():
    config = base_config()
    config.model.char_cnn.update(filters=[[1, 32], [2, 32], [3, 64], [4, 128]], embedding=dict(dim=16),
                                 n_highway=1, activation="relu", n_characters=261, max_characters_per_token=50)
    config.model.lstm.update(dim=256, projection_dim=64, n_layers=2, cell_clip=3.0, proj_clip=3.0,
                             use_skip_connections=True)
    config.train.update(batch_size=32, unroll_steps=20, n_negative_samples_batch=512, dropout=0.1,
                        all_clip_norm_val=10.0, learning_rate=0.2, n_epochs=5, log_every=50, checkpoint_every=500)
    config.data.update(train_prefix=os.path.join(SAMPLE, "train", "shard-*.txt"),
                       heldout_prefix=os.path.join(SAMPLE, "heldout", "shard-*.txt"),
                       vocab_file=os.path.join(SAMPLE, "vocab.txt"))
    config.eval.update(batch_size=32, unroll_steps=20)
    config.export_after_training = "export/elmo.hdf5"
    config.example_sentences = [
        "And God said unto Moses , I AM THAT I AM .",
        "And the LORD spake unto Moses , saying ,",
        "And the waters were dried up from off the earth .",
    ]
    return config
