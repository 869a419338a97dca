"""Dumps for whole datasets: token embeddings of a vocabulary (dump_token_embeddings), bilm-tf's
biLM layers per line (dump_bilm_embeddings), AllenNLP's `allennlp elmo` file (dump_elmo) and
sentence vectors (dump_sentence_vectors) and LM scores (dump_scores). Each file appears only
when complete. The per-line dumps (bilm, elmo) go in chunks through a work directory beside
their file (elmojax.infer.dump_parts): resumable, and shared among the processes of a multi-process run.

Inputs are checked before any work (a missing or wrong file, an output that cannot be written,
a batch size that is not a positive integer): a ValueError naming the file or argument. HDF5
files are written through plain file I/O (elmojax.infer.dump_parts.hdf5_output), so that a full disk is an
OSError naming the file the user asked for, never a crash inside HDF5; under
runtime.stop_on_signals, SIGINT and SIGTERM wait while HDF5 writes.

Each dump's model is (options_file, weight_file) as bilm-tf's functions take them; weight_file
may also be a published name ("small") or an http(s) URL, and options_file None: the
options.json beside the weights (elmojax.formats.remote.model_paths); dump_scores' softmax_file
None: the softmax beside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
from typing import Callable, Optional

import h5py
import jax
import numpy as np

from elmojax.formats import files, hdf5, remote, tf_checkpoint
from elmojax.formats.checks import check_int
from elmojax.formats.directions import DIRECTIONS
from elmojax.formats.progress import Progress
from elmojax.formats.vocab import UnicodeCharsVocabulary, batch_char_ids
from elmojax.infer import dump_parts, scoring
from elmojax.infer.bidirectional_lm import BidirectionalLanguageModel, embed_tokens, read_options
from elmojax.process import runtime

log = logging.getLogger(__name__)


def _check_output(path: str) -> None:
    """Refuses, before any work, an output the dump cannot write."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: a directory; give a file name to write")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{parent}: not a directory, so {path} cannot be written")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{parent}: not writable (read-only, or no permission), so {path} cannot be written")


def _check_input(path: str, what: str) -> None:
    """Refuses, before any work, a missing input file (a URL is fetched later)."""
    if remote.is_url(path):
        return
    if os.path.isdir(path):
        raise ValueError(f"{path}: a directory, not a {what}")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such {what}")


def _check_weights(path: str, what: str = "weight file", checkpoint: bool = True) -> None:
    """Refuses, before any work, weights that are neither an hdf5 file nor (`checkpoint`) a
    bilm-tf checkpoint: a prefix, one of its files or its directory."""
    if remote.is_url(path) or (os.path.isfile(path) and h5py.is_hdf5(path)):
        return
    if checkpoint:
        if tf_checkpoint.is_checkpoint(path):
            return
        if os.path.isdir(path):
            tf_checkpoint.resolve_prefix(path)  # a ValueError saying what the directory lacks
    if os.path.isfile(path):
        raise ValueError(f"{path}: not an hdf5 file{' (nor a bilm-tf checkpoint)' if checkpoint else ''}; "
                         f"not a {what}")
    if os.path.isdir(path):
        raise ValueError(f"{path}: a directory, not a {what}")
    raise ValueError(f"{path}: no such {what}")


def _check_model(options_file: Optional[str], weight_file: str, softmax_file: Optional[str] = None) -> None:
    """Refuses, before any work, a model's missing files given by path (a published name is
    looked up, and options.json beside the weights found, by remote.model_paths later)."""
    if options_file is not None:
        _check_input(options_file, "options file")
    if not remote.is_published(weight_file):
        _check_weights(weight_file)
    if softmax_file is not None:
        _check_weights(softmax_file, "softmax file")


@contextlib.contextmanager
def _text_output(path: str):
    """A text file written at `path` atomically; a failing write is an OSError naming `path`."""
    try:
        with files.atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
            yield out
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


def dump_token_embeddings(vocab_file: str, options_file: str, weight_file: str, outfile: str,
                          batch_size: int = 4096, progress: bool = True) -> None:
    """Writes the char CNN's embedding of every vocabulary token to outfile (dataset `embedding`).

    The file serves as embedding_weight_file of a BidirectionalLanguageModel with
    use_character_inputs=False and a TokenBatcher over the same vocab_file.
    """
    _check_input(vocab_file, "vocabulary file")
    if options_file is not None:
        _check_input(options_file, "options file")
    if not remote.is_published(weight_file):
        _check_weights(weight_file, checkpoint=False)
    _check_output(outfile)
    batch_size = check_int("batch_size", batch_size, 1, wrong_type=ValueError)
    options_file, weight_file, _ = remote.model_paths(options_file, weight_file)
    options = read_options(options_file)
    if options.char_cnn is None:
        raise ValueError(f"{options_file}: token embeddings are computed by the char CNN; options have none")
    vocab = UnicodeCharsVocabulary(vocab_file, options.char_cnn.max_characters_per_token)
    params = hdf5.load_weights(remote.local_path(weight_file), options)
    report = Progress("tokens", vocab.size, progress and vocab.size >= 20000)
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


