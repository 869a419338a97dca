"""Training and evaluation batches of a sharded text corpus, with bilm-tf's semantics.

A dataset is a glob pattern of shard files, one whitespace-tokenized sentence per line (UTF-8;
blank lines are skipped). Shards are taken in sorted path order for indexing, so a pattern
always means the same shard list.

Training (`test=False`) runs forever: each pass visits the shards in a fresh random order and
each shard's sentences are shuffled when it is loaded, as bilm-tf's LMDataset does. Evaluation
(`test=True`) reads each shard once, in sorted order, unshuffled; the stream then ends after the
last real token (bilm-tf drops the final partial batch; here it is padded, so every heldout
token counts exactly once).

Batches follow bilm-tf's `_get_batch`: each of the `batch_size` rows is a stream of sentences
cut into windows of `unroll_steps` tokens; a sentence cut at a window's end goes on in the same
row of the next batch, and a row whose sentence is used up takes the next sentence of the shared
stream (rows filled in order 0..batch_size-1). A sentence of n words is [<S>, w1..wn, </S>] and
gives n + 1 (input, target) pairs; the backward stream reads [</S>, wn..w1, <S>].

Ids use the prediction layout of the model inputs: `token_ids` and `char_ids` are vocabulary /
character ids + 1 with 0 = padding; `next_token_id` are plain vocabulary ids (softmax classes),
0 where padded; `weights` is 1.0 on real positions and 0.0 on padding.

`state_dict()` / `load_state_dict()` resume a stream exactly: the batches after a restore equal
those that would have followed. The state holds positions and the random generator's state,
never the sentences, which are read again from the shards.

The parts, each where its part of bilm-tf's semantics is implemented:

  shards.py    the shard files, each encoded once into arrays of vocabulary ids (and a cache)
  order.py     shard and sentence order, with the random generator's state for a restore
  pairs.py     one direction's (input, target) pairs of the loaded sentences, in stream order
  windows.py   LMDataset: one direction's rows of sentences cut into unroll_steps windows
  datasets.py  BidirectionalLMDataset (both directions) and make_dataset (for a run's Streams)
  prefetch.py  BatchPrefetcher: batches read ahead in a thread, each with its data position
  corpus.py    the corpus tool's library: text in, shards and a vocabulary out (python -m elmojax.prepare)
"""

from elmojax.data.datasets import BidirectionalLMDataset, Streams, make_dataset
from elmojax.data.prefetch import BatchPrefetcher
from elmojax.data.shards import count_order_warning, count_tokens, list_shards
from elmojax.data.windows import HostBatch, LMDataset, STATE_VERSION

__all__ = ["STATE_VERSION", "HostBatch", "BatchPrefetcher", "BidirectionalLMDataset", "LMDataset", "count_order_warning",
           "count_tokens", "list_shards", "make_dataset", "Streams"]
