"""Named data from ordered sources: a vanished release, other content, the online copy, a mirror, all failing."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from prunewise import cache
from prunewise.cache import DISTRIBUTIONS, Distribution
from prunewise.data import corpora
from prunewise.data.corpora import get_corpus
from prunewise.errors import PrunewiseError
from prunewise.sources import ONLINE_ENV, fingerprint

MEMBER = "evals/registry/data/schelling_point/wikipedia_5.jsonl"


def _passages(tag: str = "") -> list[str]:
    return [f"Passage {i}{tag}: the river runs past hill {i * 7 % 13} to the sea." for i in range(1000)]


def _jsonl(passages: list[str]) -> bytes:
    # field "0" is the passage; the other fields are shuffled variants that must never be used
    return "".join(json.dumps({"0": p + "\n", "1": p[::-1]}) + "\n" for p in passages).encode()


def _wheel(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(MEMBER, payload)
    return buf.getvalue()


@pytest.fixture
def releases(tmp_path, monkeypatch):
    """Two fake evals releases pinned in place of the real ones, and a file:// index that serves a chosen subset."""
    wheels = {"3.0.1.post1": _wheel(_jsonl(_passages())), "3.0.0.post1": _wheel(_jsonl(_passages()))}
    monkeypatch.setattr("prunewise.sources.EVALS_RELEASES", tuple(wheels))
    for version, data in wheels.items():
        name = f"evals-{version}-py3-none-any.whl"
        monkeypatch.setitem(DISTRIBUTIONS, ("evals", version),
                            Distribution("evals", version, name, hashlib.sha256(data).hexdigest(), len(data)))
    expected = {"wiki": fingerprint(tuple(p for p in _passages()[:600])),
                "wiki-test": fingerprint(tuple(p for p in _passages()[600:]))}
    monkeypatch.setattr(corpora, "PINNED", {**corpora.PINNED, **expected})
    monkeypatch.setenv(ONLINE_ENV, "http://127.0.0.1:9/")  # the online copy is unreachable unless a test says so
    monkeypatch.delenv("PRUNEWISE_DATA_MIRROR", raising=False)
    corpora._evals_corpus.cache_clear()

    def serve(**served: bytes) -> Path:
        root = tmp_path / "index"
        (root / "files").mkdir(parents=True, exist_ok=True)
        (root / "simple" / "evals").mkdir(parents=True, exist_ok=True)
        links = []
        for version, data in served.items():
            name = f"evals-{version}-py3-none-any.whl"
            (root / "files" / name).write_bytes(data)
            links.append(f'<a href="../../files/{name}">{name}</a>')
        (root / "simple" / "evals" / "index.html").write_text("<html><body>" + "".join(links) + "</body></html>")
        monkeypatch.setenv("PRUNEWISE_INDEX_URL", f"file://{root}/simple")
        return root

    yield wheels, expected, serve
    corpora._evals_corpus.cache_clear()


def test_a_vanished_first_release_is_replaced_by_the_next_with_the_same_documents(releases):
    wheels, expected, serve = releases
    serve(**{"3.0.0.post1": wheels["3.0.0.post1"]})  # the index lists only the earlier release
    wiki = get_corpus("wiki")
    assert wiki.fingerprint == expected["wiki"] and len(wiki.documents) == 600
    assert wiki.source.startswith("evals==3.0.0.post1 wheel")
    assert wiki.documents[0] == "Passage 0: the river runs past hill 0 to the sea."  # field "0", stripped
    assert get_corpus("wiki-test", role="evaluation").fingerprint == expected["wiki-test"]
    corpora._evals_corpus.cache_clear()
    serve()  # every source gone now: the extracted documents in the cache still serve, checked by their hash
    assert get_corpus("wiki").documents == wiki.documents