@dataclasses.dataclass(frozen=True)
class _ChunkedDump:
    """A per-line dump that _dump_in_chunks does: `n_lines` lines into `outfile`, its work
    directory recognized by `manifest` (the dump's settings and input files). write(writer,
    lines, previous, report) fills a chunk's file, `previous` reading the previous chunk's
    datasets by name (sequential dumps only; None for chunk 0), report(lines done) as it goes;
    keys(lines): the datasets' names of those lines; finish(writer), if any, adds to outfile
    after the merge. `sequential`: each chunk goes on from the state of the one before."""
    outfile: str
    manifest: dict
    n_lines: int
    write: Callable[[dump_parts.Hdf5Writer, range, Optional[Callable], Callable[[int], None]], None]
    keys: Callable[[range], list[str]]
    finish: Optional[Callable[[dump_parts.Hdf5Writer], None]] = None
    sequential: bool = False


def _dump_in_chunks(dump: _ChunkedDump, chunk_lines: int, progress: bool = True) -> None:
    """A dump through a work directory (elmojax.infer.dump_parts), resumed where a previous run of the same
    command stopped, shared among JAX's processes (chunk k is process k % n's); process 0 merges
    the chunks into the output once every process is done, then finishes it.

    Process 0 holds the work directory's lock throughout; the others start after a barrier it
    passes once it holds it. SIGINT or SIGTERM (runtime.stop_on_signals) ends it with a
    runtime.Stopped saying how many chunks are done; a failing disk with an OSError naming the
    chunk or the output (elmojax.infer.dump_parts)."""
    index, count = jax.process_index(), jax.process_count()
    if dump.sequential and count > 1:
        raise ValueError(f"a stateful dump carries state from line to line in order: it runs as one process, "
                         f"not {count}")
    work = dump_parts.Work(dump.outfile, dump.manifest, dump.n_lines, chunk_lines)
    number = next(_dumps)
    try:
        with work.locked() if index == 0 else contextlib.nullcontext():
            if index == 0:
                work.start(owner=True)
            runtime.barrier(f"elmojax.infer.dumps.{number}.started")
            if index != 0:
                work.start(owner=False)
            if dump.sequential:
                _check_carried_chunks(work)
            todo = work.todo(index, count)
            kept = len(work.chunks) - len(work.todo(0, 1))
            if kept and index == 0:
                log.info("%s: resuming: %d of %d chunks of %d lines done", work.directory, kept, len(work.chunks),
                         chunk_lines)
            lines = sum(len(work.chunks[k]) for k in todo)
            if count > 1:
                log.info("process %d of %d: %d of its chunks to compute, %d lines", index, count, len(todo), lines)
            report = Progress("sentences", lines, progress and index == 0 and lines >= 1000)
            done = 0

            def compute(k: int, report: Callable[[int], None] = lambda n: None) -> None:
                previous = None
                if dump.sequential and k > 0:
                    previous = functools.partial(_read_previous, work, k - 1)
                work.write(k, lambda f: dump.write(f, work.chunks[k], previous, report))

            for k in todo:
                compute(k, lambda n: report.update(done + n))
                done += len(work.chunks[k])
            runtime.barrier(f"elmojax.infer.dumps.{number}.chunks")
            if index == 0:
                work.merge(dump.keys, dump.finish, recompute=compute)
        if index == 0:
            work.remove_directory()
        runtime.barrier(f"elmojax.infer.dumps.{number}.merged")
    except runtime.Stopped as e:
        raise _stopped(e, work, dump.outfile) from None


def _stopped(e: runtime.Stopped, work: dump_parts.Work, outfile: str) -> runtime.Stopped:
    """The Stopped that says how far a chunked dump got and what running it again does."""
    if work.merged:  # stopped in the last moments: the chunks are no longer needed
        with contextlib.suppress(OSError):
            work.remove()
            work.remove_directory()
        return runtime.Stopped(f"{e} after {outfile} was written (complete)")
    try:
        n = len(work.done())
    except OSError:
        return runtime.Stopped(f"{e}; {outfile} was not written")
    total = len(work.chunks)
    return runtime.Stopped(f"{e}: {n} of {total} chunks are done in {work.directory}; run the same command "
                           f"again to {'merge them' if n == total else 'resume'}")


