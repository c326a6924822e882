"""EoRA low-rank compensation: the factorization's optimality, and the adapter as stock PEFT loads it."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from prunewise.recipe import make_recipe


def _layer(seed: int = 0, rows: int = 40, cols: int = 32, tokens: int = 400):
    from prunewise.core.stats import LinearStats, Needs

    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / 4 + torch.eye(cols)  # correlated, unevenly scaled inputs
    x = (torch.randn(tokens, cols, generator=g) @ mix) * torch.linspace(0.05, 3, cols)
    w = torch.randn(rows, cols, generator=g)
    stats = LinearStats.for_needs(cols, Needs(sq_norm=True, hessian=True))
    stats.add(x)
    return w, x, stats


def test_eora_is_the_best_rank_r_correction_in_the_activation_weighted_norm():
    from prunewise.compensation.eora import EoRACompensation, EoRAConfig
    from prunewise.core.stats import wanda_metric
    from prunewise.structures import NM

    w, x, stats = _layer()
    pruned = w.masked_fill(NM(2, 4).mask(wanda_metric(w, stats)), 0.0)
    delta = (w - pruned).double()
    xd = x.double()
    for rank in (1, 4, 8):
        A, B = EoRACompensation(EoRAConfig(rank=rank)).factors(w, pruned, stats)
        assert A.shape == (rank, 32) and B.shape == (40, rank)
        err = float(((delta - (B @ A).double()) @ xd.t()).pow(2).sum())
        # the optimum of ||(dW - M) X^T||_F over rank-r M is the tail of dW X^T's singular values
        tail = float(torch.linalg.svdvals(delta @ xd.t())[rank:].pow(2).sum())
        assert abs(err - tail) <= 1e-4 * tail, (rank, err, tail)
        U, s, Vh = torch.linalg.svd(delta, full_matrices=False)  # plain SVD of dW ignores the inputs
        plain = (U[:, :rank] * s[:rank]) @ Vh[:rank]
        assert err < 0.9 * float(((delta - plain) @ xd.t()).pow(2).sum())


def test_eora_adapter_loads_with_stock_peft_in_a_fresh_process_and_gives_the_same_logits(tiny_folder, tmp_path):
    from prunewise.api import run

    out = tmp_path / "out"
    report = run(make_recipe(model=tiny_folder["model"], calibration=tiny_folder["calib"], nsamples=8, seqlen=32,
                             evaluation=[], completions=False, output=str(out), score="wanda", structure="2:4",
                             compensation=["eora:4"]), progress=False)
    assert report["adapter"]["modules"] == 14 and report["adapter"]["ranks"] == [4]
    # rank 4 x (out + in) of q 64x64, k 32x64, v 32x64, o 64x64, gate 128x64, up 128x64, down 64x128, two blocks
    assert report["adapter"]["parameters"] == 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert report["adapter"]["bytes"] == 4 * report["adapter"]["parameters"]
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32).eval()
zeros = {{n: (p == 0).float().mean().item() for n, p in base.named_parameters() if n.endswith("proj.weight")}}
model = PeftModel.from_pretrained(base, {str(out / "eora")!r}).eval()
ids = torch.tensor({ids.tolist()})
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save(logits, {str(tmp_path / "peft.pt")!r})
print(json.dumps({{"prunewise": "prunewise" in sys.modules, "zeros": zeros}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not info["prunewise"]
    assert info["zeros"] and all(abs(z - 0.5) < 1e-9 for z in info["zeros"].values())  # 2:4 kept in the weights

    from prunewise.api import prune
    from prunewise.models.loading import load_model

    model, tok = load_model(tiny_folder["model"])
    result = prune(make_recipe(model=tiny_folder["model"], calibration=tiny_folder["calib"], nsamples=8, seqlen=32,
                               evaluation=[], score="wanda", structure="2:4", compensation=["eora:4"]),
                   model, tok, progress=False)
    with torch.no_grad():
        mine = result.model(input_ids=ids).logits
        result.lowrank.detach()
        sparse = result.model(input_ids=ids).logits
    peft_logits = torch.load(tmp_path / "peft.pt")
    assert float((mine - peft_logits).abs().max()) < 1e-4
    assert float((sparse - peft_logits).abs().max()) > 1e-3  # the adapter is really in the computation


def test_eora_lowers_the_pruned_models_output_error_and_refuses_what_it_cannot_do(tiny_folder):
    from prunewise.api import prune
    from prunewise.errors import PrunewiseError
    from prunewise.models.loading import load_model

    dense, tok = load_model(tiny_folder["model"])
    ids = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
    errs = {}
    for comp in ([], ["eora:8"]):
        model, tok = load_model(tiny_folder["model"])
        result = prune(make_recipe(model=tiny_folder["model"], calibration=tiny_folder["calib"], nsamples=8,
                                   seqlen=32, evaluation=[], score="wanda", sparsity=0.6, compensation=comp),
                       model, tok, progress=False)
        with torch.no_grad():
            errs[bool(comp)] = float((result.model(input_ids=ids).logits - ref).pow(2).mean())
    assert errs[True] < 0.9 * errs[False], errs  # random weights: flat spectra, a rank-8 correction helps less
    for fields, reason in (({"structure": "width"}, "compensation eora works with structure unstructured, n:m"),
                           ({"allocation": "profile"}, "compensation eora works with allocation uniform, global, owl")):
        try:
            make_recipe(model="x", compensation=["eora:8"], **fields)
        except PrunewiseError as exc:
            assert reason in str(exc) and "\n" not in str(exc)
        else:
            raise AssertionError(fields)
