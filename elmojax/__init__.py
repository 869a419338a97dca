"""elmojax: ELMo's character-based bidirectional LSTM language model in JAX/Flax.

Using a trained biLM: `BidirectionalLanguageModel` (embed.py) on `Batcher` ids (vocab.py),
mixed by `weight_layers` or `ScalarMix` (elmo.py), or inside a downstream model as AllenNLP's
`Elmo` (downstream.py: `load_elmo`); the modules are model.py's and lstm.py's,
the weights bilm-tf's hdf5 files (hdf5.py) or its TensorFlow training checkpoints
(tf_checkpoint.py, tf_variables.py).

Training, from the command line down:

  main.py         python -m elmojax.main: train, evaluate or export, with one-line errors
  loop.py         train(): resume or start, then the step between periodic actions (log,
                  heldout evaluation, checkpoint), stopping on divergence or a signal
    data/         host batches with bilm-tf's semantics, read ahead (data.BatchPrefetcher)
    batch.py      to_device(): a host batch as the typed Batch the step takes
    trainer.py    the mesh, shardings and jitted steps
    step.py       the pure math: TrainState, losses, train_step, eval_step
    evaluation.py heldout perplexity and the model's health (the blow-up check)
    checkpoint.py orbax checkpoints (state, metadata, each process's data position)
    runconfig.py  the run's config stored in its workdir, and what a resumed run may change
    workdir.py    the workdir's lock; metrics.py: TensorBoard and metrics.jsonl
  model_files.py  trained models in and out: load_trained, init_from, export (workdirs,
                  exports, bilm-tf checkpoints through tf_variables.py)

Importing elmojax changes no process-wide setting; entry points call `elmojax.setup()`.
"""

from elmojax.formats.remote import pretrained
from elmojax.formats.vocab import Batcher, TokenBatcher, UnicodeCharsVocabulary, Vocabulary
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
    "dump_bilm_embeddings",
    "dump_token_embeddings",
    "load_elmo",
    "pretrained",
    "setup",
    "weight_layers",
]
