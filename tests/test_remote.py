"""Files by URL (elmojax.remote), served by a local http.server on 127.0.0.1 (no network): a
download, a cache hit, an interrupted download resumed, a server error, a truncated body, a
404; and a model loaded by URL."""

import http.server
import os
import shutil
import threading

import numpy as np
import pytest

from elmojax import BidirectionalLanguageModel, pretrained, remote
from elmojax.vocab import Batcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests", "fixtures", "model")


class Server:
    """Serves a directory, honouring Range requests; `requests` logs (path, Range header);
    `fail` maps a path to a status to answer, `truncate` to a byte count after which the
    connection is dropped (once)."""

    def __init__(self, directory):
        server = self
        self.requests, self.fail, self.truncate = [], {}, {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                if self.path in server.fail:
                    self.send_error(server.fail[self.path])
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
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                cut = server.truncate.pop(self.path, None)
                self.wfile.write(data[start:cut] if cut is not None else data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMOJAX_CACHE", str(tmp_path / "cache"))
    files = tmp_path / "served"
    shutil.copytree(MODEL, files)
    server = Server(str(files))
    yield server, files
    server.httpd.shutdown()


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
    assert not [f for _, _, names in os.walk(os.environ["ELMOJAX_CACHE"]) for f in names]  # no file, nor part


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
    from elmojax import model_files
    monkeypatch.setenv("ELMOJAX_CACHE", str(tmp_path / "cache"))
    checkpoint = os.path.join(ROOT, "tests", "fixtures", "bilm_tf_checkpoint")
    export = model_files.export(checkpoint, str(tmp_path / "export" / "weights.hdf5"))
    served = tmp_path / "served"
    served.mkdir()
    names = (["elmo_tiny_weights.hdf5", "elmo_tiny_options.json", "elmo_tiny_softmax_weights.hdf5", "vocab.txt"]
             if published else ["weights.hdf5", "options.json", "weights_softmax.hdf5", "vocab.txt"])
    for name, source in zip(names, [export["weights"], export["options"], export["softmax"], export["vocab"]]):
        shutil.copy(source, served / name)
    server = Server(str(served))
    try:
        by_url = model_files.load_trained(f"{server.url}/{names[0]}")
    finally:
        server.httpd.shutdown()
    local = model_files.load_trained(export["weights"])
    jax.tree.map(np.testing.assert_array_equal, by_url[0], local[0])
    assert by_url[2] == local[2] and by_url[1] == local[1]
