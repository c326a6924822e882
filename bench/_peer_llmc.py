"""One llm-compressor prune for bench/peer.py, run by the peer's own virtualenv (it never imports prunewise).

    <peer venv>/bin/python bench/_peer_llmc.py METHOD STRUCTURE WORK OUT THREADS [each|once]

METHOD is wanda or sparsegpt, STRUCTURE "0.5" (unstructured, that sparsity) or "N:M". WORK holds the dense
model (``dense/``) and the calibration token ids (``windows.pt``) that prunewise uses too. Prints one JSON
line: plain-forward seconds (``each``; none with ``once``), the ``oneshot`` call's seconds, peak RSS; writes the
pruned model to OUT.
"""

import json
import resource
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    method, structure, work, out, threads = sys.argv[1:6]
    forward = sys.argv[6] if len(sys.argv) > 6 else "each"
    torch.set_num_threads(int(threads))
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(work)
    model = AutoModelForCausalLM.from_pretrained(work / "dense", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(work / "dense")
    windows = torch.load(work / "windows.pt")
    n, length = windows.shape

    forward_s = None
    if forward == "each":
        t0 = time.perf_counter()
        with torch.inference_mode():
            for w in windows:
                model(input_ids=w[None], use_cache=False)
        forward_s = time.perf_counter() - t0

    if ":" in structure:
        sparsity, mask = int(structure.split(":")[0]) / int(structure.split(":")[1]), structure
    else:
        sparsity, mask = float(structure), "0:0"
    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    modifier = cls(sparsity=sparsity, mask_structure=mask, targets=["Linear"], ignore=["re:.*lm_head"])
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": [[1] * length] * n})
    t0 = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=data, recipe=modifier, num_calibration_samples=n,
            max_seq_length=length, shuffle_calibration_samples=False)
    prune_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.save_pretrained(out, save_compressed=False)
    tokenizer.save_pretrained(out)
    print(json.dumps({"forward_s": forward_s, "prune_s": prune_s, "peak_rss_mb": peak}))


if __name__ == "__main__":
    main()
