"""elmojax: ELMo's character-based bidirectional LSTM language model in JAX/Flax.

The package is in layers; a module imports its own folder and the layers below it, never above
or beside (tests/test_layers.py checks it):

  cli.py main.py dump.py prepare.py  the command lines (`elmojax COMMAND`, `python -m ...`)
  after_training.py           what a run does at its end
  __init__.py config.py       the public API below; the config schema for config files
  allennlp.py                 AllenNLP's Elmo and batch_to_ids as AllenNLP code calls them
  train/    TrainState, the step, the trainer, the loop, evaluation, checkpoints, trained models
  infer/    BidirectionalLanguageModel, weight_layers / ScalarMix (mix), AllenNLP's Elmo, dumps
  model/    the Flax modules (char CNN, LSTM, biLM), the losses, numerics
  data/     batches with bilm-tf's semantics, and the corpus tool's library
  formats/  vocabularies and Batcher ids, options.json, hdf5 weights, TF checkpoints, downloads
  process/  process-wide settings, signals, the multi-controller runtime

Using a trained biLM: `BidirectionalLanguageModel` (or `.from_pretrained("small")`, a published
name, a weight file or its URL) on `Batcher` or `batch_char_ids` ids, mixed by `weight_layers` or
`ScalarMix`, or inside a downstream model as AllenNLP's `Elmo` (`load_elmo`). Training: `python
-m elmojax.main --config=configs/NAME.py`, which reads the config once and hands typed settings
down (train/config.py).

Importing elmojax changes no process-wide setting; entry points call `elmojax.setup()`.
"""

from elmojax.formats.remote import pretrained
from elmojax.formats.vocab import (Batcher, TokenBatcher, UnicodeCharsVocabulary, Vocabulary, batch_char_ids,
                                   batch_to_ids)
from elmojax.infer.bidirectional_lm import BidirectionalLanguageModel
from elmojax.infer.dumps import dump_bilm_embeddings, dump_token_embeddings
from elmojax.infer.elmo import Elmo, load_elmo
from elmojax.infer.mix import ScalarMix, weight_layers
from elmojax.process.runtime import setup

__version__ = "0.1.0"

__all__ = [
    "Batcher",
    "BidirectionalLanguageModel",
    "Elmo",
    "ScalarMix",
    "TokenBatcher",
    "UnicodeCharsVocabulary",
    "Vocabulary",
    "batch_char_ids",
    "batch_to_ids",
    "dump_bilm_embeddings",
    "dump_token_embeddings",
    "load_elmo",
    "pretrained",
    "setup",
    "weight_layers",
]
