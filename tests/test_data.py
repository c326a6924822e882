"""Tests of prunewise.data: corpora, token streams, windows and the overlap check."""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch

from prunewise.data import (
    Corpus,
    calibration_windows,
    check_no_overlap,
    evaluation_windows,
    get_corpus,
    list_corpora,
    tokenize_corpus,
)
from prunewise.data.corpora import code_split
from prunewise.errors import PrunewiseError


class FakeTokenizer:
    """One token per whitespace-separated word (id from a growing vocab); counts its calls."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.calls: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        assert add_special_tokens is False
        self.calls.append(text)
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}

    def get_vocab(self) -> dict[str, int]:
        return {"<fake-tokenizer-v1>": 0}


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Unit tests use a throw-away cache; integration tests use the real one (downloads are kept)."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("PRUNEWISE_CACHE", str(tmp_path / "cache"))


def _words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(100000)}" for _ in range(n))


def _write_txt(tmp_path, name: str, paragraphs: list[str]):
    path = tmp_path / name
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path) -> Corpus:
    return get_corpus(_write_txt(tmp_path, "c.txt", [_words(300, i) for i in range(10)]))


# ---------------------------------------------------------------- corpora


def test_txt_paragraphs_and_fingerprint(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  first para\nline two \n\n\n second  \n   \n\nfirst para\nline two\n", encoding="utf-8")
    c = get_corpus(str(path))
    assert c.documents == ("first para\nline two", "second")  # stripped, empty dropped, repeats dropped
    assert c.name == str(path)
    assert c.text() == "first para\nline two\n\nsecond"
    assert len(c.fingerprint) == 64 and c.fingerprint == get_corpus(path).fingerprint
    path.write_text("first para\nline two\n\nsecond changed\n", encoding="utf-8")
    assert get_corpus(path).fingerprint != c.fingerprint


def test_jsonl_text_and_prompt_completion(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "plain text"}, {"prompt": "Q: 2+2?", "completion": " A: 4"}, {"text": ""}, {"other": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert get_corpus(path, role="evaluation").documents == ("plain text", "Q: 2+2? A: 4")


@pytest.mark.parametrize("content", ["", "  \n\n ", '{"other": 1}\n'])
def test_empty_or_textless_file_is_an_error(tmp_path, content):
    path = tmp_path / ("e.jsonl" if content.startswith("{") else "e.txt")
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PrunewiseError, match="empty|no text"):
        get_corpus(path)


def test_missing_file_and_bad_jsonl(tmp_path):
    with pytest.raises(PrunewiseError, match="does not exist"):
        get_corpus(tmp_path / "nope.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(PrunewiseError, match="line 2"):
        get_corpus(bad)


def test_unknown_corpus_and_role():
    with pytest.raises(PrunewiseError) as err:
        get_corpus("wikipedia-2099")
    message = str(err.value)
    assert "wiki-test" in message and "code" in message and ".txt" in message and ".jsonl" in message
    with pytest.raises(PrunewiseError, match="role"):
        get_corpus("code", role="training")


def test_online_corpus_without_datasets_is_a_clean_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(PrunewiseError, match=r"pip install 'prunewise\[online\]'"):
        get_corpus("wikitext2")


def test_list_corpora():
    rows = {row["name"]: row for row in list_corpora()}
    assert {"wiki", "wiki-test", "code", "code-test", "wikitext2", "c4"} <= set(rows)
    assert rows["wiki"]["offline"] and not rows["c4"]["offline"]
    assert all(set(row) == {"name", "description", "offline", "cached"} for row in rows.values())


def test_code_split_is_disjoint_and_deterministic():
    train = get_corpus("code")
    test = get_corpus("code", role="evaluation")
    assert train.name == "code" and test.name == "code-test"
    assert get_corpus("code-train", role="evaluation") == train
    assert get_corpus("code-test") == test
    assert len(train.documents) > 300 and len(test.documents) > 20
    assert not set(train.documents) & set(test.documents)
    assert "Python 3." in train.source and "Python 3." in test.source
    assert code_split("json/decoder.py") == code_split("json/decoder.py")
    splits = [code_split(f"pkg/mod{i}.py") for i in range(2000)]
    assert 0.05 < splits.count("test") / len(splits) < 0.15
    check_no_overlap(train, test)


# ---------------------------------------------------------------- tokens and windows


def test_tokenize_once_and_cache(corpus):
    tok = FakeTokenizer()
    ids = tokenize_corpus(tok, corpus)
    assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() == 3000
    assert tok.calls == [corpus.text()]  # the whole joined text, in one call
    again = tokenize_corpus(tok, corpus)
    assert len(tok.calls) == 1 and torch.equal(ids, again)


def test_calibration_windows_shape_and_seeds(corpus):
    tok = FakeTokenizer()
    stream = tokenize_corpus(tok, corpus)
    a = calibration_windows(tok, corpus, nsamples=8, seqlen=64, seed=0)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(tok, corpus, nsamples=8, seqlen=64, seed=0))
    assert not torch.equal(a, calibration_windows(tok, corpus, nsamples=8, seqlen=64, seed=1))
    text = " ".join(map(str, stream.tolist()))
    for row in a:  # every window is a run of consecutive tokens
        assert " ".join(map(str, row.tolist())) in text


def test_evaluation_windows_are_consecutive_slices(corpus):
    tok = FakeTokenizer()
    stream = tokenize_corpus(tok, corpus)
    w = evaluation_windows(tok, corpus, seqlen=512)
    assert w.shape == (3000 // 512, 512)
    assert torch.equal(w.reshape(-1), stream[: w.numel()])
    w = evaluation_windows(tok, corpus, seqlen=100, max_tokens=1050)
    assert w.shape == (10, 100) and torch.equal(w.reshape(-1), stream[:1000])


def test_too_little_data_errors(tmp_path):
    tok = FakeTokenizer()
    small = get_corpus(_write_txt(tmp_path, "s.txt", [_words(50, 0)]))
    with pytest.raises(PrunewiseError, match=r"has only 50 tokens; need at least seqlen\+1=51"):
        calibration_windows(tok, small, nsamples=4, seqlen=50)
    assert calibration_windows(tok, small, nsamples=4, seqlen=49).shape == (4, 49)
    with pytest.raises(PrunewiseError, match="nsamples"):
        calibration_windows(tok, small, nsamples=0, seqlen=8)
    with pytest.raises(PrunewiseError, match="seqlen"):
        calibration_windows(tok, small, nsamples=1, seqlen=1)
    with pytest.raises(PrunewiseError, match="only 50 tokens"):
        evaluation_windows(tok, small, seqlen=64)
    with pytest.raises(PrunewiseError, match="max_tokens"):
        evaluation_windows(tok, small, seqlen=16, max_tokens=10)


# ---------------------------------------------------------------- overlap


def test_overlap_same_corpus_refused(corpus):
    with pytest.raises(PrunewiseError, match="same text"):
        check_no_overlap(corpus, corpus)


def test_overlap_identical_paragraph_refused(tmp_path):
    shared = _words(40, 99)
    cal = get_corpus(_write_txt(tmp_path, "cal.txt", [_words(200, i) for i in range(50)] + [shared]))
    # the same paragraph with different whitespace, among otherwise new text
    reflowed = "  " + shared.replace(" ", "\n", 3)
    ev = get_corpus(_write_txt(tmp_path, "ev.txt", [_words(200, 1000 + i) for i in range(50)] + [reflowed]))
    with pytest.raises(PrunewiseError) as err:
        check_no_overlap(cal, ev)
    message = str(err.value)
    assert "cal.txt" in message and "ev.txt" in message and "1 of 51" in message and "--calibration wiki" in message


def test_overlap_near_copy_refused(tmp_path):
    source = [_words(300, i) for i in range(20)]
    cal = get_corpus(_write_txt(tmp_path, "cal.txt", source))
    # copies of 3 paragraphs with one word edited in each, so no document is identical
    edited = [p.replace(p.split()[150], "EDITED", 1) for p in source[:3]]
    ev = get_corpus(_write_txt(tmp_path, "ev.txt", [_words(300, 500 + i) for i in range(20)] + edited))
    with pytest.raises(PrunewiseError, match=r"0 of 23 evaluation documents are identical and \d+\.\d% of its 13-word"):
        check_no_overlap(cal, ev)


def test_no_false_positive_on_disjoint_text(tmp_path):
    cal = get_corpus(_write_txt(tmp_path, "cal.txt", [_words(300, i) for i in range(20)]))
    ev = get_corpus(_write_txt(tmp_path, "ev.txt", [_words(300, 500 + i) for i in range(20)]))
    check_no_overlap(cal, ev)
    check_no_overlap(ev, cal)


# ---------------------------------------------------------------- real corpora (fetches the evals wheel once)


@pytest.mark.integration
@pytest.mark.parametrize("domain", ["wiki", "legal"])
def test_default_corpora_load_pinned_and_do_not_overlap(domain):
    from prunewise.data.corpora import PINNED, _evals_corpus

    cal = get_corpus(domain)
    test = get_corpus(f"{domain}-test", role="evaluation")
    assert test.name == f"{domain}-test" and cal.name == domain
    for c in (cal, test):
        assert c.fingerprint == PINNED[c.name]  # the documents prunewise pins, from whichever source served them
        assert len(c.text()) > 200_000 and len(set(c.documents)) == len(c.documents)
        assert c.source.startswith(("mirror", "evals==", "the evals repository online"))
    if domain == "wiki":
        assert (len(cal.documents), len(test.documents)) == (600, 400)
        assert cal.documents[0].startswith("Aubrey Leon Haines was born")
    assert not set(cal.documents) & set(test.documents)
    _evals_corpus.cache_clear()
    assert get_corpus(domain) == cal  # the cached extraction gives the same corpus
    check_no_overlap(cal, test)
