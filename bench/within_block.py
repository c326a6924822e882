"""Within-block order, measured: sequential (each linear sees its pruned predecessors) vs parallel (every linear
of a block sees the dense block: the Wanda and SparseGPT reference code) vs dense (every linear sees the dense
model: ``--propagate dense``, one pass per block), across seeds and domains.

A cell is SCORE/STRUCTURE/SPARSITY/ORDER/SEED/CALIBRATION, e.g. ``wanda/unstructured/0.5/sequential/0/wiki``
(CALIBRATION:starts draws the windows from document starts instead, see ``document_start_windows``); each
runs in its own process, prunes smollm2-135m with ``--nsamples`` x ``--seqlen`` windows of the calibration corpus drawn
with that seed, and reports perplexity on every evaluation set (wiki-test, code, legal-test by default: the
calibration domain's own test set and two sets from other domains) and its prune seconds. The table gives, per
setting, the mean over seeds and the spread (max - min) of each set's perplexity, the mean log-perplexity over the
sets the calibration did not come from ("out of domain") and on its own test set ("in domain"), and the prune
seconds. JSON after every cell (an interrupted run resumes), markdown table beside it.

    python bench/within_block.py                                   # the default grid (long: ~3 min a cell here)
    python bench/within_block.py --cells wanda/unstructured/0.5/sequential/0/wiki
    python bench/within_block.py --scores wanda --sparsities 0.5 0.7 --seeds 0 1 2 --calibrations wiki
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cells import add_cell_args, dense_first, run_missing, start  # noqa: E402

HERE = Path(__file__).resolve().parent
OWN_TEST = {"wiki": "wiki-test", "code": "code", "legal": "legal-test"}  # the calibration corpus's own test set
ORDERS = ("sequential", "parallel", "dense")  # dense: parallel statistics of the dense model, no pruned outputs fed forward


def grid(args) -> list[str]:
    settings = []
    for score in args.scores:
        for sparsity in args.sparsities:
            settings.append(f"{score}/unstructured/{sparsity}")
        if score == "sparsegpt" and args.nm:
            settings.append(f"{score}/2:4/0.5")
    return [f"{s}/{order}/{seed}/{cal}" for cal in args.calibrations for s in settings for seed in args.seeds
            for order in ORDERS]


def document_start_windows(tokenizer, corpus, nsamples: int, seqlen: int, seed: int = 0):
    """Windows that begin where a document of the corpus begins (a seeded choice of documents), running on into the
    next documents to fill ``seqlen`` tokens of the same token stream: the drawing of calibration tools that take
    each sample from a document's start (llm-compressor's datasets), against prunewise's any-offset windows."""
    import numpy as np
    import torch

    from prunewise.data.windows import tokenize_corpus

    tokens = tokenize_corpus(tokenizer, corpus)
    enc = tokenizer(corpus.text(), add_special_tokens=False, return_offsets_mapping=True)
    if not torch.equal(torch.as_tensor(enc["input_ids"], dtype=torch.long), tokens.long()):
        raise SystemExit("within_block.py: the tokenizer's offsets do not describe the corpus's token stream")
    first_char = np.array([start for start, _ in enc["offset_mapping"]])
    doc_chars = np.cumsum([0] + [len(d) + 2 for d in corpus.documents[:-1]])  # documents are joined by "\n\n"
    starts = np.searchsorted(first_char, doc_chars)
    starts = torch.as_tensor(starts[starts + seqlen <= tokens.numel()])
    if starts.numel() < nsamples:
        raise SystemExit(f"within_block.py: only {starts.numel()} documents start a full window; need {nsamples}")
    pick = starts[torch.randperm(starts.numel(), generator=torch.Generator().manual_seed(int(seed)))[:nsamples]]
    return tokens[pick[:, None] + torch.arange(seqlen)[None, :]].contiguous()


DRAWINGS = {"starts": document_start_windows}  # CALIBRATION:DRAWING; without one, prunewise's own windows