def _read_previous(work: dump_parts.Work, k: int, names: list[str]) -> list[np.ndarray]:
    """Chunk k's datasets `names`, its file checked first (a stateful dump's carried state)."""
    try:
        with work.reading(k) as read:
            return [read(name) for name in names]
    except dump_parts.Damaged as e:
        work.discard(e.k, e.reason)
        raise ValueError(f"{work.chunk_file(e.k)}: damaged ({e.reason}); removed: run the same command again to "
                         f"compute its lines again") from None


def _check_carried_chunks(work: dump_parts.Work) -> None:
    """A stateful dump carries on from the state of the chunk before each one it computes:
    those chunks are checked in full first, a damaged one removed (computed again)."""
    checked: set[int] = set()
    while True:
        todo = set(work.todo())
        before = sorted(k - 1 for k in todo if k > 0 and k - 1 not in todo and k - 1 not in checked)
        if not before:
            return
        for k in before:
            try:
                work.verify(k)
                checked.add(k)
            except dump_parts.Damaged as e:
                work.discard(k, e.reason)


def _carry(f: dump_parts.Hdf5Writer, model: BidirectionalLanguageModel) -> None:
    """A stateful model's state after a chunk, kept in the chunk's file (group `carry`)."""
    for i, leaf in enumerate(jax.tree.leaves(model.state)):
        f.put(f"carry/{i}", np.asarray(leaf), counted=False)


def _carried(previous: Callable[[list[str]], list[np.ndarray]], model: BidirectionalLanguageModel):
    leaves = previous([f"carry/{i}" for i in range(len(jax.tree.leaves(model.state)))])
    return jax.tree.unflatten(jax.tree.structure(model.state), leaves)


def _files(**paths) -> dict:
    return {name: dump_parts.fingerprint(path) for name, path in paths.items()}


def dump_bilm_embeddings(vocab_file: str, dataset_file: str, options_file: str, weight_file: str,
                         outfile: str, batch_size: int = 64, stateful: bool = False,
                         progress: bool = True, chunk_lines: int = CHUNK_LINES) -> None:
    """Writes the biLM layers of every line of dataset_file (whitespace-tokenized) to outfile.

    One dataset per line, named str(line number) from 0, of shape (n_layers + 1, n_tokens,
    2 * projection_dim). Lines are embedded `batch_size` at a time from zero state; with
    `stateful=True` they go one at a time, each starting from the previous line's final state,
    reproducing bilm-tf.

    The lines go in chunks of `chunk_lines` through outfile + '.parts/' (elmojax.infer.dump_parts): a dump
    stopped at any point continues where it stopped when run again with the same files and
    settings (batch_size may change: it changes the numbers only in rounding, as any batch
    size does), and under JAX's multi-controller runtime the processes share the chunks (not
    stateful).
    """
    for path, what in ((vocab_file, "vocabulary file"), (dataset_file, "dataset file")):
        _check_input(path, what)
    _check_model(options_file, weight_file)
    _check_output(outfile)
    batch_size = check_int("batch_size", batch_size, 1, wrong_type=ValueError)
    dump_parts.chunk_lines_of(0, chunk_lines)
    options_file, weight_file, _ = remote.model_paths(options_file, weight_file)
    options = read_options(options_file)
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
            f.put(str(lines[i]), layers)
        if stateful:
            _carry(f, model)

    dump = _ChunkedDump(outfile, manifest, len(sentences), write, lambda lines: [str(i) for i in lines],
                        sequential=stateful)
    _dump_in_chunks(dump, chunk_lines, progress)


def _check_model_and_io(input_file: str, output_file: str, options_file: Optional[str], weight_file: str, batch_size,
                        softmax_file: Optional[str] = None) -> None:
    _check_input(input_file, "input file")
    _check_model(options_file, weight_file, softmax_file)
    _check_output(output_file)
    batch_size = check_int("batch_size", batch_size, 1, wrong_type=ValueError)


