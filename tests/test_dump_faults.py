"""What a dump meets, tried as a user would: a full disk while it writes a chunk or merges them,
SIGTERM and SIGINT, a second dump into the same output, damaged chunks, a work directory of
the previous version, sentences hdf5 cannot key, and bad command lines."""

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import OPTIONS_FILE, ROOT, VOCAB_FILE, WEIGHT_FILE, dead_pid, short_lines
from test_dump import _interrupted
from elmojax import dump_bilm_embeddings
from elmojax.infer import dump_parts
from elmojax.infer.dumps import dump_elmo
from elmojax.process import runtime
CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "bilm_tf_checkpoint")

# A dump in a process of its own, with two stand-ins a test may ask for in the environment: a
# disk that fills after so many bytes (where no small file system can be mounted), and a free
# space check that sees room (to reach a real full disk in the merge).
RUNNER = r"""
import errno, os, shutil, sys
budget = int(os.environ.get("TEST_WRITE_BUDGET", "0"))
if budget:
    real, written = os.pwrite, [0]
    def pwrite(fd, data, offset):
        written[0] += len(data)
        if written[0] > budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)
    os.pwrite = pwrite
if os.environ.get("TEST_SEE_ROOM"):
    usage = shutil.disk_usage
    shutil.disk_usage = lambda path: usage(path)._replace(free=1 << 50)
from elmojax.dump import main
sys.exit(main(sys.argv[1:]))
"""


def _elmo_args(dataset, out, *more):
    return ["elmo", str(dataset), str(out), "--all", "--options", OPTIONS_FILE, "--weights", WEIGHT_FILE,
            "--batch-size", "10", "--chunk-lines", "10", "--quiet", *more]


def _run(args, **env):
    return subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **env))