def run_cell(args, cell: str) -> dict:
    from prunewise.api import evaluate, prune
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    score, structure, sparsity, order, seed, calibration = cell.split("/")
    calibration, _, drawing = calibration.partition(":")
    if drawing:  # this cell's windows drawn another way: the one function that draws them, replaced in this process
        import prunewise.data.mixture as mixture

        mixture.calibration_windows = DRAWINGS[drawing]
    recipe = make_recipe(model=args.model, score=score, structure=structure,
                         sparsity=None if ":" in structure else float(sparsity), calibration=calibration,
                         nsamples=args.nsamples, seqlen=args.seqlen, seed=int(seed),
                         within_block="parallel" if order == "dense" else order,
                         propagate="dense" if order == "dense" else "pruned",
                         evaluation=args.eval, eval_tokens=args.eval_tokens)
    model, tok = load_model(recipe.model)
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    seconds = time.perf_counter() - t0
    ppl = evaluate(model, tok, args.eval, args.eval_tokens, 512, progress=False)
    return {"cell": cell, "prune_s": seconds, "achieved": result.report["achieved_sparsity"], "perplexity": ppl,
            "walk": result.report.get("walk")}


def summarise(results: dict, args) -> list[dict]:
    """One row per setting and order: means and spreads over the seeds measured."""
    groups: dict[tuple, list[dict]] = {}
    for key, r in results["cells"].items():
        score, structure, sparsity, order, seed, cal = key.split("/")
        groups.setdefault((score, structure, sparsity, cal, order), []).append(r)
    rows = []
    for (score, structure, sparsity, cal, order), rs in sorted(groups.items()):
        own = OWN_TEST.get(cal.partition(":")[0])
        others = [s for s in args.eval if s != own]
        row = {"score": score, "structure": structure, "sparsity": sparsity, "calibration": cal, "order": order,
               "seeds": len(rs), "prune_s": sum(r["prune_s"] for r in rs) / len(rs)}
        for s in args.eval:
            vals = [r["perplexity"][s] for r in rs]
            row[s] = (sum(vals) / len(vals), max(vals) - min(vals))
        logs = [sum(math.log(r["perplexity"][s]) for s in others) / len(others) for r in rs]
        row["out_log"] = (sum(logs) / len(logs), max(logs) - min(logs))
        if own in args.eval:
            own_logs = [math.log(r["perplexity"][own]) for r in rs]
            row["in_log"] = (sum(own_logs) / len(own_logs), max(own_logs) - min(own_logs))
        rows.append(row)
    return rows


def table(results: dict, args) -> str:
    sets = args.eval
    head = ["score", "structure", "sparsity", "calibration", "order", "seeds"] + \
           [f"{s} mean (spread)" for s in sets] + ["in-domain log-ppl", "out-of-domain log-ppl", "prune s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| dense | - | 0 | - | - | - | " + " | ".join(f"{results['dense'][s]:.2f}" for s in sets) + " | - | - | - |"]
    for r in summarise(results, args):
        cells = [f"{r[s][0]:.2f} ({r[s][1]:.2f})" for s in sets]
        inl = f"{r['in_log'][0]:.4f} ({r['in_log'][1]:.4f})" if "in_log" in r else "-"
        lines.append(f"| {r['score']} | {r['structure']} | {r['sparsity']} | {r['calibration']} | {r['order']} | "
                     f"{r['seeds']} | " + " | ".join(cells) +
                     f" | {inl} | {r['out_log'][0]:.4f} ({r['out_log'][1]:.4f}) | {r['prune_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scores", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--sparsities", nargs="+", default=["0.5", "0.7"])
    ap.add_argument("--no-nm", dest="nm", action="store_false", help="leave out SparseGPT 2:4")
    ap.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    ap.add_argument("--calibrations", nargs="+", default=["wiki", "code"])
    ap.add_argument("--eval", nargs="+", default=["wiki-test", "code", "legal-test"])
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    add_cell_args(ap, HERE / "results" / "within_block.json", "cells SCORE/STRUCTURE/SPARSITY/ORDER/SEED/CALIBRATION")
    args = ap.parse_args()
    keys = ("model", "nsamples", "seqlen", "eval_tokens", "eval")
    results = start(args, run_cell, keys)
    if results is None:
        return

    out = Path(args.out)
    dense_first(results, out, args)
    run_missing(results, out, args.cells or grid(args), __file__, args, keys,
                lambda r: " ".join(f"{s} {v:.2f}" for s, v in r["perplexity"].items()) + f", {r['prune_s']:.1f} s")
    md = out.with_suffix(".md")
    md.write_text(f"# Within-block order, measured\n\n`{results['command']}` ({results['threads']} threads)\n\n"
                  + table(results, args) + "\n")
    print(md.read_text())


if __name__ == "__main__":
    main()
