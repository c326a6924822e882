"""Task and domain data: prompt/completion windows with a completion mask, task loss, calibration mixtures."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model, tiny_tokenizer, write_paragraphs
from prunewise.api import evaluate, prune, run
from prunewise.cli import main
from prunewise.data import (
    MixtureItem,
    TaskRecords,
    calibration_corpora,
    calibration_spec_windows,
    calibration_windows,
    check_calibration_overlap,
    get_corpus,
    load_task_records,
    mixture_windows,
    parse_calibration,
    task_windows,
    tokenize_corpus,
)
from prunewise.data.mixture import mixture_counts, mixture_seed
from prunewise.errors import PrunewiseError
from prunewise.evaluate.task_loss import task_loss
from prunewise.recipe import Recipe, make_recipe

RECORDS = [("the quick brown fox", " jumps over the lazy dog"),
           ("a small cat sleeps near the warm fire and", " birds sing"),
           ("rivers run to", " the sea")]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _write_jsonl(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- prompt/completion windows


def test_mask_covers_exactly_the_completion_tokens(tok):
    ids, mask = task_windows(tok, RECORDS, seqlen=48)
    assert ids.shape == mask.shape == (3, 48) and ids.dtype == torch.long and mask.dtype == torch.bool
    for row, (prompt, completion) in enumerate(RECORDS):
        p, c = _ids(tok, prompt), _ids(tok, completion) + [tok.eos_token_id]
        end = len(p) + len(c)
        assert ids[row, :end].tolist() == p + c
        assert mask[row].tolist() == [False] * len(p) + [True] * len(c) + [False] * (48 - end)
        assert (ids[row, end:] == tok.pad_token_id).all()


def test_windows_without_eos_and_padded_to_the_longest(tok):
    ids, mask = task_windows(tok, RECORDS, seqlen=48, append_eos=False, pad_to_seqlen=False)
    lengths = [len(_ids(tok, p)) + len(_ids(tok, c)) for p, c in RECORDS]
    assert ids.shape[1] == max(lengths)
    assert mask.sum(dim=1).tolist() == [len(_ids(tok, c)) for _, c in RECORDS]
    assert tok.eos_token_id not in ids[mask].tolist()


def test_long_prompts_lose_their_left_tokens_and_completions_stay_whole(tok):
    prompt = "the quick brown fox jumps over the lazy dog " * 6
    p, c = _ids(tok, prompt), _ids(tok, " the sea") + [tok.eos_token_id]
    seqlen = len(c) + 5
    ids, mask = task_windows(tok, [(prompt, " the sea")], seqlen=seqlen)
    assert ids[0].tolist() == p[-5:] + c
    assert mask[0].tolist() == [False] * 5 + [True] * len(c)


def test_an_empty_prompt_becomes_bos_so_every_completion_token_is_scored(tok):
    ids, mask = task_windows(tok, [("", " the sea")], seqlen=16)
    c = _ids(tok, " the sea") + [tok.eos_token_id]
    assert ids[0, : len(c) + 1].tolist() == [tok.bos_token_id] + c
    assert int(mask[0, 1:].sum()) == len(c)


def test_a_completion_longer_than_seqlen_is_an_error(tok):
    c = len(_ids(tok, " jumps over the lazy dog")) + 1
    task_windows(tok, [("the fox", " jumps over the lazy dog")], seqlen=c + 1)  # one token of context fits
    with pytest.raises(PrunewiseError, match="completion has .* tokens.*longer seqlen"):
        task_windows(tok, [("the fox", " jumps over the lazy dog")], seqlen=c)


def test_load_task_records(tmp_path):
    rows = [{"prompt": p, "completion": c} for p, c in RECORDS] + [{"prompt": "", "completion": " x"}, ""]
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    records = load_task_records(path)
    assert records.records == tuple(RECORDS) + (("", " x"),)
    assert len(records) == 4 and records.name == path and "4 prompt/completion records" in records.source
    assert records.fingerprint == load_task_records(path).fingerprint
    assert records.fingerprint == TaskRecords.from_pairs(records.records).fingerprint
    _write_jsonl(tmp_path / "t.jsonl", rows[:-2])
    assert load_task_records(path).fingerprint != records.fingerprint


@pytest.mark.parametrize("rows,expected", [
    ([], "empty"),
    ([{"prompt": "a", "completion": " b"}, {"other": 1}], "line 2 has neither 'text' nor 'prompt'/'completion'"),
    ([{"prompt": "a", "completion": " b"}, {"text": "plain"}], r"mixes 'text' records \(line 2\).*\(line 1\)"),
    ([{"text": "plain"}, {"text": "more"}], "holds 'text' records"),
    ([{"prompt": "a", "completion": "  "}], "line 1 has an empty completion"),
    ([{"prompt": "a"}], "no 'completion' field"),
    ([{"completion": " b"}], "no 'prompt' field"),
    ([{"prompt": 1, "completion": " b"}], "'prompt' must be a string"),
    ([{"text": "t", "prompt": "a", "completion": " b"}], "both 'text' and 'prompt'"),
    (["not json"], "line 1 is not valid JSON"),
])
def test_bad_task_files_give_one_line_errors(tmp_path, rows, expected):
    path = _write_jsonl(tmp_path / "t.jsonl", rows) if rows else str(tmp_path / "t.jsonl")
    if not rows:
        (tmp_path / "t.jsonl").write_text("\n  \n")
    with pytest.raises(PrunewiseError, match=expected) as err:
        load_task_records(path)
    assert "\n" not in str(err.value)


def test_task_records_need_a_jsonl_file(tmp_path):
    with pytest.raises(PrunewiseError, match="must be a .jsonl file"):
        load_task_records(write_paragraphs(tmp_path / "p.txt", 1))
    with pytest.raises(PrunewiseError, match="no records"):
        TaskRecords.from_pairs([])


def test_a_prompt_completion_file_is_still_a_corpus_of_its_text(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": p, "completion": c} for p, c in RECORDS])
    assert get_corpus(path, "calibration").documents == tuple((p + c).strip() for p, c in RECORDS)


# ---------------------------------------------------------------- task loss


def test_task_loss_is_the_cross_entropy_of_completion_tokens_only(tok):
    model = tiny_model("llama")
    ids, mask = task_windows(tok, RECORDS, seqlen=40)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    nll, count = 0.0, 0
    for row in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[row, t]:  # token t is a completion token, predicted from position t-1
                nll -= float(torch.log_softmax(logits[row, t - 1], dim=-1)[ids[row, t]])
                count += 1
    expected = nll / count
    assert count == int(mask.sum())  # every completion token has context here
    for batch_size in (None, 1, 2):
        out = task_loss(model, ids, mask, batch_size=batch_size)
        assert out["tokens"] == count
        assert out["nll"] == pytest.approx(expected, rel=1e-5)
        assert out["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    short_ids, short_mask = task_windows(tok, RECORDS, seqlen=40, pad_to_seqlen=False)
    assert task_loss(model, short_ids, short_mask)["nll"] == pytest.approx(expected, rel=1e-5)  # padding is inert
    everything = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert float(everything) != pytest.approx(expected, rel=1e-3)  # the prompt and padding really are left out


def test_task_loss_rejects_bad_masks(tok):
    model = tiny_model("llama")
    ids, mask = task_windows(tok, RECORDS, seqlen=40)
    with pytest.raises(PrunewiseError, match="same"):
        task_loss(model, ids, mask[:, :-1])
    with pytest.raises(PrunewiseError, match="no completion token"):
        task_loss(model, ids, torch.zeros_like(mask))


# ---------------------------------------------------------------- calibration mixtures


@pytest.fixture
def two_files(tmp_path):
    return write_paragraphs(tmp_path / "a.txt", 11), write_paragraphs(tmp_path / "b.txt", 12)  # disjoint from tiny_folder


def test_mixture_counts_use_largest_remainders():
    assert mixture_counts([0.7, 0.3], 64) == [45, 19]
    assert mixture_counts([7, 3], 64) == [45, 19]  # weights are normalised
    assert mixture_counts([1, 1, 1], 10) == [4, 3, 3]  # ties go to the earlier item
    assert mixture_counts([0.95, 0.05], 4) == [4, 0]
    assert sum(mixture_counts([0.2, 0.3, 0.5], 7)) == 7


def test_mixture_windows_split_by_weight_and_are_deterministic(tok, two_files):
    a, b = two_files
    items = [{"source": a, "weight": 0.7}, {"source": b, "weight": 0.3}]
    windows = mixture_windows(tok, items, 64, 16, seed=3)
    assert windows.shape == (64, 16)
    assert torch.equal(windows, mixture_windows(tok, items, 64, 16, seed=3))
    assert not torch.equal(windows, mixture_windows(tok, items, 64, 16, seed=4))

    def windows_of(path):
        stream = tokenize_corpus(tok, get_corpus(path)).tolist()
        return {tuple(stream[i:i + 16]) for i in range(len(stream) - 15)}
    in_a, in_b = windows_of(a), windows_of(b)
    rows = [tuple(r) for r in windows.tolist()]
    assert all(r in in_a and r not in in_b for r in rows[:45])
    assert all(r in in_b and r not in in_a for r in rows[45:])
    # each source has its own seed: the first reproduces a plain calibration set, the second does not reuse it
    assert torch.equal(windows[:45], calibration_windows(tok, get_corpus(a), 45, 16, seed=3))
    assert not torch.equal(windows[45:], calibration_windows(tok, get_corpus(b), 19, 16, seed=3))
    assert mixture_seed(3, 1) != 3 and mixture_seed(3, 1) == mixture_seed(3, 1) != mixture_seed(3, 2)


def test_one_function_serves_both_calibration_forms(tok, two_files):
    a, b = two_files
    assert torch.equal(calibration_spec_windows(tok, a, 8, 16, seed=1), calibration_windows(tok, get_corpus(a), 8, 16, 1))
    assert torch.equal(calibration_spec_windows(tok, f"{a}:1,{b}:3", 8, 16, seed=1),
                       mixture_windows(tok, [(a, 0.25), (b, 0.75)], 8, 16, seed=1))
    assert [c.name for c in calibration_corpora(a)] == [a]
    assert [c.name for c in calibration_corpora([MixtureItem(source=a, weight=1), (b, 2)])] == [a, b]


@pytest.mark.parametrize("items,expected", [
    ([], "mixture is empty"),
    ([{"source": "code", "weight": 0}], "weight 0; give every source a finite weight > 0"),
    ([{"source": "code", "weight": -0.5}], "weight -0.5"),
    ([{"source": "code", "weight": float("nan")}], "weight nan"),
    ([{"source": "code", "weight": True}], "weight True"),
    ([{"source": "code"}], "weight None"),
    ([{"source": "", "weight": 1}], "needs a 'source'"),
    ([{"source": "code", "weight": 1, "share": 2}], "unknown keys share"),
    (["code"], "write each item as"),
    ([{"source": "code", "weight": 1}, {"source": "CODE", "weight": 1}], "both 'CODE'"),
    ([{"source": "wikipedia-2099", "weight": 1}], "unknown corpus 'wikipedia-2099'"),
])
def test_bad_mixtures_give_one_line_errors(tok, items, expected):
    with pytest.raises(PrunewiseError, match=expected) as err:
        mixture_windows(tok, items, 8, 16)
    assert "\n" not in str(err.value)


def test_two_sources_with_the_same_text_are_refused(tok, tmp_path, two_files):
    a, _ = two_files
    copy = tmp_path / "copy.txt"
    copy.write_text(open(a).read())
    with pytest.raises(PrunewiseError, match="are the same text"):
        mixture_windows(tok, [(a, 1), (str(copy), 1)], 8, 16)


def test_parse_calibration(tmp_path):
    assert parse_calibration("wiki") == "wiki"
    assert parse_calibration("code:0.7, wiki:.3") == [MixtureItem(source="code", weight=0.7),
                                                       MixtureItem(source="wiki", weight=0.3)]
    odd = tmp_path / "v:2.txt"
    odd.write_text("text")
    assert parse_calibration(str(odd)) == str(odd)  # an existing file wins
    with pytest.raises(PrunewiseError, match="'wiki' is not SOURCE:WEIGHT"):
        parse_calibration("code:0.7,wiki")
    with pytest.raises(PrunewiseError, match="weight -1"):
        parse_calibration("code:-1")


# ---------------------------------------------------------------- recipe, API and CLI


def test_a_mixture_recipe_round_trips_through_yaml(tmp_path, two_files):
    a, b = two_files
    recipe = make_recipe(calibration=[{"source": a, "weight": 0.7}, {"source": b, "weight": 0.3}])
    assert recipe.calibration == [MixtureItem(source=a, weight=0.7), MixtureItem(source=b, weight=0.3)]
    assert make_recipe(calibration=f"{a}:0.7,{b}:0.3") == recipe
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(path) == recipe
    assert make_recipe().calibration == "wiki"
    for bad, expected in [([], "empty"), ([{"source": a, "weight": 0}], "weight > 0"), (3, "list of {source, weight}")]:
        with pytest.raises(PrunewiseError, match=f"invalid recipe: calibration: .*{expected}"):
            make_recipe(calibration=bad)


def test_prune_with_a_mixture_calibration(tiny_folder, tmp_path, two_files):
    a, b = two_files
    recipe = make_recipe(model=tiny_folder["model"], calibration=[{"source": a, "weight": 3}, {"source": b, "weight": 1}],
                         nsamples=8, seqlen=16, sparsity=0.5, allocation="owl", evaluation=[], output=None)
    result = prune(recipe, progress=False)
    assert abs(result.report["achieved_sparsity"] - 0.5) < 1e-3
    assert main(["prune", "--model", tiny_folder["model"], "--calibration", f"{a}:3,{b}:1", "--nsamples", "8",
                 "--seqlen", "16", "--allocation", "owl", "--eval", "--output", str(tmp_path / "cli"),
                 "--no-progress"]) == 0
    saved = Recipe.from_yaml(tmp_path / "cli" / "recipe.yaml")
    assert saved.calibration == recipe.calibration


def test_overlap_check_covers_every_mixture_component(tiny_folder, tmp_path, two_files, capsys):
    a, b = two_files
    mixture = [{"source": a, "weight": 1}, {"source": b, "weight": 1}]
    check_calibration_overlap(mixture, get_corpus(tiny_folder["eval"], "evaluation"))  # disjoint text passes
    with pytest.raises(PrunewiseError, match="same text"):
        check_calibration_overlap(mixture, get_corpus(b, "evaluation"))
    recipe = make_recipe(model=tiny_folder["model"], calibration=mixture, nsamples=4, seqlen=16, evaluation=[b],
                         eval_seqlen=16, output=None)
    with pytest.raises(PrunewiseError, match=f"'{b}' and evaluation data '{b}' are the same text"):
        run(recipe, progress=False)
    with pytest.raises(PrunewiseError, match="same text"):
        evaluate(tiny_model("llama"), tiny_tokenizer(), [b], 64, 16, calibration=f"{a}:1,{b}:1", progress=False)
    assert main(["eval", "--model", tiny_folder["model"], "--data", b, "--calibration", f"{a}:1,{b}:1",
                 "--seqlen", "16", "--no-progress"]) == 2
    assert "same text" in capsys.readouterr().err
