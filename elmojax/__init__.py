"""elmojax: ELMo's character-based bidirectional LSTM language model in JAX/Flax."""

from elmojax.elmo import ScalarMix, weight_layers
from elmojax.embed import BidirectionalLanguageModel, dump_bilm_embeddings, dump_token_embeddings
from elmojax.runtime import setup
from elmojax.vocab import Batcher, TokenBatcher, UnicodeCharsVocabulary, Vocabulary

__version__ = "0.1.0"

__all__ = [
    "Batcher",
    "BidirectionalLanguageModel",
    "ScalarMix",
    "TokenBatcher",
    "UnicodeCharsVocabulary",
    "Vocabulary",
    "dump_bilm_embeddings",
    "dump_token_embeddings",
    "setup",
    "weight_layers",
]
