"""Files by URL (elmojax.formats.remote), served by a local http.server on 127.0.0.1 (no network): a
download, a cache hit, an interrupted download resumed, a server error, a truncated body, a
404; responses that are not the file (an HTML page, another kind of file, a wrong size or
sha256) never cached; a wrong file left in the cache fetched again; and a model loaded by URL."""

import gzip
import hashlib
import http.server
import io
import os
import shutil
import sys
import threading
import time

import numpy as np
import pytest

from elmojax import BidirectionalLanguageModel, pretrained
from elmojax.formats import remote
from elmojax.formats.vocab import Batcher
from conftest import ROOT

MODEL = os.path.join(ROOT, "tests", "fixtures", "model")


class Server:
    """Serves a directory, honouring Range requests; `requests` logs (path, Range header);
    `fail` maps a path to a status to answer, `truncate` to a byte count after which the
    connection is dropped (once), `replace` to (body, Content-Type, (header, value)...) to send with status 200 in
    place of the file, `content_range_start` to a wrong first byte to announce for a Range
    request; `delay` is the seconds to wait before each answer."""

    def __init__(self, directory):
        server = self
        self.requests, self.fail, self.truncate, self.replace, self.content_range_start = [], {}, {}, {}, {}
        self.delay = 0.0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                time.sleep(server.delay)
                if self.path in server.fail:
                    self.send_error(server.fail[self.path])
                    return
                if self.path in server.replace:
                    body, content_type, *headers = server.replace[self.path]
                    self.send_response(200)
                    self.send_header("Content-Type", content_type)
                    for name, value in headers:
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                path = os.path.join(directory, self.path.lstrip("/"))
                if not os.path.isfile(path):
                    self.send_error(404)
                    return
                data = open(path, "rb").read()
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    shown = server.content_range_start.pop(self.path, start)
                    self.send_header("Content-Range", f"bytes {shown}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                cut = server.truncate.pop(self.path, None)
                self.wfile.write(data[start:cut] if cut is not None else data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMOJAX_CACHE", str(tmp_path / "cache"))
    files = tmp_path / "served"
    shutil.copytree(MODEL, files)
    server = Server(str(files))
    yield server, files
    server.httpd.shutdown()


def cached_files() -> list[str]:
    """The cache's files, but the lock files downloads take turns by."""
    return sorted(f for _, _, names in os.walk(os.environ["ELMOJAX_CACHE"]) for f in names if not f.endswith(".lock"))


HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please sign in</body></html>\n"


def test_a_download_then_a_cache_hit(served):
    server, files = served
    url = f"{server.url}/lm_weights.hdf5"
    path = remote.local_path(url)
    assert path.startswith(os.environ["ELMOJAX_CACHE"]) and path.endswith(os.sep + "lm_weights.hdf5")
    assert open(path, "rb").read() == (files / "lm_weights.hdf5").read_bytes()
    assert remote.local_path(url) == path and len(server.requests) == 1  # from the cache
    assert remote.local_path(str(files / "options.json")) == str(files / "options.json")  # local: as it is


def test_an_interrupted_download_resumes_where_it_stopped(served):
    server, files = served
    url = f"{server.url}/lm_weights.hdf5"
    size = (files / "lm_weights.hdf5").stat().st_size
    server.truncate["/lm_weights.hdf5"] = size // 3
    with pytest.raises(ValueError, match=rf"stopped at {size // 3} of {size} bytes; run again to resume"):
        remote.local_path(url)
    assert not os.path.exists(remote.cached_file(url))  # never a partial file under the final name
    assert os.path.getsize(remote.cached_file(url) + ".part") == size // 3
    path = remote.local_path(url)
    assert server.requests[-1] == ("/lm_weights.hdf5", f"bytes={size // 3}-")
    assert open(path, "rb").read() == (files / "lm_weights.hdf5").read_bytes()


def test_server_errors_and_missing_files_are_one_line(served):
    server, _ = served
    server.fail["/options.json"] = 500
    with pytest.raises(ValueError, match=r"/options.json: the server answered 500"):
        remote.local_path(f"{server.url}/options.json")
    with pytest.raises(ValueError, match=r"/nothing.hdf5: the server answered 404"):
        remote.local_path(f"{server.url}/nothing.hdf5")
    assert not cached_files()  # no file, nor part


def test_a_model_by_url_embeds_as_from_files(served):
    server, _ = served
    by_url = BidirectionalLanguageModel(f"{server.url}/options.json", f"{server.url}/lm_weights.hdf5")
    local = BidirectionalLanguageModel(os.path.join(MODEL, "options.json"), os.path.join(MODEL, "lm_weights.hdf5"))
    ids = Batcher(os.path.join(MODEL, "vocab_test.txt"), 50).batch_sentences([["Hello", "there"]])
    np.testing.assert_array_equal(by_url(ids)["lm_embeddings"], local(ids)["lm_embeddings"])


def test_pretrained_names_the_published_models():
    options, weights = pretrained("small")
    assert options.endswith("2x1024_128_2048cnn_1xhighway/elmo_2x1024_128_2048cnn_1xhighway_options.json")
    assert weights.endswith("elmo_2x1024_128_2048cnn_1xhighway_weights.hdf5")
    assert pretrained("pubmed")[1].endswith("contributed/pubmed/elmo_2x4096_512_2048cnn_2xhighway_weights_PubMed_only.hdf5")
    with pytest.raises(ValueError, match="no pretrained model 'large'; there are small, medium, original"):
        pretrained("large")


@pytest.mark.parametrize("published", [False, True])
def test_a_trained_model_by_url_brings_its_files_along(tmp_path, monkeypatch, published):
    """--model / --config.init_from take an export's URL (or AllenNLP's published names): the
    options, softmax and vocabulary beside it on the server come along into the cache."""
    import jax
    from elmojax.train import trained_models
    monkeypatch.setenv("ELMOJAX_CACHE", str(tmp_path / "cache"))
    checkpoint = os.path.join(ROOT, "tests", "fixtures", "bilm_tf_checkpoint")
    export = trained_models.export(checkpoint, str(tmp_path / "export" / "weights.hdf5"))
    served = tmp_path / "served"
    served.mkdir()
    names = (["elmo_tiny_weights.hdf5", "elmo_tiny_options.json", "elmo_tiny_softmax_weights.hdf5", "vocab.txt"]
             if published else ["weights.hdf5", "options.json", "weights_softmax.hdf5", "vocab.txt"])
    for name, source in zip(names, [export.weights, export.options, export.softmax, export.vocab]):
        shutil.copy(source, served / name)
    server = Server(str(served))
    try:
        by_url = trained_models.load_trained(f"{server.url}/{names[0]}")
    finally:
        server.httpd.shutdown()
    local = trained_models.load_trained(export.weights)
    jax.tree.map(np.testing.assert_array_equal, by_url.params, local.params)
    assert by_url.vocab == local.vocab and by_url.options == local.options


def one_line_naming(error, url) -> None:
    message = str(error.value)
    assert "\n" not in message and url in message and remote.cached_file(url) in message, message


@pytest.mark.parametrize("name, body, content_type, says", [
    ("vocab_test.txt", gzip.compress(b"<S>\n</S>\n", mtime=0), ("text/plain", ("Content-Encoding", "gzip")),
     "encoded \\(Content-Encoding gzip\\)"),
    ("lm_weights.hdf5", HTML, "text/html; charset=utf-8", r"HTML page \(Content-Type text/html\)"),
    ("lm_weights.hdf5", HTML, "application/octet-stream", "HTML page"),       # sniffed from the body
    ("lm_weights.hdf5", b"\0" * 4096, "application/octet-stream", "not an HDF5 file"),
    ("lm_weights.hdf5", open(os.path.join(MODEL, "lm_weights.hdf5"), "rb").read()[:5000], "application/octet-stream",
     "does not open as HDF5"),                                                # cut short, no Content-Length to tell
    ("options.json", b'{"lstm": {"dim": 16', "application/json", "not UTF-8 JSON"),
    ("options.json", b'{"a": "\xff"}', "application/json", "not UTF-8 JSON"),
    ("vocab_test.txt", b"<S>\n</S>\nd\xe9j\xe0\n", "text/plain", "not UTF-8 text"),
    ("vocab_test.txt", HTML, "text/plain", "HTML page"),
])
def test_a_response_that_is_not_the_file_is_never_cached(served, name, body, content_type, says):
    """A 200 answer that is not what was asked for: an error naming the URL and the cache path,
    no file under the final name and no part to resume from; once the server sends the file,
    it comes."""
    server, files = served
    url = f"{server.url}/{name}"
    server.replace[f"/{name}"] = (body, *content_type) if isinstance(content_type, tuple) else (body, content_type)
    with pytest.raises(ValueError, match=says) as error:
        remote.local_path(url)
    one_line_naming(error, url)
    assert not cached_files()
    del server.replace[f"/{name}"]
    assert open(remote.local_path(url), "rb").read() == (files / name).read_bytes()


def test_a_wrong_part_is_not_resumed_from(served):
    """A part left by an older version (an HTML page's start) is resumed, then fails the check:
    removed, and the next run fetches the whole file."""
    server, files = served
    url = f"{server.url}/lm_weights.hdf5"
    os.makedirs(os.path.dirname(remote.cached_file(url)))
    with open(remote.cached_file(url) + ".part", "wb") as f:
        f.write(HTML)
    with pytest.raises(ValueError, match="the downloaded file is an HTML page") as error:
        remote.local_path(url)
    one_line_naming(error, url)
    assert server.requests[-1][1] == f"bytes={len(HTML)}-" and not cached_files()
    assert open(remote.local_path(url), "rb").read() == (files / "lm_weights.hdf5").read_bytes()
    assert server.requests[-1][1] is None


def test_a_resumed_answer_from_elsewhere_in_the_file_starts_again(served):
    server, files = served
    url = f"{server.url}/lm_weights.hdf5"
    size = (files / "lm_weights.hdf5").stat().st_size
    server.truncate["/lm_weights.hdf5"] = size // 2
    with pytest.raises(ValueError, match="run again to resume"):
        remote.local_path(url)
    server.content_range_start["/lm_weights.hdf5"] = 0  # says it sends from byte 0: not what was asked
    assert open(remote.local_path(url), "rb").read() == (files / "lm_weights.hdf5").read_bytes()
    assert [r for _, r in server.requests] == [None, f"bytes={size // 2}-", None]


def test_a_published_file_of_another_size_or_hash_is_refused(served, monkeypatch):
    server, files = served
    url = f"{server.url}/lm_weights.hdf5"
    data = (files / "lm_weights.hdf5").read_bytes()
    monkeypatch.setitem(remote.KNOWN_FILES, url, (len(data) + 1, None))
    with pytest.raises(ValueError, match=rf"the server announced {len(data)} bytes; the published file has "
                                         rf"{len(data) + 1}") as error:
        remote.local_path(url)
    one_line_naming(error, url)
    wrong = "0" * 64
    monkeypatch.setitem(remote.KNOWN_FILES, url, (len(data), wrong))
    with pytest.raises(ValueError, match=rf"has sha256 {hashlib.sha256(data).hexdigest()}; the published "
                                         rf"file's is {wrong}") as error:
        remote.local_path(url)
    one_line_naming(error, url)
    assert not cached_files()


def test_a_published_file_is_hashed_once(served, monkeypatch):
    """The right hash: cached, and taken from the cache afterwards without hashing it again."""
    server, files = served
    url = f"{server.url}/lm_weights.hdf5"
    data = (files / "lm_weights.hdf5").read_bytes()
    monkeypatch.setitem(remote.KNOWN_FILES, url, (len(data), hashlib.sha256(data).hexdigest()))
    hashed = []
    sha256 = remote._sha256
    monkeypatch.setattr(remote, "_sha256", lambda path: hashed.append(path) or sha256(path))
    path = remote.local_path(url)
    assert open(path, "rb").read() == data and hashed == [path + ".part"]
    assert remote.local_path(url) == path and hashed == [path + ".part"] and len(server.requests) == 1


def test_a_published_url_is_known_by_the_buckets_other_names():
    options, weights = pretrained("original")
    assert remote.known_file(weights) == remote.KNOWN_FILES[weights]
    other = weights.replace("https://s3-us-west-2.amazonaws.com/allennlp/", "https://allennlp.s3.amazonaws.com/")
    assert remote.known_file(other) == remote.KNOWN_FILES[weights]
    assert remote.known_file(options)[0] == 336
    for size, sha256 in remote.KNOWN_FILES.values():
        assert size > 0 and (sha256 is None or len(bytes.fromhex(sha256)) == 32)


@pytest.mark.parametrize("left", [HTML, b"\0" * 64])
def test_a_wrong_file_left_in_the_cache_is_fetched_again(served, capsys, left):
    """A wrong file under the final name (an older version cached HTML pages): said on stderr,
    naming the URL and the cache path, and fetched again."""
    server, files = served
    url = f"{server.url}/lm_weights.hdf5"
    target = remote.cached_file(url)
    os.makedirs(os.path.dirname(target))
    with open(target, "wb") as f:
        f.write(left)
    assert remote.local_path(url) == target
    assert open(target, "rb").read() == (files / "lm_weights.hdf5").read_bytes()
    err = capsys.readouterr().err
    assert f"{url}: the cached file {target} is" in err and "fetching it again" in err
    remote.local_path(url)
    assert len(server.requests) == 1 and "fetching it again" not in capsys.readouterr().err


def test_a_missing_neighbour_served_as_an_html_page_is_passed_over(served):
    server, files = served
    server.replace["/options.json"] = (HTML, "text/html")
    path = remote.local_path_beside(f"{server.url}/lm_weights.hdf5", ["options.json", "vocab_test.txt"])
    assert cached_files() == ["lm_weights.hdf5", "vocab_test.txt"] and path.endswith("lm_weights.hdf5")


def test_processes_fetching_one_file_take_turns(served):
    """Two fetches of one URL at once: one download, the other waits for it and takes its file."""
    server, files = served
    server.delay = 0.3
    url = f"{server.url}/lm_weights.hdf5"
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(remote.local_path(url))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(paths) == 2 and len(set(paths)) == 1 and len(server.requests) == 1
    assert open(paths[0], "rb").read() == (files / "lm_weights.hdf5").read_bytes()


def test_a_large_download_draws_a_bar_on_a_terminal_only(served, monkeypatch, capfd):
    server, files = served
    (files / "big.bin").write_bytes(os.urandom(11 << 20))  # past the size that gets a bar
    remote.local_path(f"{server.url}/big.bin")
    assert capfd.readouterr().err == ""  # stderr is not a terminal here

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    (files / "big2.bin").write_bytes(os.urandom(11 << 20))
    remote.local_path(f"{server.url}/big2.bin")
    shown = terminal.getvalue()
    assert "big2.bin: 100%" in shown and "11.5M/11.5M" in shown and "B/s" in shown
