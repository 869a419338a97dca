"""A small character biLM (ELMo "small" sizes: LSTM 1024/128, 2048 filters, 1 highway layer)
for a modest corpus on one GPU. Set the data with --config.data.* flags."""

from elmojax.config import base_config


def get_config():
    config = base_config()
    config.model.char_cnn.update(n_highway=1)
    config.model.lstm.update(dim=1024, projection_dim=128, n_layers=2, cell_clip=3.0, proj_clip=3.0,
                             use_skip_connections=True)
    config.train.update(batch_size=128, unroll_steps=20, n_negative_samples_batch=4096, n_epochs=10)
    return config
