"""Files by URL and models by name.

`local_path(path_or_url)` returns a local path as it is, and fetches an http(s) URL once into
the cache (`~/.cache/elmojax`, or the directory `ELMOJAX_CACHE` names): streamed into
`NAME.part` beside its final name, resumed from there after an interruption (an HTTP Range
request; a server that ignores it sends the whole file again), then checked before it is
renamed to its final name, so that the cache never holds a partial or wrong file under it:

- its size against what the server announced (and, for AllenNLP's published files, against
  their known size);
- that it is what its name says: never an HTML page (a server's error or login page sent with
  status 200) for a file not named .html; a .hdf5 with HDF5's signature, a .json that parses as
  UTF-8 JSON, a .txt that is UTF-8 text;
- for the published files whose sha256 is known (KNOWN_FILES), that sha256, once, after the
  download (a cached file is not hashed again).

A response that fails a check is an error naming the URL and the cache path, and its `.part`
is removed (a wrong body is never resumed from). A file already in the cache is checked again
(all but the hash: its signature, its size where known) each time it is taken: one that fails
(left by an older version of elmojax, or changed by hand) is reported on stderr, removed and
fetched again. Downloads of one file by several processes at once take turns (a lock file,
NAME.lock, beside it). A large file draws a progress bar on stderr where it is a terminal.

`pretrained(name)` gives the (options, weights) URLs of the models AllenNLP published;
`model_files(model)` a biLM's local files from a published name, a weight file's path or its URL
(options.json and the softmax found beside it).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.request
from typing import NamedTuple, Optional

from elmojax.formats import tf_checkpoint
from elmojax.formats.progress import Progress

_BASE = "https://s3-us-west-2.amazonaws.com/allennlp/models/elmo"
PRETRAINED = {
    "small": f"{_BASE}/2x1024_128_2048cnn_1xhighway/elmo_2x1024_128_2048cnn_1xhighway",
    "medium": f"{_BASE}/2x2048_256_2048cnn_1xhighway/elmo_2x2048_256_2048cnn_1xhighway",
    "original": f"{_BASE}/2x4096_512_2048cnn_2xhighway/elmo_2x4096_512_2048cnn_2xhighway",
    "original_5.5B": f"{_BASE}/2x4096_512_2048cnn_2xhighway_5.5B/elmo_2x4096_512_2048cnn_2xhighway_5.5B",
}
_PUBMED = f"{_BASE}/contributed/pubmed/elmo_2x4096_512_2048cnn_2xhighway"
_CHUNK = 1 << 20

# What is known of AllenNLP's published files, by URL: (size in bytes, sha256 or None). Only
# values found in a named public source and agreeing with a second one are recorded; a file not
# listed is checked by what the server announces and by its kind only. Tests override entries.
KNOWN_FILES: dict[str, tuple[int, Optional[str]]] = {
    # sha256 and size: the Git LFS pointer of this very file (same name), in the Hugging Face
    # repository lysandre/elmo, commit e96602c873f90782c21402b8d8d1ff1327318678 ("Contribute
    # ELMO"); the size agrees with two recorded downloads of the URL by AllenNLP's cached_path
    # (tqdm's "374434792/374434792" in public notebooks).
    f"{PRETRAINED['original']}_weights.hdf5":
        (374434792, "a6b92b9ccbb13fe489faacd2221c795d4bebe84b75f8aded9d85ea464fa5c994"),
    # size only: the same two recorded downloads ("336/336") and the Hugging Face mirror's
    # options.json (336 bytes); no published hash found.
    f"{PRETRAINED['original']}_options.json": (336, None),
}

# Other addresses of the same S3 bucket: a published file named through one of them is known too.
_BUCKET_ALIASES = ("https://allennlp.s3.amazonaws.com/models/elmo", "https://s3.us-west-2.amazonaws.com/allennlp/models/elmo",
                   "https://s3.amazonaws.com/allennlp/models/elmo")


def pretrained(name: str) -> tuple[str, str]:
    """(options URL, weights URL) of a model AllenNLP published: small, medium, original,
    original_5.5B or pubmed. Any function that takes an options or weight file takes them."""
    if name == "pubmed":
        return f"{_PUBMED}_options.json", f"{_PUBMED}_weights_PubMed_only.hdf5"
    if name not in PRETRAINED:
        raise ValueError(f"no pretrained model {name!r}; there are {', '.join([*PRETRAINED, 'pubmed'])}")
    return f"{PRETRAINED[name]}_options.json", f"{PRETRAINED[name]}_weights.hdf5"


def published_names() -> list[str]:
    return [*PRETRAINED, "pubmed"]


def is_published(model) -> bool:
    """Whether `model` is a published model's name (and no file of that name is there)."""
    return isinstance(model, str) and model in published_names() and not os.path.exists(model)