def _check_sentence_keys(input_file: str, lines: list[tuple[int, str]]) -> None:
    """With use_sentence_keys each sentence is a dataset's name: none may repeat, and each must
    be one plain hdf5 name, which keys() lists (hdf5 reads '/' as a group separator, so 'a/b'
    would be dataset 'b' in group 'a'; it ends a name at a NUL character; '.' is the group)."""
    first: dict[str, int] = {}
    for number, line in lines:
        if line in first:
            raise ValueError(f"{input_file}, line {number}: the sentence of line {first[line]} again; with "
                             f"--use_sentence_keys every sentence is a key (leave it out to keep duplicates)")
        first[line] = number
        bad = "'/'" if "/" in line else "a NUL character" if "\0" in line else "'.' alone" if line == "." else None
        if bad:
            raise ValueError(f"{input_file}, line {number}: the sentence holds {bad}, which cannot be in an hdf5 key "
                             f"(hdf5 would nest it in groups); with --use_sentence_keys every sentence is a key "
                             f"(leave it out to key datasets by line index)")


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
    Blank lines and an empty file are errors (AllenNLP's too), as is, under use_sentence_keys, a
    repeated sentence or one hdf5 cannot keep as one key, listed by keys(): one holding '/' (a
    group separator to hdf5) or a NUL character (where hdf5 ends the name), or '.' alone (the
    group itself); every other sentence is its own key, unescaped. These are found before any
    work. Chunks, resuming and processes as in dump_bilm_embeddings.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    _check_model_and_io(input_file, output_file, options_file, weight_file, batch_size)
    dump_parts.chunk_lines_of(0, chunk_lines)
    options_file, weight_file, _ = remote.model_paths(options_file, weight_file)
    lines = _sentence_lines(input_file)
    if use_sentence_keys:
        _check_sentence_keys(input_file, lines)
    model = BidirectionalLanguageModel(options_file, weight_file, max_batch_size=batch_size)
    sentences = [line.split() for _, line in lines]
    manifest = {"dump": "elmo", "output_format": output_format, "forget_sentences": forget_sentences,
                "use_sentence_keys": use_sentence_keys,
                **_files(input=input_file, options=options_file, weights=weight_file)}
    key = (lambda i: lines[i][1]) if use_sentence_keys else str

    def write(f, chunk, previous, report):
        for i, layers in _layers_by_line(model, [sentences[i] for i in chunk], batch_size, report=report):
            output = {"all": layers, "top": layers[-1], "average": layers.mean(axis=0)}[output_format]
            f.put(key(chunk[i]), np.asarray(output, np.float32))

    def finish(f):
        if not (forget_sentences or use_sentence_keys):
            index = {line: str(i) for i, (_, line) in enumerate(lines)}
            f.put("sentence_to_index", [json.dumps(index)], dtype=h5py.string_dtype())

    _dump_in_chunks(_ChunkedDump(output_file, manifest, len(lines), write, lambda chunk: [key(i) for i in chunk],
                                 finish), chunk_lines, progress)


def dump_sentence_vectors(input_file: str, output_file: str, options_file: str, weight_file: str,
                          layers="average", pooling: str = "mean", batch_size: int = 64) -> None:
    """One vector per line of input_file (BidirectionalLanguageModel.sentence_vectors) as the
    dataset `sentence_vectors` (n_lines, dim), with `layers` and `pooling` as its attributes."""
    _check_model_and_io(input_file, output_file, options_file, weight_file, batch_size)
    lines = _sentence_lines(input_file)
    options_file, weight_file, _ = remote.model_paths(options_file, weight_file)
    model = BidirectionalLanguageModel(options_file, weight_file, max_batch_size=batch_size)
    vectors = model.sentence_vectors([line.split() for _, line in lines], layers, pooling)
    with dump_parts.hdf5_output(output_file) as out:
        out.put("sentence_vectors", vectors, attrs={"layers": str(layers), "pooling": pooling})


def dump_scores(input_file: str, output_file: str, options_file: Optional[str], weight_file: str,
                softmax_file: Optional[str] = None, batch_size: int = 64) -> None:
    """One JSON line per line of input_file: its tokens, each token's forward and backward
    log-probability, those of </S> (forward_end) and <S> (backward_end), and its perplexity
    (BidirectionalLanguageModel.sentence_log_probs, elmojax.infer.scoring)."""
    _check_model_and_io(input_file, output_file, options_file, weight_file, batch_size, softmax_file)
    lines = _sentence_lines(input_file)
    options_file, weight_file, softmax_file = remote.model_paths(options_file, weight_file, softmax_file, True)
    model = BidirectionalLanguageModel(options_file, weight_file, max_batch_size=batch_size, softmax_file=softmax_file)
    with _text_output(output_file) as out:
        for start in range(0, len(lines), batch_size):
            part = [line.split() for _, line in lines[start:start + batch_size]]
            scores = model.sentence_log_probs(part)
            for k, tokens in enumerate(part):
                one = {name: scores[name][k:k + 1] for name in scores}
                record = {"line": lines[start + k][0], "tokens": tokens,
                          **{d: scores[d][k, :len(tokens)].tolist() for d in DIRECTIONS},
                          "forward_end": float(scores["forward_end"][k]),
                          "backward_end": float(scores["backward_end"][k]),
                          "perplexity": scoring.perplexity([one])}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
