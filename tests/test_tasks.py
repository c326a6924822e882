"""Multiple-choice scoring, task formats, the report page and resumable sweeps (tiny models, seconds)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model, tiny_tokenizer, write_paragraphs
from prunewise.errors import PrunewiseError
from prunewise.tasks.items import MCItem, _bigbench_item, _evals_item, _split_options, load_mc_jsonl
from prunewise.tasks.scoring import PairEncoder, loglikelihoods, mc_metrics, wilson


def reference_ll(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from one plain forward over the whole sequence."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    return float(sum(logprobs[p - 1, whole[p]] for p in range(len(ctx), len(whole))))


REQUESTS = [("the quick brown fox", " jumps over"), ("the quick brown fox", " sleeps"), ("the quick brown fox", " sings"),
            ("birds sing songs of ", "rain and sun"), ("birds sing songs of ", "sun"),
            ("a small cat sleeps near the warm fire and birds sing", " songs"), ("green hills", " where rivers run")]


@pytest.mark.parametrize("share", [False, True])
def test_loglikelihoods_match_a_plain_forward(share):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    got = loglikelihoods(model, tok, REQUESTS, batch_tokens=40, share_context=share)
    for (ctx, cont), (ll, _) in zip(REQUESTS, got):
        assert ll == pytest.approx(reference_ll(model, tok, ctx, cont), abs=1e-4)


def test_shared_context_scores_like_whole_sequences_on_gemma3():
    """Repeating a KV cache across choices must not change scores, including sliding-window layers."""
    model, tok = tiny_model("gemma3"), tiny_tokenizer()
    flat = loglikelihoods(model, tok, REQUESTS, share_context=False)
    shared = loglikelihoods(model, tok, REQUESTS, share_context=True)
    for (a, _), (b, _) in zip(flat, shared):
        assert a == pytest.approx(b, abs=1e-4)


def test_greedy_flag_matches_a_plain_forward():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.resize_token_embeddings(len(tok))  # every token the model can pick has text
    ctx = "the quick brown"
    ids = tok.encode(ctx)
    with torch.no_grad():  # greedy-decode three tokens: that continuation is greedy if its text round-trips
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy_text = tok.decode(ids[len(tok.encode(ctx)):])
    requests = [(ctx, greedy_text)] + REQUESTS
    flags = [g for _, g in loglikelihoods(model, tok, requests)]
    for (c, cont), flag in zip(requests, flags):
        ctx_ids, cont_ids = PairEncoder(tok)(c, cont)
        whole, n = ctx_ids + cont_ids, len(ctx_ids)
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0]
        assert flag == all(int(logits[p - 1].argmax()) == whole[p] for p in range(n, len(whole)))
    if tok.encode(ctx + greedy_text) == ids:  # the decode round-trips: then it must be flagged greedy
        assert flags[0]


def test_pair_encoder_moves_trailing_space_to_the_continuation():
    tok = tiny_tokenizer()
    enc = PairEncoder(tok)
    ctx, cont = enc("the quick ", "brown")
    assert ctx == tok.encode("the quick")
    assert ctx + cont == tok.encode("the quick brown")


def test_accuracy_and_length_normalised_accuracy_as_lm_eval_defines_them():
    items = [MCItem("q", (" a", " bbbbbbbb"), (1,)),      # raw argmax a (-2 > -6); per char: -1 vs -0.75 -> b
             MCItem("q", (" yes", " no"), (0,)),          # tie: the first maximum wins -> right
             MCItem("q", (" x", " y", " z"), (1, 2))]     # two golds: choosing z counts
    lls = [[-2.0, -6.0], [-1.0, -1.0], [-5.0, -4.0, -3.0]]
    m = mc_metrics(items, lls)
    assert (m["correct"], m["correct_norm"], m["n"]) == (2, 3, 3)
    assert m["chance"] == pytest.approx((1 / 2 + 1 / 2 + 2 / 3) / 3)


def test_wilson_interval():
    lo, hi = wilson(60, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.502, 0.691)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)


def test_bigbench_examples_follow_the_package_format():
    task = {"task_prefix": "Answer.\n", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
            "append_choices_to_input": False}
    item = _bigbench_item(task, {"input": "Is ice cold?", "target_scores": {"Yes": 1, "No": 0}})
    assert item.context == "Answer.\n\nQ: Is ice cold?\nA: "
    assert item.choices == ("Yes", "No") and item.gold == (0,)
    listed = _bigbench_item({}, {"input": "Pick", "target_scores": {"a": 0, "b": 1, "c": 1}})
    assert listed.context == "Q: Pick\n  choice: a\n  choice: b\n  choice: c\nA: "  # json_task's defaults
    assert listed.gold == (1, 2)
    assert _bigbench_item({}, {"input": "x", "target_scores": {"a": 0, "b": 0}}) is None  # no right answer
    assert _bigbench_item({}, {"input": "x", "target": "free text"}) is None


def test_evals_mmlu_format_becomes_a_cloze_item():
    record = {"input": [{"role": "system", "content": "Answer with a letter."},
                        {"role": "user", "content": "Which gas do plants absorb?\nA. Oxygen\nB. Carbon dioxide\n"
                                                    "C. Helium\nD. Neon\nAnswer:"}], "ideal": "B"}
    item = _evals_item(record)
    assert item.context == "Which gas do plants absorb?\nAnswer:"
    assert item.choices == (" Oxygen", " Carbon dioxide", " Helium", " Neon") and item.gold == (1,)
    inline = _split_options("The level: A) lowest above B) highest below C) set by ATC")
    assert inline == ("The level:", ["lowest above", "highest below", "set by ATC"])
    assert _evals_item({"input": "no options here", "ideal": "A"}) is None
    assert _evals_item({"question": "Q?\nA. x\nB. y\nAnswer:", "answer": "C"}) is None  # gold outside the options


def _chat(question: str, answer: str, system: str = "Reply Yes or No.") -> str:
    return json.dumps({"input": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                       "ideal": answer})


def test_an_evals_classification_task_is_multiple_choice_over_its_label_set():
    from prunewise.tasks.items import _evals_records_items

    lines = [_chat(f"Is {w} a food?", a) for w, a in [("bread", "Yes"), ("a rock", "No"), ("rice", "Yes")] * 10]
    items = _evals_records_items(lines)
    assert len(items) == 30
    assert items[0].context == "Reply Yes or No.\n\nIs bread a food?\nAnswer:"
    assert items[0].choices == (" No", " Yes") and items[0].gold == (1,) and items[1].gold == (0,)
    # lettered options win when 90% of the records have them (the existing MMLU-style items are unchanged)
    lettered = [_chat("Pick one:\nA. x\nB. y\nAnswer:", "B")] * 10
    assert _evals_records_items(lettered)[0].choices == (" x", " y")
    # not a classification: free-text answers, too many labels, a label held by under 5% of the records
    assert _evals_records_items([_chat(f"Spell {i}", f"word {i}") for i in range(30)]) == []
    assert _evals_records_items([_chat("q", str(i % 7)) for i in range(70)]) == []
    assert _evals_records_items([_chat("q", "Yes")] * 40 + [_chat("q", "No")]) == []
    # few-shot records (named example messages) are not one question each
    named = json.dumps({"input": [{"role": "system", "content": "x", "name": "example_user"}], "ideal": "Yes"})
    assert _evals_records_items([named, named] * 10) == []


def test_local_multiple_choice_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "2+2=", "choices": ["3", "4"], "answer": 1}) + "\n" +
                    json.dumps({"context": "Sky is ", "choices": ["blue", "green"], "answer": "blue"}) + "\n")
    task = load_mc_jsonl(path)
    assert [i.gold for i in task.items] == [(1,), (0,)]
    assert task.items[0].choices == (" 3", " 4") and task.items[1].choices == ("blue", "green")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(PrunewiseError, match="neither a choice index nor a choice"):
        load_mc_jsonl(bad)
    bad.write_text(json.dumps({"question": "q", "choices": ["a"], "answer": 0}) + "\n")
    with pytest.raises(PrunewiseError, match="at least two non-empty choices"):
        load_mc_jsonl(bad)
    bad.write_text("\n")
    with pytest.raises(PrunewiseError, match="has no items"):
        load_mc_jsonl(bad)


def test_unknown_task_names_the_fix():
    from prunewise.tasks.items import get_task

    with pytest.raises(PrunewiseError, match="prunewise tasks list"):
        get_task("no-such-task")


# ---------------------------------------------------------------- runs, sweeps and the report page


@pytest.fixture
def tiny_setup(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    mc = tmp_path / "mc.jsonl"
    with open(mc, "w") as fh:
        for i in range(12):
            fh.write(json.dumps({"question": f"the quick brown fox {i}", "choices": ["jumps", "sleeps", "sings"],
                                 "answer": i % 3}) + "\n")
    return {"model": str(folder), "calibration": write_paragraphs(tmp_path / "calib.txt", 1),
            "evaluation": [write_paragraphs(tmp_path / "eval.txt", 2)], "nsamples": 4, "seqlen": 32,
            "eval_tokens": 512, "eval_seqlen": 32, "tasks": [str(mc)]}


def test_run_reports_tasks_completions_and_a_page(tiny_setup, tmp_path):
    from prunewise.api import run
    from prunewise.recipe import make_recipe

    out = tmp_path / "run"
    report = run(make_recipe(**tiny_setup, sparsity=0.6, output=str(out)), progress=False)
    dense, pruned = report["tasks"]["dense"]["mc"], report["tasks"]["pruned"]["mc"]
    assert dense["n"] == pruned["n"] == 12 and dense["chance"] == pytest.approx(1 / 3)
    assert len(report["completions"]["dense"]) == len(report["completions"]["pruned"]) == 5
    page = (out / "report.html").read_text()
    assert page.count("<figure data-figure=") == 4  # perplexity, tasks, retention, plan
    md = (out / "report.md").read_text()
    for fig in ("perplexity", "tasks", "retention", "plan"):
        assert f"figures/{fig}.png" in md and (out / "figures" / f"{fig}.png").stat().st_size > 1000
    assert "Greedy completions" in md and "| module | planned | achieved |" in md


def test_sweep_resumes_only_missing_cells(tiny_setup, tmp_path, monkeypatch):
    import prunewise.sweep as sweep
    from prunewise.recipe import make_recipe

    base = make_recipe(**tiny_setup)
    out = tmp_path / "sweep"
    real = sweep._run_cell
    calls = []

    def interrupted(recipe, progress, model_dir, *rest):
        calls.append(recipe.score["name"] + str(recipe.sparsity))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(recipe, progress, model_dir, *rest)

    monkeypatch.setattr(sweep, "_run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(base, ["magnitude", "wanda"], [0.3, 0.6], ["uniform"], out, progress=False)
    assert sorted(p.name for p in (out / "cells").glob("*.json")) == ["magnitude-uniform-0.3.json",
                                                                       "magnitude-uniform-0.6.json"]
    assert not list((out / "cells").glob(".*tmp*"))
    calls.clear()
    summary = sweep.run_sweep(base, ["magnitude", "wanda"], [0.3, 0.6], ["uniform"], out, progress=False)
    assert calls == ["wanda0.3", "wanda0.6"]  # only the missing cells ran
    assert len(summary["cells"]) == 4 and (out / "report.html").exists()
    ppl = {(c["score"], c["sparsity"]): c["perplexity"] for c in summary["cells"]}
    assert ppl[("magnitude", 0.3)] != ppl[("magnitude", 0.6)]
    calls.clear()
    changed = make_recipe(**dict(tiny_setup, eval_tokens=256))
    sweep.run_sweep(changed, ["magnitude"], [0.3], ["uniform"], out, progress=False)
    assert calls == ["magnitude0.3"]  # a changed recipe recomputes its cell


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_page_renders_every_figure_in_headless_chromium(tiny_setup, tmp_path):
    from prunewise.recipe import make_recipe
    from prunewise.sweep import run_sweep

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (make test installs it with apt-get)")
    out = tmp_path / "sweep"
    run_sweep(make_recipe(**tiny_setup), ["magnitude", "wanda"], [0.3, 0.6], ["uniform"], out, progress=False)
    page = out / "report.html"
    expected = page.read_text().count("<figure data-figure=")
    assert expected == 5  # perplexity curves, accuracy curves, retention per task, plans, cost
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert f'data-figures-total="{expected}"' in dom and f'data-figures-rendered="{expected}"' in dom
    assert dom.count('data-rendered="yes"') == expected
    # a broken image must be caught: the same page with one figure's data cut off
    broken = tmp_path / "broken.html"
    text = page.read_text()
    start = text.index("base64,") + len("base64,")
    broken.write_text(text[:start] + "AAAA" + text[start + 200:])
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", broken.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert f'data-figures-rendered="{expected - 1}"' in dom


def test_cli_eval_tasks_task_loss_and_sweep(tiny_setup, tmp_path, capsys):
    from prunewise.cli import main

    records = tmp_path / "pairs.jsonl"
    records.write_text("\n".join(json.dumps({"prompt": f"the quick brown {i}", "completion": " fox jumps"})
                                 for i in range(4)) + "\n")
    assert main(["eval", "--model", tiny_setup["model"], "--data", "--tasks", tiny_setup["tasks"][0],
                 "--task-loss", str(records), "--seqlen", "32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "task loss" in out and "nats/token over 4" not in out  # 4 records, more than 4 completion tokens
    assert "| mc | 12 | 0.333 |" in out
    assert main(["sweep", "--model", tiny_setup["model"], "--calibration", tiny_setup["calibration"], "--eval",
                 *tiny_setup["evaluation"], "--eval-tokens", "256", "--eval-seqlen", "32", "--nsamples", "4", "--seqlen", "32",
                 "--scores", "magnitude", "--sparsities", "0.2,0.4", "--no-completions",
                 "--output", str(tmp_path / "sw"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "magnitude-uniform-0.2: finished" in out and "2/2 cells" in out
    assert main(["sweep", "--model", tiny_setup["model"], "--calibration", tiny_setup["calibration"], "--eval",
                 *tiny_setup["evaluation"], "--eval-tokens", "256", "--eval-seqlen", "32", "--nsamples", "4", "--seqlen", "32",
                 "--scores", "magnitude", "--sparsities", "0.2,0.4", "--no-completions",
                 "--output", str(tmp_path / "sw"), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("done before") == 2
    assert main(["eval", "--model", tiny_setup["model"], "--data", "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_cli_harness_prints_both_counts(tiny_setup, capsys):
    pytest.importorskip("lm_eval")
    from prunewise.cli import main

    assert main(["eval", "--model", tiny_setup["model"], "--data", "--tasks", tiny_setup["tasks"][0], "--harness",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("mc ")][0].split()
    assert row[1] == row[2] and row[3] == row[4] and row[1].endswith("/12")  # prunewise == lm-eval, acc and norm


@pytest.mark.parametrize("sig", [pytest.param("SIGTERM", marks=pytest.mark.slow), "SIGINT"])  # SIGINT: the harder one
# (ignored by a background shell's children); SIGTERM takes the same handler, in make test-all
def test_sweep_command_stops_cleanly_on_a_signal(tiny_setup, tmp_path, sig, capsys):
    """Even started in the background (where a shell ignores SIGINT), the command stops with its own message,
    keeps the finished cells and leaves no partial file; the rerun finishes the rest."""
    import os
    import signal
    import sys
    import time

    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "prunewise.cli", "sweep", "--model", tiny_setup["model"], "--calibration",
           tiny_setup["calibration"], "--eval", *tiny_setup["evaluation"], "--eval-tokens", "256", "--eval-seqlen", "32",
           "--nsamples", "4", "--seqlen", "32", "--scores", "magnitude", "--sparsities",
           "0.1,0.2,0.3,0.4", "--no-completions", "--no-progress", "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 120
    while not list((out / "cells").glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "finished cells are kept" in err
    done = sorted(p.name for p in (out / "cells").glob("*.json"))
    assert 1 <= len(done) < 4 and not list((out / "cells").glob(".*"))
    from prunewise.cli import main  # the rerun in this process (a second child would import torch again)

    assert main(cmd[3:]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before") == len(done) and "4/4 cells" in printed


def test_sentence_order_items_offer_the_passage_among_shuffles_of_the_same_words():
    from prunewise.tasks.items import COHERENCE_TASKS, _coherence_items

    name = next(iter(COHERENCE_TASKS))
    first = COHERENCE_TASKS[name][1]
    passage = "Ann went out. She bought bread. Then she came home"  # cut before its last full stop
    shuffles = ["She bought bread. Ann went out. Then she came home.", "Then she came home. She bought bread. Ann "
                "went out.", "She bought bread. Then she came home. Ann went out.", "Another text entirely."]
    records = [{"0": "unused"}] * first + [{"0": passage, **{str(i + 1): v for i, v in enumerate(shuffles)}}] * 3
    items = _coherence_items("\n".join(json.dumps(r) for r in records).encode(), name)
    assert len(items) == 3
    for item in items:
        original = item.choices[item.gold[0]]
        assert original == passage + "."  # the stop the shuffles give that sentence, so it cannot tell them apart
        assert sorted(c.split() for c in item.choices)[0] and len(set(item.choices)) == 4
        assert all(sorted(c.split()) == sorted(original.split()) for c in item.choices)  # the same words
        assert "Another text entirely." not in item.choices