class ModelFiles(NamedTuple):
    """A biLM's files as local paths: options.json, the weights (hdf5, or a bilm-tf training
    checkpoint), and the softmax scoring needs (None: none found, or not looked for)."""
    options: str
    weights: str
    softmax: Optional[str]


def names_beside(weight_file: str) -> tuple[list[str], list[str]]:
    """The names the options and the softmax of a weight file X.hdf5 go by beside it: an
    export's (options.json, X_softmax.hdf5, so elmo_softmax.hdf5 for elmo.hdf5), then AllenNLP's
    published ones for X = Y_weights (Y_options.json, Y_softmax_weights.hdf5)."""
    stem = os.path.splitext(weight_file.split("?")[0].rsplit("/", 1)[-1])[0]
    options, softmax = ["options.json"], [f"{stem}_softmax.hdf5"]
    if stem.endswith("_weights"):
        options.append(f"{stem[:-len('_weights')]}_options.json")
        softmax.append(f"{stem[:-len('_weights')]}_softmax_weights.hdf5")
    return options, softmax


def _directory(path_or_url: str) -> str:
    if is_url(path_or_url):
        return path_or_url.split("?")[0].rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path_or_url))


def _fetch_beside(url: str, progress: bool) -> Optional[str]:
    """A file beside a model on a server, in the cache; None where the server has none (404 or
    403, as S3 answers for a missing key, or an HTML page in its place)."""
    try:
        return local_path(url, progress)
    except NotTheFile as e:
        if not e.html:
            raise
    except ValueError as e:
        if not re.search(r"answered 40[34]\b", str(e)):
            raise
    return None


def _first_beside(weight_file: str, names: list[str], fetch: bool, progress: bool) -> Optional[str]:
    """The first of `names` beside the weights (a path, or a URL: then its file in the cache,
    fetched if `fetch`)."""
    directory = _directory(weight_file)
    for name in names:
        if not is_url(weight_file):
            if os.path.isfile(os.path.join(directory, name)):
                return os.path.join(directory, name)
        elif os.path.isfile(cached_file(f"{directory}/{name}")) or fetch:
            found = _fetch_beside(f"{directory}/{name}", progress)
            if found is not None:
                return found
    return None


def model_source(model: str) -> tuple[str, Optional[str]]:
    """(weights path or URL, options URL where a published name says it) of a model."""
    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise TypeError(f"a model is a published name ({', '.join(published_names())}), a weight file or its "
                        f"URL; got {model!r:.60}")
    model = os.fspath(model)
    if is_published(model):
        options, weights = pretrained(model)
        return weights, options
    if not is_url(model) and not os.path.exists(model):
        raise ValueError(f"{model}: no such weight file, and not a published model "
                         f"({', '.join(published_names())}) nor an http(s) URL")
    return model, None


def softmax_beside(model: str, fetch: bool = True, progress: bool = True) -> Optional[str]:
    """The softmax file that goes with a model (model_files' model): a bilm-tf checkpoint's own,
    or one of names_beside's beside the weights (from a server: fetched with the vocabulary
    beside it, if `fetch`, which its rows may need); None where there is none."""
    weights, _ = model_source(model)
    if not is_url(weights) and tf_checkpoint.is_checkpoint(weights):
        return weights
    found = _first_beside(weights, names_beside(weights)[1], fetch, progress)
    if found is not None and is_url(weights) and fetch:
        _fetch_beside(f"{_directory(weights)}/vocab.txt", progress)
    return found


