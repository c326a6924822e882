"""Side by side with llm-compressor: prune seconds, peak memory and perplexity, same model, windows and threads.

llm-compressor (pinned by ``bench/peer_constraints.txt``) is installed into its own virtualenv under the
prunewise cache (``<cache>/peer/llmcompressor-0.14.0``), never into the project's environment. Both tools
prune the same dense checkpoint (the default model, saved once as a safetensors folder) with the same
calibration token ids (prunewise draws its own windows and the child checks they are these), each in its
own process with the same thread count; the two tools alternate from cell to cell so the machine's noise
hits both. Every child also times a plain forward (window by window, no hooks) over the same windows, the
yardstick each tool's time is divided by (``--forward once``: one forward per run, timed before the first cell). Both exports are then evaluated by the same code (prunewise's
perplexity, the default evaluation sets), so speed is never bought with quality.

    python bench/peer.py                      # Wanda and SparseGPT at 50% and 2:4 (~45 min on 2 CPU cores)
    python bench/peer.py --cells wanda/0.5    # one cell
    python bench/peer.py --table              # the table of the results so far
    python bench/peer.py --cells sparsegpt/0.5 --variant within_block=parallel   # prunewise with a recipe change
    python bench/peer.py --cells sparsegpt/2:4 --rerun both   # the cell again, both tools (earlier runs kept aside)

A ``--variant`` (recipe fields for prunewise's side) is a row of its own, ``prunewise[within_block=parallel]``,
beside the same cell's llm-compressor and default prunewise rows: differences removed one at a time.

Results go to ``bench/results/peer.json`` (after every child: an interrupted run resumes) and ``peer.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cells import add_window_args, plain_forward_seconds  # noqa: E402

HERE = Path(__file__).resolve().parent
PEER = "llmcompressor==0.14.0"
TOOLS = ("llm-compressor", "prunewise")
CELLS = ["wanda/0.5", "sparsegpt/0.5", "wanda/2:4", "sparsegpt/2:4"]
SETTINGS = ("model", "calibration", "nsamples", "seqlen", "eval", "eval_tokens", "threads", "forward")


def peer_python() -> Path:
    """The peer's virtualenv (built once, from pinned versions): its python."""
    from prunewise.cache import cache_root

    venv = cache_root() / "peer" / PEER.replace("==", "-")
    py = venv / "bin" / "python"
    if (venv / ".installed").is_file():
        return py
    print(f"installing {PEER} into {venv} (once; pinned by bench/peer_constraints.txt) ...", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(py), "-m", "pip", "install", "--quiet", "-c", str(HERE / "peer_constraints.txt"),
              "torch==2.13.0", PEER]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            sys.exit(f"peer.py: could not install {PEER} into {venv}: {tail[0]}")
    (venv / ".installed").touch()
    return py


def prepare(args, work: Path) -> None:
    """The dense checkpoint both tools read, and the calibration token ids both use."""
    if (work / "windows.pt").is_file() and (work / "dense" / "config.json").is_file() and \
            tuple(torch.load(work / "windows.pt").shape) == (args.nsamples, args.seqlen):
        return
    from prunewise.data import calibration_windows, get_corpus
    from prunewise.models.loading import load_model

    model, tok = load_model(args.model)
    shutil.rmtree(work / "dense", ignore_errors=True)
    model.save_pretrained(work / "dense")
    tok.save_pretrained(work / "dense")
    windows = calibration_windows(tok, get_corpus(args.calibration, "calibration"), args.nsamples, args.seqlen)
    torch.save(windows, work / "windows.pt.tmp")
    os.replace(work / "windows.pt.tmp", work / "windows.pt")


