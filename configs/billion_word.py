"""The reference recipe: bilm-tf's bin/train_elmo.py on the 1 Billion Word Benchmark.

char CNN (2048 filters, 2 highway layers) + 2-layer LSTM 4096/512 with skip connections,
sampled softmax with 8192 negatives, Adagrad 0.2, 10 epochs. Point the data fields at the
corpus prepared by `python -m elmojax.prepare` (see launch/README.md).
"""

from elmojax.config import base_config


def get_config():
    config = base_config()
    config.model.char_cnn.update(
        filters=[[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]],
        embedding=dict(dim=16), n_highway=2, activation="relu",
        n_characters=261, max_characters_per_token=50)
    config.model.lstm.update(dim=4096, projection_dim=512, n_layers=2, cell_clip=3.0, proj_clip=3.0,
                             use_skip_connections=True)
    config.train.update(batch_size=128, unroll_steps=20, n_negative_samples_batch=8192, dropout=0.1,
                        all_clip_norm_val=10.0, learning_rate=0.2, n_epochs=10, n_train_tokens=768648884)
    config.data.update(train_prefix="data/1b/train/*", heldout_prefix="data/1b/heldout/*",
                       vocab_file="data/1b/vocab.txt")
    return config
