"""elmojax.formats.files: atomic writes that a signal or kill -9 leaves whole, with the umask's
permissions; text read with one policy for a byte-order mark and CRLF line ends."""

import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from conftest import dead_pid, run_python, start_python
from elmojax.formats import files
from elmojax.train.metrics import MetricsWriter

# A writer in its own process: writes TARGET(s) the way argv[1] says, inside stop_on_signals,
# printing "writing" once it is mid-write; a Stopped is reported on stdout and exits 3.
WRITER = textwrap.dedent("""
    import os, sys, time
    from elmojax.formats import files
    from elmojax.process import runtime

    how, targets = sys.argv[1], sys.argv[2:]

    def mid_write():
        print("writing", flush=True)
        time.sleep(60)

    try:
        with runtime.stop_on_signals():
            if how == "atomic_output":  # 16 MiB written, then more every 10 ms
                with files.atomic_output(targets[0]) as tmp, open(tmp, "wb") as f:
                    f.write(b"new" * (16 << 20))
                    f.flush()
                    print("writing", flush=True)
                    for _ in range(6000):
                        f.write(b"new" * 4096)
                        time.sleep(0.01)
            elif how == "write_bytes":  # all data written, the first file being flushed to disk
                os.fsync = lambda fd: mid_write()
                files.write_bytes({t: b"new" * (8 << 20) for t in targets})
            elif how == "renames":  # SIGTERM sent to itself between the renames of two files
                replace = os.replace
                def replace_then_signal(a, b):
                    replace(a, b)
                    os.kill(os.getpid(), 15)
                os.replace = replace_then_signal
                files.write_bytes({t: b"new" for t in targets})
                print("not stopped", flush=True)
    except runtime.Stopped as e:
        print(e, flush=True)
        sys.exit(3)
""")


def start_writer(how, *targets):
    return start_python("-c", WRITER, how, *map(str, targets))


def wait_mid_write(process):
    line = process.stdout.readline()
    assert line == "writing\n", (line, process.stderr.read() if process.poll() is not None else "")


def read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["atomic_output", "write_bytes"])
def test_sigterm_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, how):
    targets = [tmp_path / "out.bin", tmp_path / "other.bin"][: 1 if how == "atomic_output" else 2]
    for target in targets:
        target.write_bytes(b"old")
    writer = start_writer(how, *targets)
    wait_mid_write(writer)
    assert len(os.listdir(tmp_path)) > len(targets)  # its temporary file is there
    writer.send_signal(signal.SIGTERM)
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 3 and out.strip() == "stopped by SIGTERM", (out, err)
    assert sorted(os.listdir(tmp_path)) == sorted(t.name for t in targets)
    assert all(read(t) == b"old" for t in targets)


@pytest.mark.slow
def test_a_signal_during_the_renames_waits_for_all_of_them(tmp_path):
    """write_bytes writes all its files or none: a SIGTERM between two renames is handled after both."""
    targets = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for target in targets:
        target.write_bytes(b"old")
    writer = start_writer("renames", *targets)
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 3 and out.strip() == "stopped by SIGTERM", (out, err)
    assert [read(t) for t in targets] == [b"new", b"new"]
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.bin"]


@pytest.mark.slow
def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path, caplog):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    writer = start_writer("atomic_output", target)
    wait_mid_write(writer)
    writer.kill()
    writer.wait()
    [left] = [n for n in os.listdir(tmp_path) if n != "out.bin"]
    assert re.fullmatch(rf"\.out\.bin\.{writer.pid}\.[0-9a-f]{{8}}-[0-9a-f]{{16}}\.tmp", left)
    assert read(target) == b"old"

    # what is not a dead writer's leftover of out.bin stays: a running process's (another
    # writer at work), another host's (its processes cannot be checked), another file's
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = f".out.bin.{alive.pid}.{left.split('.')[4]}.tmp"
        other_host = f".out.bin.{writer.pid}.0123abcd-{'0' * 16}.tmp"
        other_file = left.replace(".out.bin.", ".out.binx.")
        for name in (running, other_host, other_file):
            (tmp_path / name).write_bytes(b"partial")
        with caplog.at_level(logging.INFO, logger="elmojax.formats.files"):
            files.write_bytes({str(target): b"new"})
        assert read(target) == b"new"
        assert sorted(os.listdir(tmp_path)) == sorted(["out.bin", running, other_host, other_file])
        assert [r.levelno for r in caplog.records] == [logging.INFO]  # one info line, no warning
        assert left in caplog.text and str(writer.pid) in caplog.text
        # the other writers go through atomic_output and write_json the same way
        os.remove(tmp_path / other_host)
        alive.kill()
        alive.wait()
        with files.atomic_output(str(target)) as tmp:
            open(tmp, "wb").close()
        assert sorted(os.listdir(tmp_path)) == sorted(["out.bin", other_file])
        files.write_json(str(tmp_path / "out.binx"), {})
        assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.binx"]
    finally:
        alive.kill()
        alive.wait()