def model_files(model: str, options_file: Optional[str] = None, softmax_file: Optional[str] = None,
                need_softmax: bool = False, progress: bool = True) -> ModelFiles:
    """A biLM's local files from `model`: a published name (pretrained), a weight file's path
    (an hdf5 file or a bilm-tf training checkpoint) or an http(s) URL (fetched into the cache).
    options.json is `options_file`, else found beside the weights (names_beside; a checkpoint's
    directory). The softmax is `softmax_file`, else the one beside (softmax_beside), fetched
    from a server only if `need_softmax`, where its absence is an error."""
    weights, options = model_source(model)
    if options_file is not None:
        options = options_file
    elif options is None:
        if not is_url(weights) and tf_checkpoint.is_checkpoint(weights):
            options = os.path.join(os.path.dirname(tf_checkpoint.resolve_prefix(weights)) or ".", "options.json")
        else:
            options = _first_beside(weights, names_beside(weights)[0], True, progress)
        if options is None:
            raise ValueError(f"{model}: no {' or '.join(names_beside(weights)[0])} beside it; give the options "
                             f"file (options_file)")
    if softmax_file is None:
        softmax_file = softmax_beside(model, need_softmax, progress)
        if softmax_file is None and need_softmax:
            raise ValueError(f"{model}: no softmax file ({' or '.join(names_beside(weights)[1])}) beside it; "
                             f"give it (softmax_file)")
    return ModelFiles(local_path(options, progress), local_path(weights, progress),
                      None if softmax_file is None else local_path(softmax_file, progress))


def model_paths(options_file: Optional[str], weight_file: str, softmax_file: Optional[str] = None,
                need_softmax: bool = False, progress: bool = True) -> ModelFiles:
    """The files of the (options_file, weight_file) pair that bilm-tf's and AllenNLP's functions
    take, where weight_file may also be a published name and options_file None (found beside
    it): model_files then; otherwise the files as given (a URL fetched later, where it is read)."""
    if options_file is None or is_published(weight_file) or (need_softmax and softmax_file is None):
        return model_files(weight_file, options_file, softmax_file, need_softmax, progress)
    return ModelFiles(options_file, weight_file, softmax_file)


def is_url(path) -> bool:
    return isinstance(path, str) and path.startswith(("http://", "https://"))


