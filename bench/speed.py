"""Speed and size benchmark: dense vs pruned causal LM folders on CPU, measured A/B interleaved.

For each model folder (NAME=PATH) it reports
  * size: total parameters (tied tensors once), decoder-block parameters (names containing ``.layers.``),
    the share of exactly-zero weights in the block linears (unstructured / 2:4 pruning leaves zeros but no
    smaller tensors), the folder size (sum of ``*.safetensors``), and whether folder size follows params;
  * prefill: one forward of batch 1 x ``--prefill-tokens`` with ``use_cache=True``; tok/s = tokens / seconds;
  * decode: greedy with the KV cache, written as an explicit loop: a ``--prompt-tokens`` prompt is prefilled
    (untimed), then ``--decode-tokens`` single-token steps feed back the argmax and ``past_key_values``; only
    those steps are timed. Once per model, outside timing, the cached steps are checked against an uncached
    forward over the same tokens.
All models are loaded in one process and run on the same fixed token ids. After ``--warmup`` untimed rounds,
each of ``--rounds`` rounds runs every model once (prefill, then decode), the order rotating every round so no
model is always first. Speedup = median over rounds of (model tok/s / baseline tok/s in that same round); the
ratio of medians is reported too. Ideal speedup = baseline params / model params; efficiency = speedup / ideal.

    python bench/speed.py --models dense=out/dense w50=out/w50 --threads 2
    python bench/speed.py --models dense=out/dense w25=out/w25 w50=out/w50 --baseline dense --rounds 9 \\
        --prefill-tokens 256 --decode-tokens 64 --out bench/results/speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM


def parse_models(pairs: list[str]) -> dict[str, Path]:
    """Turn NAME=PATH pairs into an ordered {name: folder}, failing with a one-line message."""
    models: dict[str, Path] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --models entry {pair!r} is not NAME=PATH")
        if name in models:
            raise SystemExit(f"error: duplicate model name {name!r} in --models")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise SystemExit(f"error: model folder {str(folder)!r} (for {name!r}) does not exist")
        if not (folder / "config.json").is_file():
            raise SystemExit(f"error: model folder {str(folder)!r} (for {name!r}) has no config.json")
        models[name] = folder
    if len(models) < 2:
        raise SystemExit("error: --models needs at least 2 NAME=PATH pairs (a baseline and one to compare)")
    return models


def size_stats(model: torch.nn.Module, folder: Path) -> dict:
    """Parameter counts, zeros in the decoder-block linears, and the safetensors folder size."""
    params = sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once
    block = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    zeros = linear_numel = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            zeros += int((module.weight == 0).sum())
            linear_numel += module.weight.numel()
    folder_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"params": params, "block_params": block, "block_linear_zeros": zeros,
            "block_linear_numel": linear_numel, "zeros_pct": 100.0 * zeros / max(linear_numel, 1),
            "folder_bytes": folder_bytes}


def forward(model: torch.nn.Module, ids: torch.Tensor, past: object | None = None) -> object:
    """One cached forward; returns the model output (logits, past_key_values)."""
    return model(input_ids=ids, past_key_values=past, use_cache=True)


def time_prefill(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Seconds for one prefill forward of ``ids`` (cache built, as in serving)."""
    t0 = time.perf_counter()
    forward(model, ids)
    return time.perf_counter() - t0


def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[float, list[torch.Tensor]]:
    """Prefill the prompt (untimed), then time ``steps`` single-token cached steps. Returns seconds and step logits."""
    out = forward(model, prompt)
    if out.past_key_values is None:
        raise SystemExit(f"error: {type(model).__name__} returned no past_key_values with use_cache=True")
    past, logits = out.past_key_values, [out.logits[:, -1]]
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = logits[-1].argmax(dim=-1, keepdim=True)
        out = forward(model, nxt, past)
        past = out.past_key_values
        logits.append(out.logits[:, -1])
    return time.perf_counter() - t0, logits