def prunewise_child(args) -> None:
    """One prunewise prune in this process (``--_child``): the same JSON line as the peer's child."""
    from prunewise.api import peak_rss_mb, prune
    from prunewise.data.mixture import calibration_spec_windows
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    torch.set_num_threads(args.threads)
    work, (method, structure) = Path(args.work), args._child.split("/")
    model, tok = load_model(str(work / "dense"))
    windows = torch.load(work / "windows.pt")
    forward_s = plain_forward_seconds(model, windows) if args.forward == "each" else None
    recipe = make_recipe(model=str(work / "dense"), score=method, calibration=args.calibration,
                         nsamples=args.nsamples, seqlen=args.seqlen, evaluation=[],
                         **({"structure": structure} if ":" in structure else {"sparsity": float(structure)}),
                         **variant_fields(args.variant))
    if not torch.equal(calibration_spec_windows(tok, recipe.calibration, args.nsamples, args.seqlen, recipe.seed),
                       windows):
        sys.exit("peer.py: prunewise would calibrate on other windows than the peer's")
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    prune_s = time.perf_counter() - t0
    peak = peak_rss_mb()
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(json.dumps({"forward_s": forward_s, "prune_s": prune_s, "peak_rss_mb": peak,
                      "timings": result.report["timings"]}))


def variant_fields(pairs: list[str] | None) -> dict:
    """``["within_block=parallel", "damp=0.02"]`` -> recipe fields (numbers as numbers)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"peer.py: --variant takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def set_aside(runs: dict, key: str) -> None:
    """Keep a finished run under ``KEY (earlier run N)`` so that the cell runs again (the table shows the new one)."""
    if key in runs:
        n = 1 + sum(k.startswith(f"{key} (earlier run ") for k in runs)
        runs[f"{key} (earlier run {n})"] = runs.pop(key)


def tool_label(args) -> str:
    return "prunewise" + (f"[{','.join(args.variant)}]" if args.variant else "")


def run_child(tool: str, cell: str, args, work: Path, out: Path) -> dict:
    method, structure = cell.split("/")
    if tool.startswith("prunewise"):
        cmd = [sys.executable, __file__, "--_child", cell, "--work", str(work), "--out", str(out),
               "--threads", str(args.threads), "--model", args.model, "--calibration", args.calibration,
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--forward", args.forward]
        cmd += ["--variant", *args.variant] if args.variant else []
    else:
        cmd = [str(peer_python()), str(HERE / "_peer_llmc.py"), method, structure, str(work), str(out),
               str(args.threads), args.forward]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        sys.exit(f"peer.py: {tool} {cell} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sparsity_of(model) -> float:
    """Share of zeros over the decoder's linear weights (the lm_head and embeddings excluded)."""
    zeros = total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / total


def evaluate_folder(folder: Path, args) -> dict:
    from prunewise.api import evaluate
    from prunewise.models.loading import load_model

    model, tok = load_model(str(folder))
    ppl = evaluate(model, tok, args.eval, args.eval_tokens, 512, calibration=args.calibration, progress=False)
    return {"perplexity": ppl, "achieved": sparsity_of(model)}


