"""The order of a dataset's sentences: shards in a random order each pass, each shard's sentences
shuffled when it is loaded (bilm-tf's LMDataset), or both in file order for evaluation; and the
random generator's state that lets a restore draw the same order again.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from elmojax.data.shards import Shard, read_sentences

class SentenceSource:
    """The shared sentence stream of one dataset: shards in pass order, sentences in shard order.

    `advance()` loads shards until the loaded one has a sentence not yet drawn (False once an
    evaluation stream is used up); the caller draws sentences by moving `sentence_position`
    (the sentence drawn k-th from the loaded shard is `order_of_loaded()[k]`). The random
    generator is used, in this order, for each pass's shard order and for each shard's sentence
    order when it is loaded; saving its state from just before the current shard was loaded lets
    a restore rebuild that shard's order by drawing it again.
    """

    def __init__(self, shards: list[str], test: bool, rng: np.random.Generator, read):
        self.shards = shards
        self.test = test
        self.rng = rng
        self.read = read  # shard index -> Shard
        self.passes = 0  # passes started
        self.order: Optional[list[int]] = None  # shard indices of the current pass
        self.position = -1  # index in `order` of the loaded shard
        self.sentence_position = 0  # next entry of the loaded shard's sentence order
        self.sentences_in_pass = 0
        self.exhausted = False
        self.load_rng_state: Optional[dict] = None
        self.encoded: Optional[Shard] = None
        self.n_sentences = 0
        self.permutation: Optional[np.ndarray] = None

    @property
    def shard(self) -> Optional[int]:
        return None if self.position < 0 else self.order[self.position]

    def order_of_loaded(self) -> np.ndarray:
        return np.arange(self.n_sentences) if self.permutation is None else self.permutation

    def _start_pass(self) -> None:
        n = len(self.shards)
        self.order = list(range(n)) if self.test else self.rng.permutation(n).tolist()
        self.passes += 1
        self.position = -1
        self.sentences_in_pass = 0

    def _load(self, position: int) -> None:
        self.position = position
        self.load_rng_state = self.rng.bit_generator.state
        self.encoded = self.read(self.order[position])
        self.n_sentences = self.encoded.n
        self.permutation = None if self.test else self.rng.permutation(self.n_sentences)
        self.sentence_position = 0

    def advance(self) -> bool:
        if self.exhausted:
            return False
        while self.order is None or self.sentence_position >= self.n_sentences:
            if self.order is None or self.position + 1 >= len(self.order):
                if self.order is not None:
                    if self.test:
                        self.exhausted = True
                        return False
                    if self.sentences_in_pass == 0:
                        raise ValueError(f"the shards {self.shards} hold no sentences (all lines are blank)")
                self._start_pass()
            self._load(self.position + 1)
        return True

    def text(self, shard: int, index: int) -> tuple[str, str, int]:
        """(sentence, shard path, line number) of a sentence, read again from its shard."""
        sentences, line_numbers = read_sentences(self.shards[shard])
        return sentences[index], self.shards[shard], line_numbers[index]

    def state_dict(self) -> dict:
        return {
            "passes": self.passes,
            "shard_order": None if self.order is None else list(self.order),
            "shard_position": self.position,
            "sentence_position": self.sentence_position,
            "sentences_in_pass": self.sentences_in_pass,
            "shard_sentences": self.n_sentences if self.position >= 0 else None,
            "exhausted": self.exhausted,
            "shard_rng_state": self.load_rng_state,
            "rng_state": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        order = state["shard_order"]
        if order is not None and sorted(order) != list(range(len(self.shards))):
            raise ValueError(f"saved shard order {order} does not fit the {len(self.shards)} shards found")
        self.passes = int(state["passes"])
        self.order = None if order is None else [int(i) for i in order]
        self.sentences_in_pass = int(state["sentences_in_pass"])
        self.exhausted = bool(state["exhausted"])
        self.encoded, self.n_sentences, self.permutation = None, 0, None
        self.load_rng_state = None
        self.position = -1
        self.sentence_position = 0
        if int(state["shard_position"]) >= 0:
            # Draw the loaded shard's sentence order again from the generator state it came from.
            self.rng.bit_generator.state = state["shard_rng_state"]
            self._load(int(state["shard_position"]))
            if self.n_sentences != state["shard_sentences"]:
                raise ValueError(f"{self.shards[self.shard]} has {self.n_sentences} sentences, the saved state "
                                 f"{state['shard_sentences']}; the dataset changed since the state was saved")
            self.sentence_position = int(state["sentence_position"])
        self.rng.bit_generator.state = state["rng_state"]