def check_model(name: str, model: torch.nn.Module, prefill: torch.Tensor, prompt: torch.Tensor) -> None:
    """Finite logits on the prefill input, and cached greedy steps that agree with one uncached forward."""
    logits = forward(model, prefill).logits
    if not torch.isfinite(logits).all():
        raise SystemExit(f"error: model {name!r} gives non-finite logits on the prefill input")
    _, step_logits = greedy_decode(model, prompt, 4)
    tokens = torch.cat([prompt] + [lg.argmax(-1, keepdim=True) for lg in step_logits[:-1]], dim=1)
    full = model(input_ids=tokens, use_cache=False).logits[:, prompt.shape[1] - 1:]
    cached = torch.stack(step_logits, dim=1)
    err = (full - cached).abs().max().item() / max(full.abs().max().item(), 1e-6)
    if err > 1e-3:
        raise SystemExit(f"error: model {name!r}: cached decode disagrees with an uncached forward "
                         f"(relative max diff {err:.2e}); the KV-cache loop does not fit this model")


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def fmt_table(rows: list[dict]) -> str:
    head = ["model", "params (M)", "decoder params (M)", "zeros in blocks (%)", "folder MB", "ideal speedup",
            "prefill tok/s", "prefill speedup", "prefill efficiency", "decode tok/s", "decode speedup",
            "decode efficiency", "size ratio / param ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['params'] / 1e6:.2f}", f"{r['block_params'] / 1e6:.2f}", f"{r['zeros_pct']:.1f}",
                 f"{r['folder_bytes'] / 1e6:.1f}", f"{r['ideal_speedup']:.2f}x",
                 f"{r['prefill']['median_tok_s']:.1f}", f"{r['prefill']['speedup']:.2f}x",
                 f"{r['prefill']['efficiency']:.0%}", f"{r['decode']['median_tok_s']:.1f}",
                 f"{r['decode']['speedup']:.2f}x", f"{r['decode']['efficiency']:.0%}",
                 f"{r['size_ratio']:.3f} / {r['param_ratio']:.3f} ({r['size_vs_param_rel_diff']:+.1%})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", required=True, metavar="NAME=PATH")
    ap.add_argument("--baseline", help="name of the baseline model (default: the first)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/speed.json"))
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="verify finite logits and the KV-cache loop before timing (default: on)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    paths = parse_models(args.models)
    names = list(paths)
    baseline = args.baseline or names[0]
    if baseline not in paths:
        raise SystemExit(f"error: --baseline {baseline!r} is not one of the --models names {names}")
    if min(args.rounds, args.prefill_tokens, args.decode_tokens, args.prompt_tokens) < 1 or args.warmup < 0:
        raise SystemExit("error: --rounds and the token counts must be >= 1, --warmup >= 0")

    with torch.inference_mode():
        models, sizes = {}, {}
        for name, folder in paths.items():
            print(f"loading {name} from {folder}", flush=True)
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
            models[name], sizes[name] = model, size_stats(model, folder)
        vocab = min(m.config.get_text_config().vocab_size for m in models.values())
        if vocab <= 101:
            raise SystemExit(f"error: vocab size {vocab} is too small to draw ids from [100, vocab-1)")
        gen = torch.Generator().manual_seed(args.seed)
        prefill_ids = torch.randint(100, vocab - 1, (1, args.prefill_tokens), generator=gen)
        prompt_ids = torch.randint(100, vocab - 1, (1, args.prompt_tokens), generator=gen)
        if args.check:
            for name, model in models.items():
                check_model(name, model, prefill_ids, prompt_ids)
            print("check: finite logits and cached decode == uncached forward for every model", flush=True)

        timings = {n: {"prefill_s": [], "decode_s": []} for n in names}
        for r in range(-args.warmup, args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                pre = time_prefill(models[name], prefill_ids)
                dec, _ = greedy_decode(models[name], prompt_ids, args.decode_tokens)
                if r >= 0:
                    timings[name]["prefill_s"].append(pre)
                    timings[name]["decode_s"].append(dec)
            label = f"warmup {r + args.warmup + 1}/{args.warmup}" if r < 0 else f"round {r + 1}/{args.rounds}"
            print(f"{label} done (order: {', '.join(order)})", flush=True)

    tok = {"prefill": args.prefill_tokens, "decode": args.decode_tokens}
    tok_s = {n: {k: [tok[k] / s for s in timings[n][f"{k}_s"]] for k in tok} for n in names}
    base, rows = sizes[baseline], []
    for n in names:
        ideal = base["params"] / sizes[n]["params"]
        size_ratio = sizes[n]["folder_bytes"] / max(base["folder_bytes"], 1)
        param_ratio = sizes[n]["params"] / base["params"]
        row = {"name": n, "folder": str(paths[n]), **sizes[n], "ideal_speedup": ideal, "size_ratio": size_ratio,
               "param_ratio": param_ratio, "size_vs_param_rel_diff": size_ratio / param_ratio - 1}
        for k in tok:
            med, base_med = statistics.median(tok_s[n][k]), statistics.median(tok_s[baseline][k])
            speedup = median_ratio(tok_s[n][k], tok_s[baseline][k])
            row[k] = {"seconds": timings[n][f"{k}_s"], "tok_s": tok_s[n][k], "median_tok_s": med,
                      "speedup": speedup, "speedup_ratio_of_medians": med / base_med,
                      "efficiency": speedup / ideal}
        rows.append(row)

    command = shlex.join(["python", "bench/speed.py", *(argv if argv is not None else sys.argv[1:])])
    omp = os.environ.get("OMP_NUM_THREADS")
    result = {"settings": {"baseline": baseline, "threads": threads, "OMP_NUM_THREADS": omp, "rounds": args.rounds,
                           "warmup": args.warmup, "prefill_tokens": args.prefill_tokens,
                           "decode_tokens": args.decode_tokens, "prompt_tokens": args.prompt_tokens,
                           "seed": args.seed, "vocab_for_ids": vocab, "check": args.check, "dtype": "float32",
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version(), "machine": platform.machine(),
                           "cpu_count": os.cpu_count(), "command": command},
              "models": rows}
    table = fmt_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(
        f"{table}\n\nthreads={threads}, rounds={args.rounds} (median), baseline={baseline}; "
        f"speedup = median of per-round ratios; efficiency = speedup / ideal.\n\n    {command}\n")
    print(f"\n{table}\n\nwrote {args.out} and {args.out.with_suffix('.md')}\nreproduce: {command}")


if __name__ == "__main__":
    main()
