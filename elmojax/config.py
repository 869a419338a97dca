"""Where config files import the training config's schema from (configs/*.py:
`from elmojax.config import base_config`); it lives in elmojax/train/config.py, with the typed
settings the config turns into."""

from elmojax.train.config import base_config, config_from_options_json

__all__ = ["base_config", "config_from_options_json"]