def test_a_directory_swept_of_dead_writers_leftovers(tmp_path):
    """remove_leftovers(None, directory): every file's leftovers of dead writers there, and only those."""
    dead = dead_pid()
    host = os.path.basename(files.temporary_path("x")).split(".")[3].split("-")[0]  # .x.<pid>.<host>-<random>.tmp
    names = {f".chunk-000001.hdf5.{dead}.{host}-{'1' * 16}.tmp": False,  # removed
             f".manifest.json.{dead}.{host}-{'2' * 16}.tmp": False,
             f".manifest.json.{os.getpid()}.{host}-{'3' * 16}.tmp": True,  # a running writer's: kept
             f".out.{dead}.{host}-{'4' * 16}.old": True,  # not a temporary file: kept
             "chunk-000002.hdf5": True}
    for name in names:
        (tmp_path / name).write_bytes(b"")
    os.mkdir(tmp_path / f".dir.{dead}.{host}-{'5' * 16}.tmp")  # a directory too
    files.remove_leftovers(None, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(name for name, kept in names.items() if kept)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where no file can be made")
def test_a_file_that_cannot_be_made_is_named_as_the_user_named_it():
    with pytest.raises(OSError) as error:
        files.write_json("/proc/options.json", {})
    assert error.value.filename == "/proc/options.json"


def test_a_long_name_gets_a_temporary_name_that_fits(tmp_path):
    target = tmp_path / ("é" * 120 + ".hdf5")  # 245 bytes: room for no suffix of its own
    files.write_bytes({str(target): b"x"})
    assert os.listdir(tmp_path) == [target.name] and read(target) == b"x"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=["022", "002", "077"])
def test_outputs_have_the_umasks_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with files.atomic_output(str(tmp_path / "plain.txt")) as tmp:
            with open(tmp, "w") as f:
                f.write("x")
        with files.atomic_output(str(tmp_path / "durable.txt"), durable=True) as tmp:
            with open(tmp, "w") as f:
                f.write("x")
        with files.atomic_output(str(tmp_path / "weights.hdf5")) as tmp:
            with h5py.File(tmp, "w") as f:
                f["x"] = np.zeros(3)
        files.write_bytes({str(tmp_path / "a.bin"): b"a", str(tmp_path / "sub" / "b.bin"): b"b"})
        files.write_json(str(tmp_path / "options.json"), {"a": 1})
        metrics = MetricsWriter(str(tmp_path / "workdir"))  # TensorBoard's events and metrics.jsonl
        metrics.scalars(1, {"train/loss": 1.0})
        metrics.close()
    finally:
        os.umask(previous)
    modes = {os.path.relpath(os.path.join(d, n), tmp_path): stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode)
             for d, dirs, names in os.walk(tmp_path) for n in names + dirs}
    [events] = [name for name in modes if name.startswith("workdir/events.out.tfevents.")]
    assert modes == {"plain.txt": 0o666 & ~umask, "durable.txt": 0o666 & ~umask, "weights.hdf5": 0o666 & ~umask,
                     "a.bin": 0o666 & ~umask, "sub": 0o777 & ~umask, "sub/b.bin": 0o666 & ~umask,
                     "options.json": 0o666 & ~umask, "workdir": 0o777 & ~umask,
                     "workdir/metrics.jsonl": 0o666 & ~umask, events: 0o666 & ~umask}
    with h5py.File(tmp_path / "weights.hdf5", "r") as f:
        assert f["x"].shape == (3,)


def test_uninterrupted_restores_the_handlers(tmp_path):
    def handler(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, handler)
    try:
        with files.uninterrupted():
            assert signal.getsignal(signal.SIGTERM) is not handler
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.slow
def test_a_handler_set_outside_python_is_kept(tmp_path):
    """A SIGTERM handler that Python does not know (JAX's preemption service sets one in C++) is
    still there after a write: here SIGTERM ignored through libc, then sent after the write."""
    code = textwrap.dedent(f"""
        import ctypes, os, signal, sys
        from elmojax.formats import files
        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal(signal.SIGTERM, ctypes.c_void_p(1))  # SIG_IGN, behind Python's back
        files.write_bytes({{{str(tmp_path / "a.bin")!r}: b"a", {str(tmp_path / "b.bin")!r}: b"b"}})
        os.kill(os.getpid(), signal.SIGTERM)
        print("still here")
    """)
    run = run_python(code, timeout=60)
    assert run.returncode == 0 and run.stdout == "still here\n", (run.returncode, run.stderr)


