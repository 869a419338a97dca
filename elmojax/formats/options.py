"""The biLM architecture as bilm-tf's options.json describes it.

`BiLMOptions` holds the architecture fields of options.json (the `char_cnn` and `lstm`
sections, plus `n_tokens_vocab` and `bidirectional` for word-input training); training
fields (batch_size, n_epochs, ...) belong to the training config. Validation errors name the
file and the field at fault.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from elmojax.formats import files

log = logging.getLogger(__name__)

# UTF-8 bytes 0-255 plus bos, eos, bow, eow and pad: the character table bilm-tf trains.
N_CHARACTERS_TRAIN = 261
# Prediction adds a zero row in front for id 0 = padding (Batcher ids are + 1).
N_CHARACTERS_PREDICT = N_CHARACTERS_TRAIN + 1


# The fields of options.json's sections that bilm-tf reads.
LSTM_FIELDS = ("dim", "projection_dim", "n_layers", "cell_clip", "proj_clip", "use_skip_connections")
CHAR_CNN_FIELDS = ("filters", "embedding", "max_characters_per_token", "activation", "n_highway", "n_characters")


@dataclasses.dataclass(frozen=True)
class CharCNNOptions:
    filters: tuple[tuple[int, int], ...]
    embedding_dim: int
    max_characters_per_token: int
    activation: str = "relu"
    n_highway: int = 0
    n_characters: int = N_CHARACTERS_PREDICT

    @property
    def n_filters(self) -> int:
        return sum(num for _, num in self.filters)

    @property
    def max_width(self) -> int:
        return max(width for width, _ in self.filters)


@dataclasses.dataclass(frozen=True)
class LSTMOptions:
    dim: int
    projection_dim: int
    n_layers: int = 1
    cell_clip: Optional[float] = None
    proj_clip: Optional[float] = None
    use_skip_connections: bool = False

    @property
    def use_projection(self) -> bool:
        # bilm-tf projects the LSTM output only when projection_dim < dim.
        return self.projection_dim < self.dim

    @property
    def output_dim(self) -> int:
        return self.projection_dim if self.use_projection else self.dim


@dataclasses.dataclass(frozen=True)
class BiLMOptions:
    lstm: LSTMOptions
    char_cnn: Optional[CharCNNOptions] = None
    n_tokens_vocab: Optional[int] = None
    bidirectional: bool = True

    @property
    def projection_dim(self) -> int:
        return self.lstm.projection_dim

    @classmethod
    def from_dict(cls, d: dict, source: str = "options") -> "BiLMOptions":
        """Reads and checks options.json's architecture: every field of its `lstm` and `char_cnn`
        sections must be one bilm-tf reads (no misspelling passes unnoticed), booleans must be
        JSON booleans; other top-level fields (training ones) are left to the caller."""
        fields = _Fields(source)
        lstm = _lstm_options(fields, fields.known(fields.need(d, "lstm", ""), LSTM_FIELDS, "lstm"))
        char_cnn = None
        if d.get("char_cnn") is not None:
            char_cnn = _char_cnn_options(fields, fields.known(d["char_cnn"], CHAR_CNN_FIELDS, "char_cnn"), lstm)
        n_tokens_vocab = d.get("n_tokens_vocab")
        if n_tokens_vocab is not None:
            n_tokens_vocab = fields.number(n_tokens_vocab, "n_tokens_vocab")
        return cls(lstm=lstm, char_cnn=char_cnn, n_tokens_vocab=n_tokens_vocab,
                   bidirectional=fields.flag(d, "bidirectional", True, "bidirectional"))

    def to_dict(self, n_characters: Optional[int] = None) -> dict:
        """The options.json form; `n_characters` overrides the stored one (262 for prediction)."""
        d: dict = {"lstm": {
            "dim": self.lstm.dim, "projection_dim": self.lstm.projection_dim, "n_layers": self.lstm.n_layers,
            "cell_clip": self.lstm.cell_clip, "proj_clip": self.lstm.proj_clip,
            "use_skip_connections": self.lstm.use_skip_connections}}
        if self.char_cnn is not None:
            c = self.char_cnn
            d["char_cnn"] = {
                "filters": [list(f) for f in c.filters], "embedding": {"dim": c.embedding_dim},
                "max_characters_per_token": c.max_characters_per_token, "activation": c.activation,
                "n_highway": c.n_highway, "n_characters": n_characters or c.n_characters}
        if self.n_tokens_vocab is not None:
            d["n_tokens_vocab"] = self.n_tokens_vocab
        d["bidirectional"] = self.bidirectional
        return d


class _Fields:
    """The checks of options.json's fields, their errors naming the file (`source`) and the field."""

    def __init__(self, source: str):
        self.source = source

    def need(self, section: dict, key: str, where: str) -> Any:
        if key not in section:
            raise ValueError(f"{self.source}: missing field '{where}{key}'")
        return section[key]

    def number(self, value: Any, where: str, kind=int, positive=True):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or kind is int and value != int(value):
            raise ValueError(f"{self.source}: field '{where}' must be {'an integer' if kind is int else 'a number'}, "
                             f"got {value!r}")
        if positive and value <= 0:
            raise ValueError(f"{self.source}: field '{where}' must be positive, got {value!r}")
        return kind(value)

    def known(self, section: Any, fields: tuple[str, ...], where: str) -> dict:
        if not isinstance(section, dict):
            raise ValueError(f"{self.source}: field '{where}' must be an object")
        unknown = sorted(set(section) - set(fields))
        if unknown:
            raise ValueError(f"{self.source}: unknown field '{where}.{unknown[0]}' (bilm-tf's are {', '.join(fields)})")
        return section

    def flag(self, section: dict, key: str, default: bool, where: str) -> bool:
        value = section.get(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"{self.source}: field '{where}' must be true or false, got {value!r}")
        return value


