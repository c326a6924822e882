"""Scale: memory and time of out-of-core pruning on Llama-shaped checkpoints from 0.5B to 13B parameters.

Each size is a random-weight Llama-architecture checkpoint written in bfloat16, shard by shard, with a
fixed seed (a fixture in the prunewise cache, never in git; ``--drop-fixtures`` deletes each after
use). It is pruned with Wanda 50% streamed from disk (``--offload disk``) on 4 x 128 calibration
tokens of ``wiki``, and, where the model fits in memory, in memory as well. Reported per size and
mode: peak RSS and the process's baseline once torch and transformers are imported, seconds per
block, bytes read and written, the output's size, and (peak - baseline) / one block's bytes.
Random weights measure memory and time, not quality.

The shapes follow the public configs (hidden, MLP, layers, heads, key/value heads); every size uses
the default model's tokenizer, so the vocabulary is 49,152 (Llama-2's is 32,000: its embedding and
head are about 50% larger here, under 4% of the 7B and 13B models).

    python bench/scale.py --sizes 0.5b 1.5b            # JSON + table in bench/results/scale.*
    python bench/scale.py --sizes 13b --drop-fixtures  # about 26 GB in, 26 GB out
    python bench/scale.py --cells qwen-wanda-exact qwen-sparsegpt-exact qwen-flap-exact
    python bench/scale.py --sizes 7b-4l --memory                   # the 7B block, streamed, in minutes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cells import add_cell_args, run_cell_process, start  # noqa: E402

HERE = Path(__file__).resolve().parent
VOCAB = 49152
SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "0.5b": (896, 4864, 24, 14, 2),      # Qwen2.5-0.5B
    "1.5b": (1536, 8960, 28, 12, 2),     # Qwen2.5-1.5B
    "3b": (2048, 11008, 36, 16, 2),      # Qwen2.5-3B
    "7b": (4096, 11008, 32, 32, 32),     # Llama-2-7B
    "13b": (5120, 13824, 40, 40, 40),    # Llama-2-13B
    "7b-4l": (4096, 11008, 4, 32, 32),   # Llama-2-7B's block shape, 4 blocks: the per-block time without 13.8 GB
}
SHARD_BYTES = 2 << 30
# mixtures of experts (hidden, expert intermediate, layers, heads, kv heads, experts, experts per token), saved as
# transformers 5 saves them (each expert's matrices under its own names); pruned by removing half the routed experts
MOE_SHAPES = {
    "olmoe-7b": (2048, 1024, 16, 16, 16, 64, 8),  # OLMoE-1B-7B: 6.9B parameters, 13.8 GB in bf16
    "olmoe-7b-2l": (2048, 1024, 2, 16, 16, 64, 8),  # its block, 2 blocks: the memory per block in a minute
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fixture(size: str, seed: int = 0) -> Path:
    """The random bf16 checkpoint of ``size`` (written once, shard by shard, into the cache)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from prunewise.cache import cache_dir
    from prunewise.models.lazy import INDEX, empty_model
    from prunewise.models.loading import fetch_model

    folder = cache_dir("scale") / f"{'' if size in MOE_SHAPES else 'llama-'}{size}-bf16-seed{seed}"
    if (folder / INDEX).exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if size in MOE_SHAPES:
        from transformers import OlmoeConfig

        hidden, inter, layers, heads, kv, experts, top_k = MOE_SHAPES[size]
        config = OlmoeConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, num_experts=experts,
                             num_experts_per_tok=top_k, max_position_embeddings=4096, tie_word_embeddings=False,
                             dtype="bfloat16")
    else:
        hidden, inter, layers, heads, kv = SHAPES[size]
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                             tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(fetch_model("smollm2-135m")).save_pretrained(tmp)
    model = empty_model(tmp, torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    shards, current, size_now, weight_map, total = [], {}, 0, {}, 0

    def flush():
        nonlocal current, size_now
        if current:
            name = f"part-{len(shards):05d}.safetensors"
            save_file(current, str(tmp / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size_now = {}, 0

    def tensors():  # name on disk -> tensor; a fused expert tensor as its experts' matrices, expert by expert
        for name, p in model.named_parameters():
            if p.dim() == 1:
                yield name, torch.ones(p.shape, dtype=torch.bfloat16)
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                parts = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
                rows = p.shape[1] // len(parts)
                for e in range(p.shape[0]):
                    for part in parts:
                        yield (f"{name.rsplit('.', 1)[0]}.{e}.{part}.weight",
                               (torch.randn(rows, p.shape[2], generator=gen) * 0.02).to(torch.bfloat16))
            else:
                yield name, (torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)

    for name, t in tensors():
        current[name] = t
        size_now += t.numel() * 2
        total += t.numel() * 2
        if size_now >= SHARD_BYTES:
            flush()
    flush()
    for i, (name, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.rename(tmp / name, tmp / final)
        weight_map.update(dict.fromkeys(names, final))
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    os.rename(tmp, folder)
    return folder


EXACT = {"qwen-wanda-exact": {"score": "wanda"}, "qwen-sparsegpt-exact": {"score": "sparsegpt"},
         "qwen-flap-exact": {"score": "fluctuation", "structure": "width", "sparsity": 0.2, "allocation": "global",
                             "compensation": ["bias"]}}


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            for name in handle.keys():
                t = handle.get_tensor(name)
                out[name] = hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def check_saved(folder: Path, source: Path) -> dict:
    """Open every output shard, check the index names every tensor of the source (ties aside) and only files that
    exist, and count the zeros of each block linear in the saved tensors, one tensor at a time."""
    from safetensors import safe_open

    from prunewise.models.lazy import INDEX

    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    source_names = set(json.loads((source / INDEX).read_text())["weight_map"])
    shards = sorted(set(weight_map.values()))
    sparsity, seen = {}, set()
    for shard in shards:
        with safe_open(str(folder / shard), "pt") as handle:
            for name in handle.keys():
                seen.add(name)
                if ".layers." in name and name.endswith("proj.weight"):
                    t = handle.get_tensor(name)
                    sparsity[name] = round(float((t == 0).sum()) / t.numel(), 6)
                    del t
    return {"shards": len(shards), "shards_opened": len(shards), "index_complete": seen == set(weight_map)
            and source_names <= set(weight_map), "saved_modules": len(sparsity),
            "saved_sparsity": sorted(set(sparsity.values()))}


def exact_cell(args, cell: str) -> dict:
    """qwen2.5-coder-0.5b pruned in memory and streamed from disk: are the saved tensors bit-identical?"""
    from prunewise.api import run
    from prunewise.errors import PrunewiseError
    from prunewise.recipe import make_recipe

    row = {"cell": cell}
    hashes = {}
    for offload in ("none", "disk"):
        out = Path(args.scratch) / f"{cell}-{offload}"
        recipe = make_recipe(model="qwen2.5-coder-0.5b", calibration="wiki", nsamples=4, seqlen=128, evaluation=[],
                             completions=False, offload=offload, output=str(out), overwrite=True, **EXACT[cell])
        try:
            t0 = time.perf_counter()
            run(recipe, progress=False)
            row[f"{offload}_s"] = time.perf_counter() - t0
        except PrunewiseError as exc:
            row[f"{offload}_error"] = str(exc)
            continue
        hashes[offload] = _hashes(out)
        shutil.rmtree(out, ignore_errors=True)
    if len(hashes) == 2:
        a, b = hashes["none"], hashes["disk"]
        row.update(tensors=len(a), identical=sum(a[k] == b.get(k) for k in a), same_names=a.keys() == b.keys())
    return row


def run_cell(args, cell: str) -> dict:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from prunewise.api import run
    from prunewise.recipe import make_recipe

    if cell in EXACT:
        return exact_cell(args, cell)
    size, mode = cell.rsplit("-", 1)
    if size in MOE_SHAPES:
        return moe_cell(args, cell, size, mode)
    t0 = time.perf_counter()
    folder = fixture(size)
    fixture_s = time.perf_counter() - t0
    baseline = _rss_mb()  # after imports (the fixture was written by another process)
    out = Path(args.scratch) / f"scale-{cell}"
    recipe = make_recipe(model=str(folder), score="wanda", sparsity=0.5, calibration="wiki", nsamples=4, seqlen=128,
                         evaluation=[], completions=False, offload="disk" if mode == "disk" else "none",
                         output=str(out), overwrite=True, dtype="bfloat16", device="cpu")
    t0 = time.perf_counter()
    report = run(recipe, progress=False)
    seconds = time.perf_counter() - t0
    hidden, inter, layers, heads, kv = SHAPES[size]
    head_dim = hidden // heads
    block_params = hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden + 3 * hidden * inter + 2 * hidden
    out_bytes = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
    peak = _rss_mb()  # before the check below reads the output back
    saved = check_saved(out, folder) if mode == "disk" else {}
    shutil.rmtree(out, ignore_errors=True)
    return {"size": size, "mode": mode, "layers": layers, "block_bytes": block_params * 2,
            "checkpoint_bytes": sum(f.stat().st_size for f in folder.glob("model*.safetensors")),
            "baseline_rss_mb": baseline, "peak_rss_mb": peak,
            "peak_over_block": (peak - baseline) * 2**20 / (block_params * 2),
            "seconds": seconds, "prune_s": report["timings"]["prune_s"],
            "s_per_block": report["timings"]["prune_s"] / layers, "fixture_s": fixture_s,
            "bytes_read": report.get("offload", {}).get("bytes_read"),
            "bytes_written": report.get("offload", {}).get("bytes_written"), "output_bytes": out_bytes,
            "achieved_sparsity": report["achieved_sparsity"],
            "module_sparsity": sorted({round(m["sparsity"], 6) for m in report["modules"].values()}), **saved}


def moe_cell(args, cell: str, size: str, mode: str) -> dict:
    """Half the routed experts of the random OLMoE-shaped checkpoint removed by REAP on 4 x 128 wiki tokens, streamed
    from disk; the output read back: every shard opened, the index complete, the model stock transformers builds
    from the saved config (on the meta device) holding exactly the saved tensors' names and shapes, and each layer's
    saved expert tensors equal to the source's kept experts."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunewise.api import run
    from prunewise.core.masks import MaskSet
    from prunewise.models.lazy import INDEX
    from prunewise.recipe import make_recipe

    t0 = time.perf_counter()
    folder = fixture(size)
    fixture_s = time.perf_counter() - t0
    baseline = _rss_mb()
    out = Path(args.scratch) / f"scale-{cell}"
    recipe = make_recipe(model=str(folder), score="reap", structure="experts", sparsity=0.5, calibration="wiki",
                         nsamples=4, seqlen=128, evaluation=[], completions=False,
                         offload="disk" if mode == "disk" else "none", output=str(out), overwrite=True,
                         dtype="bfloat16", device="cpu")
    t0 = time.perf_counter()
    report = run(recipe, progress=True)
    seconds = time.perf_counter() - t0
    peak = _rss_mb()  # before the checks below read the output back
    hidden, inter, layers, heads, kv, experts, top_k = MOE_SHAPES[size]
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    source = json.loads((folder / INDEX).read_text())["weight_map"]
    config = AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config)
    want = {n: tuple(p.shape) for n, p in built.named_parameters()}
    seen, shapes = set(), {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(out / shard), "pt") as handle:
            for name in handle.keys():
                seen.add(name)
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    keep = MaskSet.load(out / "masks.safetensors").units
    exact = 0
    for i, units in sorted(keep.items()):  # the saved experts are the source's kept ones, matrix for matrix
        kept = units["experts"].tolist()
        name = f"model.layers.{i}.mlp.experts"
        with safe_open(str(out / weight_map[f"{name}.gate_up_proj"]), "pt") as handle:
            gate_up = handle.get_tensor(f"{name}.gate_up_proj")
        with safe_open(str(out / weight_map[f"{name}.down_proj"]), "pt") as handle:
            down = handle.get_tensor(f"{name}.down_proj")
        ok = gate_up.shape[0] == down.shape[0] == len(kept)
        for j, e in enumerate(kept):
            parts = {}
            for part in ("gate_proj", "up_proj", "down_proj"):
                key = f"{name}.{e}.{part}.weight"
                with safe_open(str(folder / source[key]), "pt") as handle:
                    parts[part] = handle.get_tensor(key)
            ok = ok and torch.equal(gate_up[j], torch.cat([parts["gate_proj"], parts["up_proj"]])) and \
                torch.equal(down[j], parts["down_proj"])
        exact += bool(ok)
        del gate_up, down
    experts_after = config.num_experts
    shutil.rmtree(out, ignore_errors=True)
    return {"size": size, "mode": mode, "layers": layers, "experts_before": experts,
            "experts_after": experts_after, "per_token": top_k,
            "checkpoint_bytes": sum(f.stat().st_size for f in folder.glob("model*.safetensors")),
            "parameters_before": report["structured"]["params_before"]["total"],
            "parameters_after": report["structured"]["params_after"]["total"],
            "baseline_rss_mb": baseline, "peak_rss_mb": peak, "seconds": seconds,
            "prune_s": report["timings"]["prune_s"], "fixture_s": fixture_s,
            "bytes_read": report["offload"]["bytes_read"], "bytes_written": report["offload"]["bytes_written"],
            "shards": len(set(weight_map.values())), "index_complete": seen == set(weight_map),
            "stock_build_matches": shapes == want, "layers_exact": exact, "layers_checked": len(keep)}


def _read_back(row: dict) -> str:
    if "shards_opened" not in row:
        return "-"
    return (f"{row['shards_opened']}/{row['shards']} opened, {'complete' if row['index_complete'] else 'INCOMPLETE'}, "
            f"{row['saved_modules']} modules at {', '.join(str(s) for s in row['saved_sparsity'])}")


def write_table(results: dict, path: Path) -> str:
    lines = ["Random-weight Llama-shaped bf16 checkpoints, Wanda 50% on 4 x 128 wiki tokens, CPU (float32 compute). "
             "Random weights measure memory and time, not quality.", "",
             "| size | mode | checkpoint GB | peak RSS MiB | baseline MiB | (peak - baseline) / block | s / block | "
             "read GB | written GB | output GB | sparsity per module | read back: shards, index, saved sparsity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    exact = [r for r in results["cells"].values() if "cell" in r]
    moe = [r for r in results["cells"].values() if "experts_before" in r]
    for row in results["cells"].values():
        if "cell" in row or "experts_before" in row:
            continue
        gb = lambda b: f"{b / 1e9:.2f}" if b else "-"  # noqa: E731
        size = row["size"] + (f" (code of {row['measured_at']})" if row.get("measured_at") else "")
        lines.append(f"| {size} | {row['mode']} | {gb(row['checkpoint_bytes'])} | {row['peak_rss_mb']:.0f} | "
                     f"{row['baseline_rss_mb']:.0f} | {row['peak_over_block']:.2f} | {row['s_per_block']:.2f} | "
                     f"{gb(row['bytes_read'])} | {gb(row['bytes_written'])} | {gb(row['output_bytes'])} | "
                     f"{', '.join(str(s) for s in row['module_sparsity'])} | {_read_back(row)} |")
    if exact:
        lines += ["", "qwen2.5-coder-0.5b (float32), 4 x 128 wiki tokens: in memory vs streamed from disk.", "",
                  "| cell | tensors | bit-identical | in memory s | streamed s | note |", "|---|---|---|---|---|---|"]
        for r in exact:
            note = r.get("disk_error") or r.get("none_error") or ""
            lines.append(f"| {r['cell']} | {r.get('tensors', '-')} | {r.get('identical', '-')} | "
                         f"{r.get('none_s', 0):.0f} | {r.get('disk_s', 0):.0f} | {note} |")
    if moe:
        lines += ["", "Mixture of experts (random OLMoE-shaped bf16 checkpoint, each expert's matrices saved apart as "
                  "transformers 5 saves them): half the routed experts removed by REAP on 4 x 128 wiki tokens, "
                  "streamed from disk; the output read back.", "",
                  "| size | mode | checkpoint GB | parameters before -> after | experts per layer | peak RSS MiB | "
                  "baseline MiB | prune s | read GB | written GB | shards | index | stock build = saved | "
                  "layers holding exactly the kept experts |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in moe:
            lines.append(f"| {r['size']} | {r['mode']} | {r['checkpoint_bytes'] / 1e9:.2f} | "
                         f"{r['parameters_before'] / 1e9:.2f}B -> {r['parameters_after'] / 1e9:.2f}B | "
                         f"{r['experts_before']} -> {r['experts_after']} | {r['peak_rss_mb']:.0f} | "
                         f"{r['baseline_rss_mb']:.0f} | {r['prune_s']:.0f} | {r['bytes_read'] / 1e9:.2f} | "
                         f"{r['bytes_written'] / 1e9:.2f} | {r['shards']} | "
                         f"{'complete' if r['index_complete'] else 'INCOMPLETE'} | {r['stock_build_matches']} | "
                         f"{r['layers_exact']}/{r['layers_checked']} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_args(ap, HERE / "results" / "scale.json", "cells SIZE-MODE (MODE disk or memory); default from --sizes")
    ap.add_argument("--sizes", nargs="*", default=list(SHAPES), help=f"also {', '.join(MOE_SHAPES)} (disk only)")
    ap.add_argument("--memory", nargs="*", default=["0.5b", "1.5b", "3b"], help="sizes also pruned in memory")
    ap.add_argument("--scratch", default=str(Path.home() / ".cache" / "prunewise-scale-out"))
    ap.add_argument("--drop-fixtures", action="store_true", help="delete each checkpoint after its cells")
    ap.add_argument("--_fixture", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._fixture:  # in a process of its own, so that writing it does not count in a cell's peak RSS
        print(fixture(args._fixture))
        return
    results = start(args, run_cell, ())
    if results is None:
        return
    out = Path(args.out)
    cells = args.cells or [f"{s}-{m}" for s in args.sizes for m in ("disk", "memory") if m == "disk" or s in args.memory]
    for cell in cells:
        if cell in results["cells"]:
            continue
        print(f"{cell} ...", flush=True)
        if cell not in EXACT:
            subprocess.run([sys.executable, __file__, "--_fixture", cell.rsplit("-", 1)[0]], check=True)
        results["cells"][cell] = row = run_cell_process([sys.executable, __file__, "--_cell", cell, "--scratch",
                                                         args.scratch], cell)
        print(f"{cell}: " + (f"{row.get('identical')} of {row.get('tensors')} tensors identical" if cell in EXACT
                             else f"peak RSS {row['peak_rss_mb']:.0f} MB, {row['prune_s']:.0f} s pruning"), flush=True)
        out.write_text(json.dumps(results, indent=1))
        size = cell.rsplit("-", 1)[0]
        if args.drop_fixtures and cell not in EXACT and not any(c.startswith(size + "-") and c not in results["cells"] for c in cells):
            from prunewise.cache import cache_dir

            shutil.rmtree(cache_dir("scale") / f"llama-{size}-bf16-seed0", ignore_errors=True)
    print(write_table(results, out.with_suffix(".md")))


if __name__ == "__main__":
    main()
