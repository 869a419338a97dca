"""The biLM's two directions, named once: the forward LM's and the backward LM's, in the order
of every direction axis (stacked params and LSTM state, bilm-tf's RNN_0 and RNN_1), and the
suffix that marks the backward stream's arrays in a host batch (`char_ids_reverse`, ...)."""

FORWARD = "forward"
BACKWARD = "backward"
DIRECTIONS = (FORWARD, BACKWARD)
REVERSE_SUFFIX = "_reverse"


def directions(bidirectional: bool) -> tuple[str, ...]:
    """The directions of an LM: both, or the forward one alone."""
    return DIRECTIONS if bidirectional else DIRECTIONS[:1]


def host_suffix(direction: str) -> str:
    """The suffix of a direction's arrays in a host batch ('' for the forward stream)."""
    return REVERSE_SUFFIX if direction == BACKWARD else ""