def _lstm_options(fields: _Fields, lstm_d: dict) -> LSTMOptions:
    """options.json's `lstm` section, checked."""
    clip = lambda k: None if lstm_d.get(k) is None else fields.number(lstm_d[k], f"lstm.{k}", float)
    lstm = LSTMOptions(
        dim=fields.number(fields.need(lstm_d, "dim", "lstm."), "lstm.dim"),
        projection_dim=fields.number(fields.need(lstm_d, "projection_dim", "lstm."), "lstm.projection_dim"),
        n_layers=fields.number(lstm_d.get("n_layers", 1), "lstm.n_layers"),
        cell_clip=clip("cell_clip"),
        proj_clip=clip("proj_clip"),
        use_skip_connections=fields.flag(lstm_d, "use_skip_connections", False, "lstm.use_skip_connections"),
    )
    if lstm.projection_dim > lstm.dim:
        raise ValueError(
            f"{fields.source}: lstm.projection_dim ({lstm.projection_dim}) is larger than lstm.dim ({lstm.dim}); "
            "the layers of lm_embeddings would not have one width")
    return lstm


def _char_cnn_options(fields: _Fields, c: dict, lstm: LSTMOptions) -> CharCNNOptions:
    """options.json's `char_cnn` section, checked (against the LSTM's projection too)."""
    source = fields.source
    filters = fields.need(c, "filters", "char_cnn.")
    try:
        filters = tuple((int(w), int(n)) for w, n in filters)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: char_cnn.filters must be a list of [width, number] pairs") from None
    activation = c.get("activation", "relu")
    if activation not in ("relu", "tanh"):
        raise ValueError(f"{source}: char_cnn.activation must be 'relu' or 'tanh', got {activation!r}")
    n_characters = fields.number(fields.need(c, "n_characters", "char_cnn."), "char_cnn.n_characters")
    if n_characters not in (N_CHARACTERS_TRAIN, N_CHARACTERS_PREDICT):
        raise ValueError(
            f"{source}: char_cnn.n_characters must be {N_CHARACTERS_TRAIN} (training) or "
            f"{N_CHARACTERS_PREDICT} (prediction), got {n_characters}")
    embedding = fields.known(fields.need(c, "embedding", "char_cnn."), ("dim",), "char_cnn.embedding")
    char_cnn = CharCNNOptions(
        filters=filters,
        embedding_dim=fields.number(fields.need(embedding, "dim", "char_cnn.embedding."), "char_cnn.embedding.dim"),
        max_characters_per_token=fields.number(fields.need(c, "max_characters_per_token", "char_cnn."),
                                               "char_cnn.max_characters_per_token"),
        activation=activation,
        n_highway=fields.number(c.get("n_highway") or 0, "char_cnn.n_highway", positive=False),
        n_characters=n_characters,
    )
    if char_cnn.max_characters_per_token < 3:
        raise ValueError(f"{source}: char_cnn.max_characters_per_token must be at least 3")
    if any(w > char_cnn.max_characters_per_token for w, _ in filters):
        raise ValueError(f"{source}: a char_cnn filter is wider than max_characters_per_token")
    if char_cnn.n_filters < lstm.projection_dim:
        raise ValueError(
            f"{source}: the char CNN has {char_cnn.n_filters} filters in all, fewer than "
            f"lstm.projection_dim ({lstm.projection_dim}); the projection only maps down")
    return char_cnn


def load_options(options_file: str, source: str = "") -> BiLMOptions:
    """Reads an options.json file (`source`: the name its errors give, e.g. the URL it was
    downloaded from; infer.bidirectional_lm.read_options takes URLs); options written for
    training (n_characters 261) work for prediction."""
    options = BiLMOptions.from_dict(files.read_json(options_file), source=source or options_file)
    if options.char_cnn is not None and options.char_cnn.n_characters == N_CHARACTERS_TRAIN:
        log.info("%s: n_characters is %d (training layout); prediction uses %d, the same table with a zero "
                 "padding row in front for Batcher's id 0", source or options_file, N_CHARACTERS_TRAIN, N_CHARACTERS_PREDICT)
    return options
