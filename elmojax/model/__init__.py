"""The model: pure-functional Flax modules and the math on their outputs, above formats/.
The char CNN and the biLM (bilm), the LSTM and its `lax.scan` recurrence (lstm), dropout
(dropout), softmax losses (softmax), the numerics settings every product takes (numerics) and
the char id arrays cut to what the CNN needs (char_ids)."""
