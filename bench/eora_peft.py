"""EoRA's adapter through stock PEFT on smollm2-135m: Wanda 2:4 + eora:16, saved, then loaded in a fresh process
that never imports prunewise (transformers + peft only); its logits against the in-memory model's.

    python bench/eora_peft.py          # bench/results/eora_peft.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CHILD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
folder, ids_path, out_path = sys.argv[1:4]
base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
zeros = [(p == 0).float().mean().item() for n, p in base.named_parameters() if n.endswith("proj.weight")]
model = PeftModel.from_pretrained(base, folder + "/eora").eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(ids_path)).logits, out_path)
print(json.dumps({"prunewise_imported": "prunewise" in sys.modules, "min_zero_share": min(zeros),
                  "max_zero_share": max(zeros), "linears": len(zeros)}))
"""


def main() -> None:
    from prunewise.api import prune
    from prunewise.export.save import save_pruned
    from prunewise.models.loading import load_model
    from prunewise.pipeline.run import output_files
    from prunewise.recipe import make_recipe

    recipe = make_recipe(model="smollm2-135m", calibration="wiki", nsamples=16, seqlen=512, evaluation=[],
                         completions=False, score="wanda", structure="2:4", compensation=["eora:16"])
    model, tok = load_model(recipe.model)
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    prune_s = time.perf_counter() - t0
    ids = torch.randint(0, 49152, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = result.model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "w24eora"
        save_pruned(result.model, tok, folder, output_files(result, result.report), overwrite=True)
        torch.save(ids, Path(tmp) / "ids.pt")
        proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(Path(tmp) / "ids.pt"),
                               str(Path(tmp) / "peft.pt")], capture_output=True, text=True, cwd=tmp)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        theirs = torch.load(Path(tmp) / "peft.pt")
        adapter_bytes = sum(p.stat().st_size for p in (folder / "eora").iterdir())
    result.lowrank.detach()
    with torch.no_grad():
        sparse = result.model(input_ids=ids).logits
    out = {"command": "python bench/eora_peft.py", "recipe": "wanda 2:4 + eora:16, 16 x 512 wiki windows",
           "prune_s": prune_s, "adapter": result.report["adapter"], "adapter_folder_bytes": adapter_bytes, **child,
           "max_abs_diff_peft_vs_memory": float((mine - theirs).abs().max()),
           "max_abs_logit": float(mine.abs().max()),
           "max_abs_diff_without_adapter": float((mine - sparse).abs().max())}
    (HERE / "results" / "eora_peft.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