def _start(args):
    """python -m elmojax.dump ARGS, as a user starts it."""
    return subprocess.Popen([sys.executable, "-m", "elmojax.dump", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _error_line(result) -> str:
    """The one line a failed command printed (its other lines may only be progress notes)."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and "HDF5" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith(("error:", "stopped by"))]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    return errors[0]


def _chunks(directory):
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for m in map(re.compile(r"chunk-(\d+)\.hdf5$").match, os.listdir(directory)) if m)


def _leftovers(*directories):
    """Temporary files (a dot and .tmp) in the directories."""
    return [name for d in directories if os.path.isdir(d) for name in os.listdir(d)
            if name.startswith(".") and name.endswith(".tmp")]


def _assert_same(path, reference):
    with h5py.File(path, "r") as f, h5py.File(reference, "r") as g:
        assert sorted(f) == sorted(g)
        for key in g:
            assert f[key].dtype == g[key].dtype and f[key].shape == g[key].shape, key
            if g[key].dtype == object:  # strings
                assert f[key][...].tolist() == g[key][...].tolist(), key
            else:
                assert f[key][...].tobytes() == g[key][...].tobytes(), key


@contextlib.contextmanager
def _small_filesystem(path, size: int):
    """A tmpfs of `size` bytes at `path`, where this process may mount one; None otherwise."""
    os.makedirs(path)
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def _resize(path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 short lines, and their uninterrupted `elmo --all` dump in chunks of 10 (6 chunks)."""
    directory = tmp_path_factory.mktemp("corpus")
    dataset = short_lines(directory / "lines.txt", 60)
    reference = str(directory / "reference.hdf5")
    dump_elmo(dataset, reference, "all", OPTIONS_FILE, WEIGHT_FILE, batch_size=10, chunk_lines=10, progress=False)
    return dataset, reference


def _dump(dataset, out):
    dump_elmo(dataset, str(out), "all", OPTIONS_FILE, WEIGHT_FILE, batch_size=10, chunk_lines=10, progress=False)


@pytest.mark.slow
def test_a_full_disk_while_writing_a_chunk_or_merging_is_one_line_and_keeps_the_finished_chunks(
        tmp_path, monkeypatch, corpus):
    """On a real small tmpfs: the disk fills in a chunk (one line naming it, the finished chunks
    kept, exit 1, no temporary file, no segfault), then before the merge (the free space
    check), then in the merge itself (a real ENOSPC: the same); with room again, the same
    command finishes the file an uninterrupted dump writes."""
    dataset, reference = corpus
    size = os.path.getsize(reference)
    disk = tmp_path / "disk"
    out, work = disk / "out.hdf5", str(disk / "out.hdf5.parts")
    with _small_filesystem(disk, size // 2) as mounted:
        full = {} if mounted else {"TEST_WRITE_BUDGET": str(size // 2)}
        result = _run(_elmo_args(dataset, out), **full)
        assert result.returncode == 1, result.stderr[-3000:]
        kept = _chunks(work)
        assert 1 <= len(kept) < 6 and kept == list(range(len(kept)))
        n = len(kept)
        assert _error_line(result) == (f"error: {work}: no space left on device while writing chunk {n}; the {n} "
                                       f"finished chunk{'s are' if n > 1 else ' is'} kept; free space and rerun")
        assert not _leftovers(disk, work) and not out.exists()

        # every chunk, then a merge with too little room: refused before it writes
        if mounted:
            _resize(disk, 64 << 20)
        def stop(*args, **kwargs):
            raise _Stop

        with monkeypatch.context() as m:
            m.setattr(dump_parts.Work, "merge", stop)
            with pytest.raises(_Stop):
                _dump(dataset, out)
        assert _chunks(work) == list(range(6))
        if mounted:
            _resize(disk, shutil.disk_usage(disk).used + size // 2)
        else:
            real = shutil.disk_usage
            monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=size // 2))
        with pytest.raises(OSError, match=r"out.hdf5: no room to merge the chunks into it \(at least [\d.]+ "
                                          r"[KMG]?B are needed, [\d.]+ [KMG]?B are free\); the 6 finished chunks "
                                          r"are kept in .*out.hdf5.parts; free space and rerun") as e:
            _dump(dataset, out)
        assert e.value.errno == errno.ENOSPC and not out.exists()
        monkeypatch.undo()

        # the check passed over: the disk fills in the merge
        result = _run(_elmo_args(dataset, out), TEST_SEE_ROOM="1", **full)
        assert result.returncode == 1, result.stderr[-3000:]
        assert _error_line(result) == (f"error: {out}: no space left on device while merging the chunks into it; "
                                       f"the 6 finished chunks are kept in {work}; free space and rerun")
        assert not _leftovers(disk, work) and not out.exists() and _chunks(work) == list(range(6))

        if mounted:
            _resize(disk, 64 << 20)
        _dump(dataset, out)
        assert sorted(os.listdir(disk)) == ["out.hdf5"]
        _assert_same(out, reference)


def test_an_hdf5_file_on_a_full_disk_is_an_oserror_and_leaves_nothing(tmp_path):
    """What HDF5 itself would crash on (a write failing under it): an OSError naming the file."""
    disk = tmp_path / "disk"
    with _small_filesystem(disk, 64 << 10) as mounted:
        if not mounted:
            pytest.skip("no tmpfs can be mounted here (the command-line test covers a stand-in)")
        with pytest.raises(OSError, match="No space left on device") as e:
            with dump_parts.hdf5_output(str(disk / "x.hdf5"), durable=True) as out:
                for i in range(100):
                    out.put(str(i), np.full((3, 10, 32), i, np.float32))
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(disk / "x.hdf5")
        assert os.listdir(disk) == []
        with dump_parts.hdf5_output(str(disk / "x.hdf5")) as out:  # and the file system is fine after it
            out.put("a", np.ones(3))
        with h5py.File(disk / "x.hdf5", "r") as f:
            assert f["a"][...].tolist() == [1, 1, 1]


def test_a_signal_while_hdf5_writes_waits_for_it(tmp_path, monkeypatch):
    """SIGTERM inside HDF5's own write (the fileobj driver's callback, where a Python exception
    would be a failed write) is taken once HDF5 has returned: Stopped, and no file left."""
    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        if not calls:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10000):
                pass  # a Python handler would run here, inside HDF5
        calls.append(len(data))
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    with runtime.stop_on_signals():
        with pytest.raises(runtime.Stopped, match="stopped by SIGTERM"):
            with dump_parts.hdf5_output(str(tmp_path / "x.hdf5")) as out:
                for i in range(100):
                    out.put(str(i), np.ones(1000))
                time.sleep(5)
    assert calls and os.listdir(tmp_path) == []


def test_a_stop_python_swallows_is_raised_again_and_a_second_one_waits(monkeypatch):
    """A Stopped raised inside a garbage-collector callback (Python prints and drops it) or while
    logging writes comes out again in the command; a second signal at once is ignored."""
    import gc

    armed = [True]

    def callback(phase, info):
        if phase == "start" and armed:
            armed.clear()
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass  # the handler raises here, inside the callback
    with runtime.stop_on_signals():
        gc.callbacks.append(callback)
        try:
            with pytest.raises(runtime.Stopped, match="stopped by SIGTERM"):
                gc.collect()
                time.sleep(5)  # cut short by the signal sent again
        finally:
            gc.callbacks.remove(callback)
        assert not armed
        os.kill(os.getpid(), signal.SIGINT)  # within the grace time after the first: ignored
        time.sleep(0.05)

    class Kill:
        def __str__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
            return "never"
    logger = logging.getLogger("test_dump_faults.swallow")
    monkeypatch.setattr(logger, "propagate", False)
    with runtime.stop_on_signals(), open(os.devnull, "w") as devnull:
        handler = runtime.LogHandler(devnull)
        logger.addHandler(handler)
        try:
            with pytest.raises(runtime.Stopped, match="stopped by SIGINT"):
                logger.warning(Kill())
        finally:
            logger.removeHandler(handler)


def _wait_for(condition, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.mark.slow
def test_sigterm_and_sigint_stop_a_dump_in_one_line_and_it_resumes(tmp_path, corpus):
    """SIGTERM as soon as the dump has its work directory (while it compiles, as often as not),
    then SIGINT once chunks are done: exit 143 and 130, one line each saying what is done, the
    directory resumable with no temporary file; the same command then finishes the file."""
    dataset, reference = corpus
    out, work = tmp_path / "out.hdf5", str(tmp_path / "out.hdf5.parts")
    args = _elmo_args(dataset, out)
    process = _start(args)
    _wait_for(lambda: os.path.exists(os.path.join(work, dump_parts.LOCK)), process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", err)
    line = _error_line(result)
    n = len(_chunks(work))
    assert process.returncode == 143 and line == (f"stopped by SIGTERM: {n} of 6 chunks are done in {work}; run "
                                                  f"the same command again to resume"), err[-3000:]
    assert not _leftovers(tmp_path, work) and not out.exists() and not os.path.exists(os.path.join(work, dump_parts.LOCK))

    process = _start(args)
    _wait_for(lambda: len(_chunks(work)) >= min(n + 2, 5), process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.01)
    process.send_signal(signal.SIGINT)  # Ctrl-C twice: the clean-up still runs to its end
    _, err = process.communicate(timeout=120)
    line = _error_line(subprocess.CompletedProcess(process.args, process.returncode, "", err))
    done = len(_chunks(work))
    assert process.returncode == 130 and "KeyboardInterrupt" not in err, err[-3000:]
    assert re.fullmatch(rf"stopped by SIGINT: {done} of 6 chunks are done in {re.escape(work)}; run the same "
                        rf"command again to (resume|merge them)", line) or \
        line == f"stopped by SIGINT after {out} was written (complete)", line
    assert not _leftovers(tmp_path, work)

    _dump(dataset, out)
    assert sorted(os.listdir(tmp_path)) == ["out.hdf5"]
    _assert_same(out, reference)


@pytest.mark.slow
def test_a_stopped_single_file_dump_leaves_nothing(tmp_path):
    """score writes its file as it goes: SIGTERM midway leaves neither it nor its temporary file.
    (Should the run end before the signal, on a starved machine, it is tried again.)"""
    dataset = short_lines(tmp_path / "lines.txt", 3000)
    out = tmp_path / "scores.jsonl"
    for _ in range(3):
        process = _start(["score", dataset, str(out), "--options", os.path.join(CHECKPOINT, "options.json"),
                          "--weights", CHECKPOINT, "--softmax", CHECKPOINT, "--batch-size", "4"])
        _wait_for(lambda: _leftovers(tmp_path), process)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
        if not (process.returncode in (0, -signal.SIGTERM) and out.exists()):
            break
        assert len(out.read_text().splitlines()) == 3000  # finished first (the signal after it): whole
        out.unlink()
    assert process.returncode == 143, (process.returncode, err[-3000:], os.listdir(tmp_path))
    line = _error_line(subprocess.CompletedProcess(process.args, process.returncode, "", err))
    assert line == f"stopped by SIGTERM; {out} was not written", err[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["lines.txt"]


@pytest.mark.slow
def test_a_second_dump_into_the_same_output_is_refused_naming_the_first(tmp_path, caplog, corpus):
    """While a dump runs (held still with SIGSTOP once it has its lock), the same command again
    is refused in one line naming its process; the first then finishes undisturbed. A lock
    whose process no longer runs is taken over with a warning."""
    dataset, reference = corpus
    out, work = tmp_path / "out.hdf5", str(tmp_path / "out.hdf5.parts")
    first = _start(_elmo_args(dataset, out))
    try:
        _wait_for(lambda: os.path.exists(os.path.join(work, dump_parts.LOCK)), first)
        first.send_signal(signal.SIGSTOP)
        second = _run(_elmo_args(dataset, out))
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    assert _error_line(second) == (f"error: {work}: in use by another dump (process {first.pid} on "
                                   f"{os.uname().nodename}, {work}/{dump_parts.LOCK}); if none runs there, remove that file")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["out.hdf5"]
    _assert_same(out, reference)
    os.remove(out)

    dead = dead_pid()
    os.makedirs(work)
    with open(os.path.join(work, dump_parts.LOCK), "w") as f:
        json.dump({"host": os.uname().nodename, "pid": dead}, f)
    with caplog.at_level(logging.WARNING):
        _dump(dataset, out)
    assert f"taking over the lock of process {dead}, which no longer runs" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["out.hdf5"]
    _assert_same(out, reference)


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_damaged_chunks_are_never_merged(tmp_path, monkeypatch, caplog, corpus):
    """Chunks damaged on disk after they were finished (a byte changed, cut short, replaced by
    garbage, its checksum file lost) are removed with a warning line each and computed again:
    the file is the uninterrupted one."""
    dataset, reference = corpus
    out, work = str(tmp_path / "out.hdf5"), dump_parts.Work(str(tmp_path / "out.hdf5"), {}, 60, 10)
    args = (dataset, out, "all", OPTIONS_FILE, WEIGHT_FILE)
    _interrupted(monkeypatch, 4, dump_elmo, *args, batch_size=10, chunk_lines=10, progress=False)
    assert _chunks(work.directory) == [0, 1, 2, 3, 4]
    _flip(work.chunk_file(0), os.path.getsize(work.chunk_file(0)) // 2)  # in its arrays, most likely
    _flip(work.chunk_file(1), 100)                                        # in hdf5's own metadata
    with open(work.chunk_file(2), "r+b") as f:
        f.truncate(os.path.getsize(work.chunk_file(2)) - 1000)
    with open(work.chunk_file(3), "wb") as f:
        f.write(os.urandom(5000))
    os.remove(work.sum_file(4))
    with caplog.at_level(logging.WARNING):
        _dump(dataset, out)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5, warnings
    for k, why in [(0, "its bytes do not match its checksum"), (1, "its bytes do not match its checksum"),
                   (2, "bytes where"), (3, "bytes where"), (4, "it has no checksum file")]:
        assert any(w.startswith(f"warning: {work.chunk_file(k)}: damaged (") and why in w and
                   "removed, its lines" in w for w in warnings), (k, warnings)
    assert sorted(os.listdir(tmp_path)) == ["out.hdf5"]
    _assert_same(out, reference)


def test_a_damaged_chunk_merged_without_recomputing_is_one_line_saying_to_rerun(tmp_path):
    work = dump_parts.Work(str(tmp_path / "out.hdf5"), {"dump": "test"}, 4, 2)
    with work.locked():
        work.start()
        for k in (0, 1):
            work.write(k, lambda f: [f.put(str(i), np.full((3, 5), i, np.float32)) for i in work.chunks[k]])
        _flip(work.chunk_file(1), os.path.getsize(work.chunk_file(1)) - 10)
        with pytest.raises(ValueError, match=r"chunk-000001.hdf5: damaged \(its bytes do not match its checksum\); "
                                             r"removed: rerun the dump to compute its lines again"):
            work.merge(lambda lines: [str(i) for i in lines])
        assert _chunks(work.directory) == [0] and not os.path.exists(work.outfile)
        work.write(1, lambda f: [f.put(str(i), np.full((3, 5), i, np.float32)) for i in work.chunks[1]])
        work.merge(lambda lines: [str(i) for i in lines])
    work.remove_directory()
    assert os.listdir(tmp_path) == ["out.hdf5"]
    with h5py.File(work.outfile, "r") as f:
        assert sorted(f) == ["0", "1", "2", "3"] and f["3"][0, 0] == 3


def test_a_stateful_dump_checks_the_chunk_it_carries_on_from(tmp_path, monkeypatch, caplog, fixture_sentences):
    """A damaged chunk whose state the next chunk would start from is found before any work,
    removed and computed again: the numbers are still bilm-tf's."""
    sentences, expected = fixture_sentences
    dataset = tmp_path / "data.txt"
    dataset.write_text("".join(" ".join(s) + "\n" for s in sentences[0][:2]), encoding="utf-8")
    out = str(tmp_path / "elmo.hdf5")
    args = (VOCAB_FILE, str(dataset), OPTIONS_FILE, WEIGHT_FILE, out)
    _interrupted(monkeypatch, 0, dump_bilm_embeddings, *args, stateful=True, chunk_lines=1, progress=False)
    chunk = dump_parts.Work(out, {}, 2, 1).chunk_file(0)
    with h5py.File(chunk, "r") as f:
        offset = f["carry/0"].id.get_offset()  # the carried state itself
    _flip(chunk, offset + 4)
    with caplog.at_level(logging.WARNING):
        dump_bilm_embeddings(*args, stateful=True, chunk_lines=1, progress=False)
    assert f"{chunk}: damaged (its bytes do not match its checksum)" in caplog.text
    with h5py.File(out, "r") as f:
        for i in range(2):
            assert np.max(np.abs(f[str(i)][2] - expected[0][i])) <= 1e-6


def test_a_work_directory_without_checksums_resumes_and_merges(tmp_path, monkeypatch, caplog, corpus):
    """A work directory the previous version wrote (manifest version 1, no checksum files):
    its chunks are kept and merged unchecked, saying so; new chunks get checksums."""
    dataset, reference = corpus
    out = str(tmp_path / "out.hdf5")
    args = (dataset, out, "all", OPTIONS_FILE, WEIGHT_FILE)
    _interrupted(monkeypatch, 1, dump_elmo, *args, batch_size=10, chunk_lines=10, progress=False)
    work = dump_parts.Work(out, {}, 60, 10)
    manifest = json.load(open(os.path.join(work.directory, dump_parts.MANIFEST)))
    json.dump({**manifest, "version": 1}, open(os.path.join(work.directory, dump_parts.MANIFEST), "w"))
    for k in (0, 1):
        os.remove(work.sum_file(k))
    written = []
    with monkeypatch.context() as m:
        write = dump_parts.Work.write
        m.setattr(dump_parts.Work, "write", lambda self, k, fill: (written.append(os.listdir(self.directory)),
                                                              write(self, k, fill)))
        with caplog.at_level(logging.INFO):
            dump_elmo(*args, batch_size=10, chunk_lines=10, progress=False)
    assert "resuming: 2 of 6 chunks of 10 lines done" in caplog.text
    assert "2 chunk(s) written before chunks had checksums were merged unchecked" in caplog.text
    assert "chunk-000002.sum" in written[-1]  # chunk 3's turn: chunk 2 has its checksum
    _assert_same(out, reference)


def test_sentence_keys_hdf5_would_nest_are_refused_before_any_work(tmp_path, monkeypatch):
    import elmojax.infer.dumps

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for lines, line, what in [(["a b", "and / or", "c"], 2, "'/'"), ([".", "b"], 1, "'.' alone"),
                              (["a", "b\0c"], 2, "a NUL character"), (["/"], 1, "'/'")]:
        dataset = tmp_path / "input.txt"
        dataset.write_bytes("".join(f"{s}\n" for s in lines).encode())
        with monkeypatch.context() as m:
            m.setattr(elmojax.infer.dumps, "BidirectionalLanguageModel", no_model)
            with pytest.raises(ValueError, match=rf"input.txt, line {line}: the sentence holds {re.escape(what)}, "
                                                 rf"which cannot be in an hdf5 key"):
                dump_elmo(str(dataset), str(tmp_path / "out.hdf5"), "top", OPTIONS_FILE, WEIGHT_FILE,
                          use_sentence_keys=True)
        assert sorted(os.listdir(tmp_path)) == ["input.txt"]
    lines = [".a", "..", "a.", "b ' c", "d \\ e", "sentence_to_index"]  # hdf5 keeps each as one key
    dataset.write_text("".join(f"{s}\n" for s in lines), encoding="utf-8")
    dump_elmo(str(dataset), str(tmp_path / "out.hdf5"), "top", OPTIONS_FILE, WEIGHT_FILE, use_sentence_keys=True,
              progress=False)
    with h5py.File(tmp_path / "out.hdf5", "r") as f:
        assert sorted(f.keys()) == sorted(lines) and all(f[s].shape[1] == 32 for s in lines)


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "in.txt").write_text("a b\nc d\n", encoding="utf-8")
    (tmp_path / "bad.json").write_text('{"lstm":', encoding="utf-8")
    (tmp_path / "bad.hdf5").write_bytes(b"not an hdf5 file at all")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    return tmp_path


def _bad_command_lines(t):
    model = ["--options", OPTIONS_FILE, "--weights", WEIGHT_FILE]
    bilm = ["bilm", "--vocab", VOCAB_FILE, *model, "--input", f"{t}/in.txt", "--output", f"{t}/o.hdf5"]
    elmo = ["elmo", "--input", f"{t}/in.txt", "--output", f"{t}/o.hdf5", "--top", *model]
    checkpoint = ["--options", os.path.join(CHECKPOINT, "options.json"), "--weights", CHECKPOINT]
    prog = "error: python -m elmojax.dump"
    return [
        (bilm[:-4] + ["--input", f"{t}/missing.txt", "--output", f"{t}/o.hdf5"],
         f"error: {t}/missing.txt: no such dataset file"),
        (bilm[:-4] + ["--input", f"{t}/a_dir", "--output", f"{t}/o.hdf5"],
         f"error: {t}/a_dir: a directory, not a dataset file"),
        (["bilm", "--vocab", f"{t}/missing.txt", *bilm[3:]], f"error: {t}/missing.txt: no such vocabulary file"),
        (bilm[:-1] + [f"{t}/a_dir"], f"error: {t}/a_dir: a directory; give a file name to write"),
        (bilm[:-1] + [f"{t}/a_file/o.hdf5"],
         f"error: {t}/a_file: not a directory, so {t}/a_file/o.hdf5 cannot be written"),
        (elmo[:6] + ["--options", OPTIONS_FILE, "--weights", f"{t}/bad.hdf5"],
         f"error: {t}/bad.hdf5: not an hdf5 file (nor a bilm-tf checkpoint); not a weight file"),
        (elmo[:6] + ["--options", OPTIONS_FILE, "--weights", f"{t}/none.hdf5"],
         f"error: {t}/none.hdf5: no such weight file"),
        (elmo[:6] + ["--options", f"{t}/bad.json", "--weights", WEIGHT_FILE],
         f"error: {t}/bad.json: not a valid UTF-8 JSON file"),
        (["tokens", "--vocab", VOCAB_FILE, "--options", OPTIONS_FILE, "--weights", f"{t}/a_dir", "--output",
          f"{t}/t.hdf5"], f"error: {t}/a_dir: a directory, not a weight file"),
        (elmo + ["--batch_size", "-3"], f"{prog} elmo: argument --batch_size: must be a positive integer, got -3 "
                                        f"(see python -m elmojax.dump elmo --help)"),
        (elmo + ["--chunk_lines", "0"], f"{prog} elmo: argument --chunk_lines: must be a positive integer, got 0"),
        (elmo + ["--batch_size", "many"], f"{prog} elmo: argument --batch_size: must be a positive integer, "
                                          f"got 'many'"),
        (elmo[:5] + model, f"{prog} elmo: one of the arguments --all --top --average is required"),
        (["sentences", "--input", f"{t}/in.txt", "--output", f"{t}/o.hdf5", *model, "--layers", "7"],
         "error: layers must be 'average', 'top' or a layer 0..2, got 7"),
        (["score", "--input", f"{t}/in.txt", "--output", f"{t}/s.jsonl", *checkpoint, "--softmax", f"{t}/in.txt"],
         f"error: {t}/in.txt: not an hdf5 file (nor a bilm-tf checkpoint); not a softmax file"),
        (["nope"], f"{prog}: argument command: invalid choice: 'nope'"),
    ]


def test_bad_command_lines_get_one_line(bad_files, capfd):
    from elmojax.dump import main
    for argv, message in _bad_command_lines(bad_files):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
        assert status not in (0, None), argv
        captured = capfd.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (argv, captured.err)
        assert sorted(os.listdir(bad_files)) == ["a_dir", "a_file", "bad.hdf5", "bad.json", "in.txt"], argv


@pytest.mark.slow
def test_an_unwritable_output_directory_is_one_line(tmp_path):
    dataset = short_lines(tmp_path / "lines.txt", 5)
    target = tmp_path / "ro"
    with _small_filesystem(target, 1 << 20) as mounted:
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        elif os.geteuid() == 0:
            pytest.skip("root ignores file permissions, and no tmpfs can be mounted here")
        else:
            os.chmod(target, 0o555)
        try:
            result = subprocess.run([sys.executable, "-m", "elmojax.dump", *_elmo_args(dataset, target / "o.hdf5")],
                                    cwd=ROOT, capture_output=True, text=True)
        finally:
            if not mounted:
                os.chmod(target, 0o755)
    assert result.returncode == 1
    assert _error_line(result) == (f"error: {target}: not writable (read-only, or no permission), so "
                                   f"{target}/o.hdf5 cannot be written")
