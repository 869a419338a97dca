"""Dumps for whole datasets: token embeddings of a vocabulary (dump_token_embeddings), bilm-tf's
biLM layers per line (dump_bilm_embeddings), AllenNLP's `allennlp elmo` file (dump_elmo) and
sentence vectors (dump_sentence_vectors) and LM scores (dump_scores). Each file appears only
when complete. The per-line dumps (bilm, elmo) go in chunks through a work directory beside
their file (elmojax.parts): resumable, and shared among the processes of a multi-process run.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from typing import Callable, Optional

import h5py
import jax
import numpy as np

from elmojax import files, hdf5, parts, remote, runtime, scoring
from elmojax.embed import BidirectionalLanguageModel, embed_tokens
from elmojax.options import load_options
from elmojax.vocab import UnicodeCharsVocabulary, batch_char_ids

log = logging.getLogger(__name__)


class _Progress:
    """A one-line progress report on stderr for long jobs (silent for short ones)."""

    def __init__(self, total: int, what: str, enabled: bool = True, min_total: int = 1000):
        self.total, self.what = total, what
        self.enabled = enabled and total >= min_total
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 1.0 and done < self.total):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        sys.stderr.write(f"\r{self.what}: {done}/{self.total} ({100 * done / self.total:.0f}%), "
                         f"{rate:.0f}/s, {left:.0f}s left ")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def dump_token_embeddings(vocab_file: str, options_file: str, weight_file: str, outfile: str,
                          batch_size: int = 4096, progress: bool = True) -> None:
    """Writes the char CNN's embedding of every vocabulary token to outfile (dataset `embedding`).

    The file serves as embedding_weight_file of a BidirectionalLanguageModel with
    use_character_inputs=False and a TokenBatcher over the same vocab_file.
    """
    options = load_options(options_file)
    if options.char_cnn is None:
        raise ValueError(f"{options_file}: token embeddings are computed by the char CNN; options have none")
    vocab = UnicodeCharsVocabulary(vocab_file, options.char_cnn.max_characters_per_token)
    params = hdf5.load_weights(remote.local_path(weight_file), options)
    report = _Progress(vocab.size, "tokens", progress, min_total=20000)
    out = embed_tokens(params, options, vocab.word_char_ids + 1, batch_size, report.update)
    hdf5.save_token_embeddings(out, outfile)


def _read_sentences(dataset_file: str) -> list[list[str]]:
    return [line.split() for _, line in files.read_lines(dataset_file)]


def _layers_by_line(model: BidirectionalLanguageModel, sentences: list[list[str]], batch_size: int,
                    stateful: bool = False, vocab: Optional[UnicodeCharsVocabulary] = None,
                    report: Callable[[int], None] = lambda done: None):
    """(line index, biLM layers (n_layers + 1, n_tokens, 2 * projection_dim)) for every line,
    `batch_size` lines a call from zero state, similar lengths together (order does not matter
    from zero state; with `stateful`, one line a call in order); `vocab` spells its tokens;
    report(lines done) after each call."""
    width = model.options.char_cnn.max_characters_per_token
    step = 1 if stateful else batch_size
    order = list(range(len(sentences))) if stateful else sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    for start in range(0, len(order), step):
        rows = order[start : start + step]
        result = model(batch_char_ids([sentences[i] for i in rows], width, vocab))
        for k, i in enumerate(rows):
            yield i, result["lm_embeddings"][k, :, : int(result["lengths"][k])]
        report(start + len(rows))


# A dump's lines go in chunks of this many, each written once done: what a restart keeps.
CHUNK_LINES = 1000
_dumps = itertools.count()  # barrier names: every process runs the same dumps in the same order


def _dump_in_chunks(outfile: str, manifest: dict, n_lines: int, chunk_lines: int,
                    write: Callable[[h5py.File, range, Optional[str], Callable[[int], None]], None],
                    keys: Callable[[range], list[str]], finish: Optional[Callable[[h5py.File], None]] = None,
                    sequential: bool = False, progress: bool = True) -> None:
    """A dump through a work directory (elmojax.parts), resumed where a previous run of the same
    command stopped, shared among JAX's processes (chunk k is process k % n's). write(file,
    lines, previous chunk's file or None (sequential dumps only), report) fills a chunk's file;
    process 0 merges the chunks into outfile once every process is done, then finish(file)."""
    index, count = jax.process_index(), jax.process_count()
    if sequential and count > 1:
        raise ValueError(f"a stateful dump carries state from line to line in order: it runs as one process, "
                         f"not {count}")
    work = parts.Work(outfile, manifest, n_lines, chunk_lines)
    todo = work.todo(index, count)
    kept = len(work.chunks) - len(work.todo(0, 1))
    if kept and index == 0:
        log.info("%s: resuming: %d of %d chunks of %d lines done", work.directory, kept, len(work.chunks), chunk_lines)
    if count > 1:
        log.info("process %d of %d: %d of its chunks to compute, %d lines", index, count, len(todo),
                 sum(len(work.chunks[k]) for k in todo))
    report = _Progress(sum(len(work.chunks[k]) for k in todo), "sentences", progress and index == 0)
    done = 0
    for k in todo:
        lines = work.chunks[k]
        previous = work.chunk_file(k - 1) if sequential and k > 0 else None
        work.write(k, lambda f: write(f, lines, previous, lambda n: report.update(done + n)))
        done += len(lines)
    number = next(_dumps)
    runtime.barrier(f"elmojax.dumps.{number}.chunks")
    if index == 0:
        work.merge(keys, finish)
    runtime.barrier(f"elmojax.dumps.{number}.merged")


def _carry(f: h5py.File, model: BidirectionalLanguageModel) -> None:
    """A stateful model's state after a chunk, kept in the chunk's file (group `carry`)."""
    for i, leaf in enumerate(jax.tree.leaves(model.state)):
        f.create_dataset(f"carry/{i}", data=leaf)


def _carried(path: str, model: BidirectionalLanguageModel):
    with h5py.File(path, "r") as f:
        leaves = [f[f"carry/{i}"][...] for i in range(len(jax.tree.leaves(model.state)))]
    return jax.tree.unflatten(jax.tree.structure(model.state), leaves)


def _files(**paths) -> dict:
    return {name: parts.fingerprint(path) for name, path in paths.items()}


def dump_bilm_embeddings(vocab_file: str, dataset_file: str, options_file: str, weight_file: str,
                         outfile: str, batch_size: int = 64, stateful: bool = False,
                         progress: bool = True, chunk_lines: int = CHUNK_LINES) -> None:
    """Writes the biLM layers of every line of dataset_file (whitespace-tokenized) to outfile.

    One dataset per line, named str(line number) from 0, of shape (n_layers + 1, n_tokens,
    2 * projection_dim). Lines are embedded `batch_size` at a time from zero state; with
    `stateful=True` they go one at a time, each starting from the previous line's final state,
    reproducing bilm-tf.

    The lines go in chunks of `chunk_lines` through outfile + '.parts/' (elmojax.parts): a dump
    stopped at any point continues where it stopped when run again with the same files and
    settings (batch_size may change: it changes the numbers only in rounding, as any batch
    size does), and under JAX's multi-controller runtime the processes share the chunks (not
    stateful).
    """
    options = load_options(options_file)
    if options.char_cnn is None:
        raise ValueError(f"{options_file}: dump_bilm_embeddings reads characters; options have no char_cnn")
    vocab = UnicodeCharsVocabulary(vocab_file, options.char_cnn.max_characters_per_token)
    sentences = _read_sentences(dataset_file)
    model = BidirectionalLanguageModel(options_file, weight_file, max_batch_size=1 if stateful else batch_size,
                                       stateful=stateful)
    manifest = {"dump": "bilm", "stateful": stateful,
                **_files(dataset=dataset_file, vocab=vocab_file, options=options_file, weights=weight_file)}

    def write(f, lines, previous, report):
        if stateful:
            if previous is None:
                model.reset_state()
            else:
                model.state = _carried(previous, model)
        for i, layers in _layers_by_line(model, [sentences[i] for i in lines], batch_size, stateful, vocab, report):
            f.create_dataset(str(lines[i]), data=layers)
        if stateful:
            _carry(f, model)

    _dump_in_chunks(outfile, manifest, len(sentences), chunk_lines, write, lambda lines: [str(i) for i in lines],
                    sequential=stateful, progress=progress)


def _sentence_lines(input_file: str) -> list[tuple[int, str]]:
    """The (line number, text) of every line, none of them blank."""
    lines = [(number, line.strip()) for number, line in files.read_lines(input_file)]
    if not lines:
        raise ValueError(f"{input_file}: holds no sentences")
    blank = [number for number, line in lines if not line]
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (f" and {len(blank) - 10} more" if len(blank) > 10 else "")
        raise ValueError(f"{input_file}: blank line(s) {shown}; every line is a sentence, remove them")
    return lines


OUTPUT_FORMATS = ("all", "top", "average")


def dump_elmo(input_file: str, output_file: str, output_format: str, options_file: str, weight_file: str,
              batch_size: int = 64, forget_sentences: bool = False, use_sentence_keys: bool = False,
              progress: bool = True, chunk_lines: int = CHUNK_LINES) -> None:
    """AllenNLP's `allennlp elmo` command (0.9, removed in 1.0): each line of input_file, a
    whitespace-tokenized sentence, as a dataset keyed by its index from 0 (or by the sentence
    itself, use_sentence_keys): `all` (n_layers + 1, n_tokens, dim), `top` the last layer or
    `average` the layers' mean, (n_tokens, dim); and `sentence_to_index`, one JSON string
    {sentence: key} (a repeated sentence maps to its last key, as AllenNLP's), unless
    forget_sentences or use_sentence_keys.

    Unlike AllenNLP's command, whose biLM carries the LSTM state from batch to batch, every
    batch starts from zero state, so the file does not depend on batch_size or line order.
    Blank lines and an empty file are errors (AllenNLP's too), as is a repeated sentence under
    use_sentence_keys. Chunks, resuming and processes as in dump_bilm_embeddings.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    lines = _sentence_lines(input_file)
    if use_sentence_keys:
        first: dict[str, int] = {}
        for number, line in lines:
            if line in first:
                raise ValueError(f"{input_file}, line {number}: the sentence of line {first[line]} again; with "
                                 f"--use-sentence-keys every sentence is a key (leave it out to keep duplicates)")
            first[line] = number
    model = BidirectionalLanguageModel(options_file, weight_file, max_batch_size=batch_size)
    sentences = [line.split() for _, line in lines]
    manifest = {"dump": "elmo", "output_format": output_format, "forget_sentences": forget_sentences,
                "use_sentence_keys": use_sentence_keys,
                **_files(input=input_file, options=options_file, weights=weight_file)}
    key = (lambda i: lines[i][1]) if use_sentence_keys else str

    def write(f, chunk, previous, report):
        for i, layers in _layers_by_line(model, [sentences[i] for i in chunk], batch_size, report=report):
            i = chunk[i]
            output = {"all": layers, "top": layers[-1], "average": layers.mean(axis=0)}[output_format]
            try:
                f.create_dataset(key(i), data=np.asarray(output, np.float32))
            except (ValueError, KeyError) as e:
                raise ValueError(f"{input_file}, line {lines[i][0]}: cannot be an hdf5 key ({e}); leave out "
                                 f"--use-sentence-keys") from None

    def finish(f):
        if not (forget_sentences or use_sentence_keys):
            index = {line: str(i) for i, (_, line) in enumerate(lines)}
            f.create_dataset("sentence_to_index", data=[json.dumps(index)], dtype=h5py.string_dtype())

    _dump_in_chunks(output_file, manifest, len(lines), chunk_lines, write, lambda chunk: [key(i) for i in chunk],
                    finish, progress=progress)


def dump_sentence_vectors(input_file: str, output_file: str, options_file: str, weight_file: str,
                          layers="average", pooling: str = "mean", batch_size: int = 64) -> None:
    """One vector per line of input_file (BidirectionalLanguageModel.sentence_vectors) as the
    dataset `sentence_vectors` (n_lines, dim), with `layers` and `pooling` as its attributes."""
    lines = _sentence_lines(input_file)
    model = BidirectionalLanguageModel(options_file, weight_file, max_batch_size=batch_size)
    vectors = model.sentence_vectors([line.split() for _, line in lines], layers, pooling)
    with files.atomic_output(output_file) as tmp:
        with h5py.File(tmp, "w") as fout:
            fout.create_dataset("sentence_vectors", data=vectors)
            fout["sentence_vectors"].attrs.update({"layers": str(layers), "pooling": pooling})


def dump_scores(input_file: str, output_file: str, options_file: str, weight_file: str, softmax_file: str,
                batch_size: int = 64) -> None:
    """One JSON line per line of input_file: its tokens, each token's forward and backward
    log-probability, those of </S> (forward_end) and <S> (backward_end), and its perplexity
    (BidirectionalLanguageModel.sentence_log_probs, elmojax.scoring)."""
    lines = _sentence_lines(input_file)
    model = BidirectionalLanguageModel(options_file, weight_file, max_batch_size=batch_size, softmax_file=softmax_file)
    with files.atomic_output(output_file) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for start in range(0, len(lines), batch_size):
            part = [line.split() for _, line in lines[start:start + batch_size]]
            scores = model.sentence_log_probs(part)
            for k, tokens in enumerate(part):
                one = {name: scores[name][k:k + 1] for name in scores}
                record = {"line": lines[start + k][0], "tokens": tokens,
                          "forward": scores["forward"][k, :len(tokens)].tolist(),
                          "backward": scores["backward"][k, :len(tokens)].tolist(),
                          "forward_end": float(scores["forward_end"][k]),
                          "backward_end": float(scores["backward_end"][k]),
                          "perplexity": scoring.perplexity([one])}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
