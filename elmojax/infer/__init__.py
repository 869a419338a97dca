"""Inference, above model/: the biLM on `Batcher` ids (bidirectional_lm), the scalar mix
(mix: bilm-tf's weight_layers, ScalarMix), AllenNLP's `Elmo` (elmo), whole-dataset dumps
(dumps, through dump_parts' resumable chunks) and LM scores (scoring). Nothing here imports
train/."""
