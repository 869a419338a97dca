"""What a run does once training ends, as its config asks: the heldout evaluation, the export,
and the example sentences embedded with the exported model.

`python -m elmojax.main` calls `after_training` with the Run that elmojax.train.loop returns: the
final state, the vocabulary read at the run's start and the trainer and Evaluator it built, so
that nothing is read, built or compiled again (the evaluation is the run's own, on its config).
The final evaluation joins the run's metrics (metrics.jsonl and TensorBoard) at its last step.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from elmojax.formats.vocab import batch_char_ids
from elmojax.infer.bidirectional_lm import BidirectionalLanguageModel
from elmojax.train import config as config_lib
from elmojax.train import evaluation
from elmojax.train.loop import Run, local_params
from elmojax.train.metrics import MetricsWriter, heldout_scalars
from elmojax.train.trained_models import VOCAB_FILE, ExportedFiles, Trained, export, vocab_tokens


def after_training(run: Run) -> list[str]:
    """Heldout evaluation, export and the example sentences' embedding of the run's final
    state, where its config asks for them. Returns lines to print."""
    config, workdir, state = run.config, run.workdir, run.state
    lines: list[str] = []
    if jax.process_index() != 0:  # process 0 evaluates and exports on its own devices
        return lines
    # (with several processes, the carry's rows are spread over them: no carry to check against)
    carry = jax.device_get(state.lstm_state) if jax.process_count() == 1 else None
    tokens = vocab_tokens(run.vocab)
    trained = Trained(local_params(state), config_lib.options_json(config, len(tokens)), tokens,
                      os.path.join(workdir, VOCAB_FILE), workdir, int(state.step), carry)
    if config.data.heldout_prefix:
        lines.extend(final_evaluation(run, trained))
    if config.export_after_training:
        exported = export(workdir, os.path.join(workdir, config.export_after_training), trained)
        lines.append(f"exported {exported.weights} with {exported.options} and {exported.softmax}")
        if config.example_sentences and config.model.bidirectional and config_lib.use_character_inputs(config):
            lines.extend(embed_examples(exported, list(config.example_sentences)))
    return lines


def final_evaluation(run: Run, trained: Trained) -> list[str]:
    """The heldout evaluation of the final state, in metrics.jsonl and TensorBoard at the final
    step (where the loop evaluated that step itself, its evaluation, already there); lines to print."""
    step = int(run.state.step)
    if run.evaluated is not None and run.evaluated.step == step:
        heldout, health = run.evaluated.result, run.evaluated.health
    else:
        evaluator = run.evaluator or evaluation.heldout_evaluator(run.config, run.vocab, run.trainer)
        result = evaluation.evaluate_trained(evaluator, trained, run.workdir,
                                             state_resets=float(run.config.train.state_reset_probability))
        heldout, health = result.heldout, result.health
        writer = MetricsWriter(run.workdir)
        try:
            writer.scalars(step, heldout_scalars(heldout, health))
        finally:
            writer.close()
    return [evaluation.summary(heldout)] + ([health.line] if health is not None and health.line else [])


def embed_examples(exported: ExportedFiles, sentences: list[str]) -> list[str]:
    """The sentences (whitespace-tokenized) embedded with an exported model, as a user would
    load it: their embeddings' shape, and how alike each pair looks to the model (the cosine of
    their mean-pooled top layers)."""
    bilm = BidirectionalLanguageModel(exported.options, exported.weights)
    tokens = [s.split() for s in sentences]
    out = bilm(batch_char_ids(tokens, bilm.options.char_cnn.max_characters_per_token))
    lines = [f"embedded {len(tokens)} example sentences: lm_embeddings {out['lm_embeddings'].shape}"]
    pooled = [out["lm_embeddings"][i, -1, : len(t)].mean(axis=0) for i, t in enumerate(tokens)]
    unit = [p / np.linalg.norm(p) for p in pooled]
    for i in range(len(unit)):
        for j in range(i + 1, len(unit)):
            lines.append(f"  cosine(sentence {i}, sentence {j}) = {float(unit[i] @ unit[j]):.3f}")
    return lines