# --- text ---------------------------------------------------------------------------------------

def test_json_with_a_byte_order_mark(tmp_path, caplog):
    path = tmp_path / "options.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": [1, 2]}, indent=1).replace("\n", "\r\n").encode())
    with caplog.at_level(logging.WARNING, logger="elmojax.formats.files"):
        assert files.read_json(str(path)) == {"a": [1, 2]}
        assert files.read_json(str(path)) == {"a": [1, 2]}
    assert caplog.messages == [f"note: {path}: starts with a UTF-8 byte-order mark; ignored"]
    path.write_bytes(b"\xef\xbb\xbf{\xff}")
    with pytest.raises(ValueError, match="options.json: not a valid UTF-8 JSON file"):
        files.read_json(str(path))


def test_read_lines_and_read_text_agree(tmp_path, caplog):
    plain = "one two\n\nthree\x85four\tfive \n  six\n"
    (tmp_path / "plain.txt").write_text(plain, encoding="utf-8", newline="")
    (tmp_path / "dos.txt").write_bytes(b"\xef\xbb\xbf" + plain.replace("\n", "\r\n").encode())
    with caplog.at_level(logging.WARNING, logger="elmojax.formats.files"):
        for name in ("plain.txt", "dos.txt"):
            path = str(tmp_path / name)
            assert list(files.read_lines(path)) == list(enumerate(plain.split("\n")[:-1], start=1))
            assert files.read_text(path) == plain
    dos = tmp_path / "dos.txt"
    assert caplog.messages == [f"note: {dos}: starts with a UTF-8 byte-order mark; ignored",
                               f"note: {dos}: Windows line ends (CRLF); read as plain line ends"]


def test_read_text_names_the_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "shard.txt"
    path.write_bytes(b"\xef\xbb\xbfok\r\nfine\nca\xe9 x\n")
    with pytest.raises(ValueError, match=r"shard.txt, line 3: not valid UTF-8 \(invalid continuation byte at "
                                         r"byte 2\)") as read_text_error:
        files.read_text(str(path))
    with pytest.raises(ValueError) as read_lines_error:
        list(files.read_lines(str(path)))
    assert str(read_text_error.value) == str(read_lines_error.value)


def test_every_reader_reads_a_bom_crlf_file_as_the_plain_one(tmp_path):
    """The corpus readers, the vocabulary, prepare's reader and the dumps' inputs all take the
    same tokens from a file with a byte-order mark and CRLF line ends as from its plain twin."""
    from elmojax.data import corpus
    from elmojax.data.shards import count_tokens, encode_shard, read_sentences
    from elmojax.formats.vocab import Vocabulary
    from elmojax.infer import dumps

    text = "<S>\n</S>\n<UNK>\nthe\ncaf\u00e9\ndog  \n"
    plain, dos = tmp_path / "plain.txt", tmp_path / "dos.txt"
    plain.write_text(text, encoding="utf-8")
    dos.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))

    def readings(path):
        vocab = Vocabulary(path)
        shard = encode_shard(path, vocab, spell=False)
        return (vocab._id_to_word, shard.words.tolist(), shard.lengths.tolist(), read_sentences(path)[0],
                [s.split() for s in read_sentences(path)[0]], count_tokens(path), corpus.read_corpus([path]),
                dumps._read_sentences(path), dumps._sentence_lines(path))

    a, b = readings(str(plain)), readings(str(dos))
    assert a == b and a[1][:6] == [0, 1, 2, 3, 4, 5]  # "<S>" is <S>, not "\ufeff<S>"


def test_a_utf16_file_is_said_to_be_one(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("<S>\n</S>\nthe\n", encoding="utf-16")  # with its byte-order mark
    for read in (lambda p: list(files.read_lines(p)), files.read_text):
        with pytest.raises(ValueError, match=r"vocab.txt, line 1: not valid UTF-8 \(invalid start byte at byte 0\); "
                                             r"it starts with UTF-16's byte-order mark: save it as UTF-8"):
            read(str(path))
    path.write_bytes(b"fine\n\xff\xfe\n")  # not at the start: no such guess
    with pytest.raises(ValueError) as error:
        list(files.read_lines(str(path)))
    assert str(error.value) == f"{path}, line 2: not valid UTF-8 (invalid start byte at byte 0)"