def table(results: dict, args) -> str:
    cols = args.eval
    dense = results.get("dense")
    head = ["cell", "tool", "prune s", "plain forward s", "x forward", "x llm-compressor", "peak RSS MB",
            "achieved"] + [f"ppl {c}" for c in cols] + ["ppl vs llm-compressor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if dense:
        lines.append("| dense | - | - | - | - | - | - | 0 | " +
                     " | ".join(f"{dense['perplexity'][c]:.2f}" for c in cols) + " | - |")
    for cell in CELLS:
        peer = results["runs"].get(f"llm-compressor/{cell}")
        tools = list(TOOLS) + sorted({k.rsplit("/", 2)[0] for k in results["runs"]} - set(TOOLS))
        for tool in tools:
            r = results["runs"].get(f"{tool}/{cell}")
            if not r:
                continue
            vs = f"{r['prune_s'] / peer['prune_s']:.2f}" if peer else "-"
            ppl = " | ".join(f"{r['perplexity'][c]:.2f}" for c in cols) if "perplexity" in r else " | ".join("-" for _ in cols)
            if peer and "perplexity" in r and "perplexity" in peer:
                rel = ", ".join(f"{100 * (r['perplexity'][c] / peer['perplexity'][c] - 1):+.2f}%" for c in cols)
            else:
                rel = "-"
            ach = f"{r['achieved']:.4f}" if "achieved" in r else "-"
            lines.append(f"| {cell} | {tool} | {r['prune_s']:.1f} | {r['forward_s']:.1f} | "
                         f"{r['prune_s'] / r['forward_s']:.2f} | {vs} | {r['peak_rss_mb']:.0f} | {ach} | {ppl} | {rel} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibration", default="wiki")
    ap.add_argument("--eval", nargs="+", default=["wiki-test", "code"])
    add_window_args(ap)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--forward", choices=("each", "once"), default="each",
                    help="time the plain forward in every child, beside its prune (default), or once per run, "
                         "in this process, before the first cell")
    ap.add_argument("--cells", nargs="+", choices=CELLS, help="method/structure (default: all four)")
    ap.add_argument("--out", default=str(HERE / "results" / "peer.json"))
    ap.add_argument("--work", help="folder for the dense checkpoint, the windows and the exports "
                                   "(default: <cache>/peer/work)")
    ap.add_argument("--variant", nargs="+", metavar="KEY=VALUE",
                    help="recipe fields for prunewise's side (a row of its own; llm-compressor runs only if missing)")
    ap.add_argument("--rerun", choices=("llm-compressor", "prunewise", "both"),
                    help="run these tools' cells again: their finished runs are kept in the JSON as '(earlier run N)', "
                         "out of the table")
    ap.add_argument("--table", action="store_true", help="print the table of the results so far")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        return prunewise_child(args)
    from prunewise.cache import cache_root

    out = Path(args.out)
    settings = {k: getattr(args, k) for k in SETTINGS}
    results = json.loads(out.read_text()) if out.is_file() else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "runs": {}}
    results["command"] = "python bench/peer.py " + " ".join(sys.argv[1:])
    if args.table:
        print(table(results, args))
        return
    work = Path(args.work) if args.work else cache_root() / "peer" / "work"
    work.mkdir(parents=True, exist_ok=True)
    peer_python()
    prepare(args, work)
    if args.forward == "once" and "forward_s" not in results:
        from prunewise.models.loading import load_model

        torch.set_num_threads(args.threads)
        model, _ = load_model(str(work / "dense"))
        results["forward_s"] = plain_forward_seconds(model, torch.load(work / "windows.pt"))
        print(f"plain forward over the windows: {results['forward_s']:.1f} s", flush=True)
        del model
    if args.rerun:
        again = {TOOLS[0], tool_label(args)} if args.rerun == "both" else \
            {TOOLS[0] if args.rerun == TOOLS[0] else tool_label(args)}
        for cell in args.cells or CELLS:
            for tool in again:
                set_aside(results["runs"], f"{tool}/{cell}")
    for i, cell in enumerate(args.cells or CELLS):
        tools = (TOOLS[0], tool_label(args))
        order = tools if i % 2 == 0 else tools[::-1]  # alternate which tool runs first
        for tool in order:
            key = f"{tool}/{cell}"
            if "perplexity" in results["runs"].get(key, {}):
                continue
            export = work / "exports" / key.replace("/", "_").replace(":", "of")
            if key not in results["runs"]:
                print(f"{key}: pruning ...", flush=True)
                results["runs"][key] = run_child(tool, cell, args, work, export)
                r = results["runs"][key]
                r["forward_s"] = r["forward_s"] or results["forward_s"]
                print(f"  prune {r['prune_s']:.1f} s, forward {r['forward_s']:.1f} s, "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
                out.write_text(json.dumps(results, indent=1))
    print("evaluating the exports ...", flush=True)
    if "dense" not in results:
        results["dense"] = evaluate_folder(work / "dense", args)
        out.write_text(json.dumps(results, indent=1))
    for key, r in results["runs"].items():
        if "perplexity" not in r and "earlier run" not in key:
            r.update(evaluate_folder(work / "exports" / key.replace("/", "_").replace(":", "of"), args))
            print(f"  {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["perplexity"].items()), flush=True)
            out.write_text(json.dumps(results, indent=1))
    md = table(results, args)
    when = "in each tool's process beside its prune" if args.forward == "each" else "once, before the first cell"
    out.with_suffix(".md").write_text(
        f"# prunewise beside llm-compressor\n\n`{results['command']}` ({args.threads} threads, {args.nsamples} x "
        f"{args.seqlen} windows of {args.calibration}, {args.model} in float32; perplexity on {args.eval_tokens} "
        f"tokens of each set, both exports evaluated by the same code; the plain forward timed "
        f"{when}).\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