def cache_dir() -> str:
    return os.environ.get("ELMOJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "elmojax")


def cached_file(url: str) -> str:
    """Where the cache keeps a URL's file: under its own name, in a directory for the URL's
    directory (so files published side by side stay side by side, as a weight file's options
    and softmax files are looked for)."""
    url = url.split("?")[0]
    directory, name = url.rsplit("/", 1) if "/" in url else (url, "")
    return os.path.join(cache_dir(), hashlib.sha256(directory.encode()).hexdigest()[:16], name or "file")


def known_file(url: str) -> Optional[tuple[int, Optional[str]]]:
    """(size, sha256 or None) of a published file, or None when nothing is known of it."""
    url = url.split("?")[0]
    if url in KNOWN_FILES:
        return KNOWN_FILES[url]
    secure = "https://" + url[len("http://"):] if url.startswith("http://") else url
    for alias in (_BASE, *_BUCKET_ALIASES):
        if secure.startswith(alias + "/"):
            return KNOWN_FILES.get(_BASE + secure[len(alias):])
    return None


class NotTheFile(ValueError):
    """A response, or a cached file, that is not the file its URL names (an HTML page, another
    kind of file, a wrong size or hash)."""

    def __init__(self, message: str, html: bool = False):
        super().__init__(message)
        self.html = html


def local_path_beside(weight_url: str, names: list[str], progress: bool = True) -> str:
    """A weight file's local path (local_path), after fetching those of `names` that exist
    beside it on the server into the cache beside it (absent ones are passed over: a 404, or an
    HTML page in place of the file, as servers answer for a missing file)."""
    path = local_path(weight_url, progress)
    if is_url(weight_url):
        directory = weight_url.split("?")[0].rsplit("/", 1)[0]
        for name in names:
            try:
                local_path(f"{directory}/{name}", progress)
            except NotTheFile as e:
                if not e.html:
                    raise
            except ValueError as e:
                if "answered 404" not in str(e):
                    raise
    return path


def local_path(path_or_url, progress: bool = True):
    """A local path as it is; an http(s) URL's file in the cache, fetched if it is not there
    (or if what is there fails its check: then fetched again)."""
    if not is_url(path_or_url):
        return path_or_url
    url, target = path_or_url, cached_file(path_or_url)
    if os.path.isfile(target) and _cached_ok(url, target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _lock(target):  # another process may be fetching it: wait for it, then take its file
        if not (os.path.isfile(target) and _cached_ok(url, target)):
            _fetch(url, target, progress)
    return target


def _cached_ok(url: str, target: str) -> bool:
    """Whether a cached file passes its checks (all but the hash); one that does not is reported
    and removed, to be fetched again."""
    problem = check_file(url, target, hash_it=False)
    if problem is None:
        return True
    sys.stderr.write(f"warning: {url}: the cached file {target} {problem}; removing it and fetching it again\n")
    with contextlib.suppress(FileNotFoundError):
        os.remove(target)
    return False


@contextlib.contextmanager
def _lock(target: str):
    """An exclusive lock on NAME.lock beside the file, where the file system has locks."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(target + ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks
            pass
        yield


_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")


def _looks_like_html(head: bytes) -> bool:
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(_HTML_STARTS)


def _is_html_name(url: str) -> bool:
    return url.split("?")[0].lower().endswith((".html", ".htm"))


def _kind(url: str) -> str:
    return os.path.splitext(url.split("?")[0].rsplit("/", 1)[-1])[1].lower()


def _hdf5_signature_at(path: str, size: int) -> bool:
    """HDF5's 8-byte signature at offset 0, 512, 1024, 2048, ... (where a user block ends)."""
    with open(path, "rb") as f:
        offset = 0
        while offset + 8 <= size:
            f.seek(offset)
            if f.read(8) == b"\x89HDF\r\n\x1a\n":
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def _hdf5_open_problem(path: str) -> Optional[str]:
    """Whether HDF5 opens the file (it refuses one cut short: its superblock records the end)."""
    import h5py

    try:
        with h5py.File(path, "r"):
            return None
    except (OSError, ValueError) as e:
        return f"does not open as HDF5 ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


def _utf8_problem(path: str) -> Optional[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    with open(path, "rb") as f:
        try:
            while True:
                chunk = f.read(_CHUNK)
                decoder.decode(chunk, final=not chunk)
                if not chunk:
                    return None
                done += len(chunk)
        except UnicodeDecodeError as e:
            return f"is not UTF-8 text ({e.reason} at byte {done + e.start})"


def check_file(url: str, path: str, hash_it: bool = True) -> Optional[str]:
    """What is wrong with `path` as the file `url` names (None when nothing is): an HTML page,
    a size or (hash_it) sha256 other than the published file's, a .hdf5 without HDF5's
    signature, a .json that is not UTF-8 JSON, a .txt that is not UTF-8."""
    size = os.path.getsize(path)
    known = known_file(url)
    with open(path, "rb") as f:
        head = f.read(1024)
    if not _is_html_name(url) and _looks_like_html(head):
        return "is an HTML page, not the file"
    if known is not None and size != known[0]:
        return f"has {size} bytes; the published file has {known[0]}"
    kind = _kind(url)
    if kind in (".hdf5", ".h5"):
        if not _hdf5_signature_at(path, size):
            return "is not an HDF5 file (no HDF5 signature)"
        problem = _hdf5_open_problem(path)
        if problem:
            return problem
    if kind == ".json":
        with open(path, "rb") as f:
            raw = f.read()
        try:
            json.loads(raw.decode("utf-8-sig"))  # (a byte-order mark is read past, as files.read_json does)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"is not UTF-8 JSON ({e})"
    if kind == ".txt":
        problem = _utf8_problem(path)
        if problem:
            return problem
    if hash_it and known is not None and known[1] is not None:
        digest = _sha256(path)
        if digest != known[1]:
            return f"has sha256 {digest}; the published file's is {known[1]}"
    return None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _content_range_start(value: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """(first byte, total size) of a Content-Range header, None for what it does not say."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    return int(match.group(1)), (int(match.group(2)) if match.group(2) != "*" else None)


def _discard(partial: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial)


class _Download:
    """A file fetched from `url` into `target`, by way of `target`.part."""

    def __init__(self, url: str, target: str):
        self.url, self.target, self.partial = url, target, target + ".part"

    def wrong(self, what: str, html: bool = False) -> NotTheFile:
        """The error for what the server sent that is not the file; the part is discarded."""
        _discard(self.partial)
        return NotTheFile(f"{self.url}: {what}; discarded, nothing cached at {self.target}", html)


def _fetch(url: str, target: str, progress: bool, retried: bool = False) -> None:
    download = _Download(url, target)
    partial = download.partial
    have = os.path.getsize(partial) if os.path.isfile(partial) else 0
    response = _request(url, have)
    if response is None:  # nothing left to send: start again
        _discard(partial)
        return _fetch(url, target, progress)
    known = known_file(url)
    with response:
        _check_headers(download, response)
        resumed = response.status == 206
        length = response.headers.get("Content-Length")
        if resumed:
            start, total = _content_range_start(response.headers.get("Content-Range"))
            if start != have:  # not the rest of the part we have: start again, once
                _discard(partial)
                if retried:
                    raise download.wrong(f"the server answered a request for bytes {have}- with "
                                         f"Content-Range {response.headers.get('Content-Range')!r}")
                return _fetch(url, target, progress, retried=True)
            if total is None and length is not None and length.isdigit():
                total = have + int(length)
        else:
            have = 0
            total = int(length) if length is not None and length.isdigit() else None
        if known is not None and total is not None and total != known[0]:
            raise download.wrong(f"the server announced {total} bytes; the published file has {known[0]}")
        shown = Progress(os.path.basename(url), total, progress and (total is None or total >= 10 * _CHUNK), 1e6,
                         " MB")
        got = _receive(download, response, resumed, have, total, shown)
    shown.done(got)
    if total is not None and got < total:
        raise ValueError(f"{url}: the download stopped at {got} of {total} bytes; run again to resume")
    if total is not None and got > total:
        raise download.wrong(f"the server sent {got} bytes, more than the {total} it announced")
    problem = check_file(url, partial)
    if problem is not None:
        html = problem.startswith("is an HTML page")
        raise download.wrong(f"the downloaded file {problem}", html=html)
    os.replace(partial, target)


def _request(url: str, have: int):
    """The server's response to a request for the file from byte `have` on; None if it has no
    bytes from there (416)."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        return urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            return None
        raise ValueError(f"{url}: the server answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise ValueError(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from None


def _check_headers(download: _Download, response) -> None:
    """Refuses an HTML page instead of the file, and a file sent encoded."""
    content_type = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type in ("text/html", "application/xhtml+xml") and not _is_html_name(download.url):
        raise download.wrong(f"the server sent an HTML page (Content-Type {content_type}), not the file", html=True)
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise download.wrong(f"the server sent the file encoded (Content-Encoding {encoding}), not as it is")


def _receive(download: _Download, response, resumed: bool, have: int, total: Optional[int],
             shown: Progress) -> int:
    """Writes the response's bytes to the part (after its `have` bytes when `resumed`); the
    part's size then. A connection dropped with the size known leaves the part (to resume)."""
    url, got = download.url, have
    with open(download.partial, "ab" if resumed else "wb") as f:
        first = not resumed
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, ValueError, http.client.HTTPException) as e:  # dropped: the part stays
                if total is None:
                    raise ValueError(f"{url}: the download broke off at {got} bytes ({e}); run again to "
                                     f"resume") from None
                return got  # (the size check says so)
            if first and chunk:
                first = False
                if not _is_html_name(url) and _looks_like_html(chunk[:1024]):
                    f.close()
                    raise download.wrong("the server sent an HTML page, not the file", html=True)
            if not chunk:
                return got
            f.write(chunk)
            got += len(chunk)
            shown.update(got)