def test_a_release_with_other_documents_is_skipped(releases, monkeypatch):
    wheels, expected, serve = releases
    other = _wheel(_jsonl(_passages(" (edited)")))
    monkeypatch.setitem(DISTRIBUTIONS, ("evals", "3.0.1.post1"),
                        Distribution("evals", "3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
                                     hashlib.sha256(other).hexdigest(), len(other)))
    serve(**{"3.0.1.post1": other, "3.0.0.post1": wheels["3.0.0.post1"]})
    wiki = get_corpus("wiki")
    assert wiki.fingerprint == expected["wiki"] and wiki.source.startswith("evals==3.0.0.post1 wheel")


def test_the_online_copy_is_used_when_no_release_is_served(releases, tmp_path, monkeypatch):
    _, expected, serve = releases
    serve()
    online = tmp_path / "online"
    (online / MEMBER).parent.mkdir(parents=True)
    (online / MEMBER).write_bytes(_jsonl(_passages()))
    monkeypatch.setenv(ONLINE_ENV, f"file://{online}/")
    wiki = get_corpus("wiki")
    assert wiki.fingerprint == expected["wiki"] and wiki.source.startswith("the evals repository online")


def test_every_source_failing_is_one_line_naming_each_and_leaves_no_partial_file(releases):
    _, _, serve = releases
    serve()
    with pytest.raises(PrunewiseError) as err:
        get_corpus("wiki")
    message = str(err.value)
    assert "\n" not in message
    for part in ("corpus 'wiki'", "mirror: PRUNEWISE_DATA_MIRROR is not set", "evals==3.0.1.post1 wheel:",
                 "does not list evals-3.0.1.post1", "evals==3.0.0.post1 wheel:", "the evals repository online:",
                 "prunewise data export"):
        assert part in message
    leftovers = [p for p in cache.cache_root().rglob("*") if p.is_file() and p.name not in (".lock",)]
    assert leftovers == []


def test_export_then_mirror_serves_the_same_documents_offline(releases, tmp_path, monkeypatch):
    wheels, expected, serve = releases
    serve(**{"3.0.1.post1": wheels["3.0.1.post1"]})
    from prunewise.mirror import export_data

    mirror = tmp_path / "mirror"
    written = export_data(mirror, corpora_names=["wiki", "wiki-test"], tasks=[], packages=True)
    assert (mirror / "corpora" / "wiki.jsonl").exists() and written["corpora"]["wiki"] == expected["wiki"]
    assert (mirror / "packages" / "evals-3.0.1.post1-py3-none-any.whl").exists()
    # another machine: an empty cache, no index, the mirror named in the environment
    monkeypatch.setenv("PRUNEWISE_CACHE", str(tmp_path / "other-cache"))
    serve()
    corpora._evals_corpus.cache_clear()
    monkeypatch.setenv("PRUNEWISE_DATA_MIRROR", str(mirror))
    wiki = get_corpus("wiki")
    assert wiki.fingerprint == expected["wiki"] and wiki.source.startswith("mirror")
    # the pinned file in the mirror's packages/ serves fetch_distribution too (checked against its sha256)
    assert cache.fetch_distribution("evals", "3.0.1.post1").read_bytes() == wheels["3.0.1.post1"]


def test_a_tampered_mirror_file_is_refused_by_its_hash(releases, tmp_path, monkeypatch):
    _, _, serve = releases
    serve()
    mirror = tmp_path / "mirror"
    (mirror / "corpora").mkdir(parents=True)
    (mirror / "corpora" / "wiki.jsonl").write_text(json.dumps({"text": "not the passages"}) + "\n")
    monkeypatch.setenv("PRUNEWISE_DATA_MIRROR", str(mirror))
    with pytest.raises(PrunewiseError, match=r"mirror: other content \(sha256 [0-9a-f]{12}, pinned"):
        get_corpus("wiki")


def test_the_cli_exits_2_with_one_line_when_every_source_fails(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PRUNEWISE_CACHE": str(tmp_path / "cache"),
           "PRUNEWISE_INDEX_URL": f"file://{tmp_path}/no-index/simple", ONLINE_ENV: "http://127.0.0.1:9/"}
    proc = subprocess.run([sys.executable, "-m", "prunewise.cli", "data", "fetch", "wiki"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunewise: error: corpus 'wiki' is unavailable from every source")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != ".lock"]
