"""Files by URL and models by name.

`local_path(path_or_url)` returns a local path as it is, and fetches an http(s) URL once into
the cache (`~/.cache/elmojax`, or the directory `ELMOJAX_CACHE` names): streamed into
`NAME.part` beside its final name, resumed from there after an interruption (an HTTP Range
request; a server that ignores it sends the whole file again), its size checked against what
the server announced, then renamed, so the cache never holds a partial file under the final
name. A progress line on stderr shows MB and MB/s for large files.

`pretrained(name)` gives the (options, weights) URLs of the models AllenNLP published.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request

_BASE = "https://s3-us-west-2.amazonaws.com/allennlp/models/elmo"
PRETRAINED = {
    "small": f"{_BASE}/2x1024_128_2048cnn_1xhighway/elmo_2x1024_128_2048cnn_1xhighway",
    "medium": f"{_BASE}/2x2048_256_2048cnn_1xhighway/elmo_2x2048_256_2048cnn_1xhighway",
    "original": f"{_BASE}/2x4096_512_2048cnn_2xhighway/elmo_2x4096_512_2048cnn_2xhighway",
    "original_5.5B": f"{_BASE}/2x4096_512_2048cnn_2xhighway_5.5B/elmo_2x4096_512_2048cnn_2xhighway_5.5B",
}
_PUBMED = f"{_BASE}/contributed/pubmed/elmo_2x4096_512_2048cnn_2xhighway"
_CHUNK = 1 << 20


def pretrained(name: str) -> tuple[str, str]:
    """(options URL, weights URL) of a model AllenNLP published: small, medium, original,
    original_5.5B or pubmed. Any function that takes an options or weight file takes them."""
    if name == "pubmed":
        return f"{_PUBMED}_options.json", f"{_PUBMED}_weights_PubMed_only.hdf5"
    if name not in PRETRAINED:
        raise ValueError(f"no pretrained model {name!r}; there are {', '.join([*PRETRAINED, 'pubmed'])}")
    return f"{PRETRAINED[name]}_options.json", f"{PRETRAINED[name]}_weights.hdf5"


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


def local_path_beside(weight_url: str, names: list[str], progress: bool = True) -> str:
    """A weight file's local path (local_path), after fetching those of `names` that exist
    beside it on the server into the cache beside it (absent ones are passed over)."""
    path = local_path(weight_url, progress)
    if is_url(weight_url):
        directory = weight_url.split("?")[0].rsplit("/", 1)[0]
        for name in names:
            try:
                local_path(f"{directory}/{name}", progress)
            except ValueError as e:
                if "answered 404" not in str(e):
                    raise
    return path


def local_path(path_or_url, progress: bool = True):
    """A local path as it is; an http(s) URL's file in the cache, fetched if it is not there."""
    if not is_url(path_or_url):
        return path_or_url
    target = cached_file(path_or_url)
    if not os.path.isfile(target):
        _fetch(path_or_url, target, progress)
    return target


def _fetch(url: str, target: str, progress: bool) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = target + ".part"
    have = os.path.getsize(partial) if os.path.isfile(partial) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: start again
            os.remove(partial)
            return _fetch(url, target, progress)
        raise ValueError(f"{url}: the server answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ValueError(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from None
    with response:
        resumed = response.status == 206
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        shown = _Progress(url, total, progress)
        got = have
        with open(partial, "ab" if resumed else "wb") as f:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, ValueError, http.client.HTTPException) as e:  # dropped: the part stays
                    if total is None:
                        raise ValueError(f"{url}: the download broke off at {got} bytes ({e}); run again to "
                                         f"resume") from None
                    break  # (the size check below says so)
                if not chunk:
                    break
                f.write(chunk)
                got += len(chunk)
                shown.update(got)
    shown.done(got)
    if total is not None and got != total:
        raise ValueError(f"{url}: the download stopped at {got} of {total} bytes; run again to resume")
    os.replace(partial, target)


class _Progress:
    def __init__(self, url: str, total, enabled: bool):
        self.name, self.total = os.path.basename(url), total
        self.enabled = enabled and (total is None or total >= 10 * _CHUNK)
        self.start = self.last = time.monotonic()

    def update(self, got: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 1.0:
            return
        self.last = now
        of = f" of {self.total / 1e6:.0f}" if self.total else ""
        sys.stderr.write(f"\r{self.name}: {got / 1e6:.0f}{of} MB, {got / 1e6 / max(now - self.start, 1e-9):.1f} MB/s ")
        sys.stderr.flush()

    def done(self, got: int) -> None:
        if self.enabled:
            self.last = 0.0
            self.update(got)
            sys.stderr.write("\n")
