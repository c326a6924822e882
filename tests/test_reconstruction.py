"""ALPS and ADMM reconstruction and the RIA score, pinned on tiny layers against renderings of their references'
loops written here, and against SparseGPT's layer error at the same sparsity."""

from __future__ import annotations

import pytest
import torch

from prunewise.compensation.admm import ADMMCompensation
from prunewise.compensation.alps import ALPSCompensation
from prunewise.core.stats import LinearStats, Needs
from prunewise.pipeline.parts import make_pruner
from prunewise.structures.masks import NM, Unstructured, row_counts


def _layer(seed: int = 0, rows: int = 48, cols: int = 64, tokens: int = 1024):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)  # correlated inputs: OBS matters
    x = (torch.randn(tokens, cols, generator=g) @ mix) * torch.rand(cols, generator=g).mul(3).add(0.1)
    w = torch.randn(rows, cols, generator=g)
    return w, x


def _stats(x: torch.Tensor) -> LinearStats:
    stats = LinearStats.for_needs(x.shape[1], Needs(hessian=True, sq_norm=True))
    for part in x.view(4, -1, x.shape[1]):  # a window at a time, as the engine adds them
        stats.add(part.unsqueeze(0))
    return stats


def _error(x: torch.Tensor, w: torch.Tensor, pruned: torch.Tensor) -> float:
    return float(((x @ (pruned - w).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum())


def _normalised(x: torch.Tensor, damp: float):
    H = (x.t() @ x).double()
    H.diagonal().add_(damp * H.diagonal().mean())
    s = H.diagonal().sqrt()
    return H / s.unsqueeze(0) / s.unsqueeze(1), s


def _top(v: torch.Tensor, keep: int, nm: tuple[int, int] | None) -> torch.Tensor:
    """Kept positions (True) of ``v`` (rows x cols): the ``keep`` largest squares of the layer, or per N:M group."""
    if nm:
        n, m = nm
        groups = v.square().reshape(-1, m)
        kept = torch.zeros_like(groups, dtype=torch.bool)
        kept.scatter_(1, groups.topk(m - n, dim=1).indices, True)
        return kept.view_as(v)
    kept = torch.zeros(v.numel(), dtype=torch.bool)
    kept[v.square().flatten().topk(keep).indices] = True
    return kept.view_as(v)


def _reference_alps(w, x, sparsity, nm=None, rho=0.1):
    """The loop of mazumder-lab/ALPS ``ALPS_admm`` in float64, weights as (rows, cols), from its magnitude start."""
    Hn, s = _normalised(x, 0.01)
    b0 = w.double() * s
    target = b0 @ Hn
    keep_count = int(round((1 - sparsity) * w.numel())) if not nm else w.numel() * (nm[1] - nm[0]) // nm[1]
    L, Q = torch.linalg.eigh(Hn)
    inv = lambda r: (Q / (L + r)) @ Q.t()  # noqa: E731
    kept = _top(b0, keep_count, nm)
    d0 = b0 * kept
    b, d, v, last, rising, A = b0, d0.clone(), torch.zeros_like(b0), kept, False, inv(rho)
    for it in range(300):
        b = (target - v + rho * d) @ A
        z = b + v / rho
        kept = _top(z, keep_count, nm)
        d = z * kept
        v = v + rho * (b - d)
        if (it + 1) % 3:
            continue
        change = int((kept != last).sum())
        if change / keep_count > 0.1:
            rising, rho = True, rho * 1.3
        elif change / keep_count > 0.005:
            rising, rho = True, rho * 1.2
        elif change > 0.5:
            if rising:
                rho *= 1.1
            else:
                rho /= 5
                b, d, v = b0, d0.clone(), torch.zeros_like(b0)
        elif rising:
            break
        else:
            rho /= 5
        last, rho = kept, min(rho, 1e6)
        A = inv(rho)
        if it >= 30 and change / keep_count < 0.0003:
            break
    kept = _top(b, keep_count, nm)
    # the refit on the support, solved exactly here (the reference's 10 CG steps approach it)
    out = torch.zeros_like(b)
    for r in range(b.shape[0]):
        j = kept[r].nonzero().squeeze(1)
        out[r, j] = torch.linalg.solve(Hn[j][:, j], target[r, j])
    return (out / s).float(), ~kept


@pytest.mark.parametrize("sparsity, nm", [(0.7, None), (0.8, None), (0.5, (2, 4))], ids=["70", "80", "2of4"])
def test_alps_follows_the_references_loop_and_beats_sparsegpt(sparsity, nm):
    w, x = _layer()
    structure = NM(*nm) if nm else Unstructured("layer")
    ref_w, ref_mask = _reference_alps(w, x, sparsity, nm)
    Hn, s = _normalised(x, 0.01)
    start = ~_top(w.double() * s, int(round((1 - sparsity) * w.numel())), nm)  # the reference's magnitude start
    out = ALPSCompensation().compensate(w, _stats(x), structure, sparsity, mask=start)
    agree = float((out.mask == ref_mask).float().mean())
    assert agree > 0.99, agree
    assert torch.equal(out.weight == 0, out.mask) or bool((out.weight[out.mask] == 0).all())
    if nm:
        assert (out.mask.view(-1, nm[1]).sum(1) == nm[0]).all()
    else:
        assert int(out.mask.sum()) == round(sparsity * w.numel())
    ours, theirs = _error(x, w, out.weight), _error(x, w, ref_w)
    assert ours == pytest.approx(theirs, rel=0.03)
    gpt = make_pruner("sparsegpt", structure=structure).prune(w, _stats(x), structure, sparsity)
    assert ours < 0.8 * _error(x, w, gpt.weight)  # ALPS's published margin over SparseGPT at these levels


def test_alps_refit_is_the_least_squares_optimum_on_its_support():
    """With enough CG steps the kept weights solve the normal equations restricted to the support."""
    w, x = _layer(1)
    structure = Unstructured("row")
    start = structure.mask(w.abs() * x.square().sum(0).sqrt(), 0.6)
    out = ALPSCompensation(ALPSCompensation.Config(cg_iter=200)).compensate(w, _stats(x), structure, 0.6, mask=start)
    assert torch.equal(out.mask.sum(1), row_counts(*w.shape, 0.6))  # the row group's counts, exact
    H = (x.t() @ x).double()
    H.diagonal().add_(0.01 * H.diagonal().mean())  # ALPS's ridge is part of the objective it solves
    grad = (out.weight.double() - w.double()) @ H  # d/dW of ||X (W' - W)^T||^2 / 2 (+ the ridge)
    assert float(grad[~out.mask].abs().max()) < 1e-3 * float((w.double() @ H).abs().max())


def _reference_admm(w, x, sparsity, nm=None, gradual=True, damp=0.1, rho=1.0, iters=20, prune_iters=15):
    """fmfi-compbio/admm-pruning ``AdmmPruner.fasterprune`` in float64 (layer-wise, weights as (rows, cols))."""
    Hn, s = _normalised(x, 0.0)
    Hn.diagonal().add_(damp)
    b0 = w.double() * s
    XY = b0 @ Hn
    A = torch.linalg.inv(Hn + rho * torch.eye(Hn.shape[0], dtype=Hn.dtype))
    W, U = b0.clone(), torch.zeros_like(b0)
    total = w.numel()
    kept = None
    for t in range(iters):
        if t < prune_iters:
            level = sparsity - sparsity * (1 - (t + 1) / prune_iters) ** 3 if gradual else sparsity
            v = (W + U).abs()
            if nm:
                sure = _top(v, 0, nm)  # each group's largest M - N are never pruned
                rest = torch.where(sure, torch.full_like(v, float("inf")), v).flatten()
                kept = torch.ones(total, dtype=torch.bool)
                kept[rest.topk(int(round(level * total)), largest=False).indices] = False
                kept = kept.view_as(v)
            else:
                kept = torch.ones(total, dtype=torch.bool)
                kept[v.flatten().topk(int(round(level * total)), largest=False).indices] = False
                kept = kept.view_as(v)
        Z = (W + U) * kept
        U = U + (W - Z)
        W = (XY + rho * (Z - U)) @ A
    return (((W + U) * kept) / s).float(), ~kept


@pytest.mark.parametrize("mode, sparsity, nm", [("gradual", 0.7, None), ("final", 0.7, None), ("gradual", 0.5, (2, 4))],
                         ids=["gradual-70", "final-70", "gradual-2of4"])
def test_admm_follows_the_references_loop_and_beats_sparsegpt(mode, sparsity, nm):
    w, x = _layer(2)
    structure = NM(*nm) if nm else Unstructured("layer")
    ref_w, ref_mask = _reference_admm(w, x, sparsity, nm, gradual=(mode == "gradual"))
    _, s = _normalised(x, 0.0)
    start = structure.mask((w.double() * s).abs().float(), sparsity)  # the reference's first mask (final mode)
    part = ADMMCompensation(ADMMCompensation.Config(mask=mode))
    out = part.compensate(w, _stats(x), structure, sparsity, mask=start)
    assert float((out.mask == ref_mask).float().mean()) > 0.99
    assert bool((out.weight[out.mask] == 0).all())
    assert int(out.mask.sum()) == round(sparsity * w.numel())
    assert _error(x, w, out.weight) == pytest.approx(_error(x, w, ref_w), rel=0.03)
    gpt = make_pruner("sparsegpt", structure=structure).prune(w, _stats(x), structure, sparsity)
    assert _error(x, w, out.weight) < _error(x, w, gpt.weight)


def test_admm_fixed_keeps_the_scores_mask_and_moves_only_the_survivors():
    w, x = _layer(3)
    structure = Unstructured("row")
    start = structure.mask(w.abs() * x.square().sum(0).sqrt(), 0.5)
    out = ADMMCompensation(ADMMCompensation.Config(mask="fixed")).compensate(w, _stats(x), structure, 0.5, mask=start)
    assert torch.equal(out.mask, start) and bool((out.weight[start] == 0).all())
    assert _error(x, w, out.weight) < _error(x, w, w.masked_fill(start, 0.0))


def test_ria_ranks_as_the_references_formula_and_compares_over_the_layer():

    w, x = _layer(4)
    stats = _stats(x)
    scaler_row = x.square().sum(0) / 4  # the reference's mean over samples of ||x_j||^2 (4 windows)
    W = w.abs()
    metric = (W / W.sum(0) + W / W.sum(1).reshape(-1, 1)) * scaler_row.sqrt().reshape(1, -1) ** 0.5
    thresh = torch.sort(metric.flatten())[0][int(w.numel() * 0.5)]
    want = metric <= thresh  # the reference's layer-wise mask (--per_outneuron off)
    pruner = make_pruner("ria")
    assert pruner.structure.group == "layer"
    got = pruner.prune(w, stats, pruner.structure, 0.5).mask
    # the reference's threshold keeps ties and one more weight (<=); the exact count prunes round(s * n)
    assert int((got != want).sum()) <= 1 and int(got.sum()) == w.numel() // 2


def test_alps_and_admm_take_the_layer_group_and_compose_with_a_sparsegpt_start():
    """``--compensate alps`` compares over the layer as its reference does; after SparseGPT's sweep (obs,alps) it
    restarts from the dense weight with SparseGPT's mask, so its result does not depend on the OBS-updated one."""
    from prunewise.pipeline.parts import default_group
    from prunewise.scores import get_score

    assert default_group(get_score("wanda"), [ALPSCompensation()]) == "layer"
    assert default_group(get_score("wanda"), [ADMMCompensation()]) == "layer"
    w, x = _layer(5)
    structure = Unstructured("layer")
    chained = make_pruner("sparsegpt", structure=structure, compensation=["obs", "alps"]).prune(w, _stats(x), structure,
                                                                                               0.7)
    gpt = make_pruner("sparsegpt", structure=structure).prune(w, _stats(x), structure, 0.7)
    direct = ALPSCompensation().compensate(w, _stats(x), structure, 0.7, mask=gpt.mask)
    assert torch.equal(chained.mask, direct.mask) and torch.allclose(chained.weight, direct.weight)
    assert _error(x, w, chained.weight) < _error(x, w, gpt.weight)


def test_warm_layer_selection_removes_what_the_layer_selection_removes(monkeypatch):
    """The selection ALPS and ADMM repeat on their iterates starts from its last threshold; over iterates that move a
    little (the band holds the threshold) and a lot (it misses and falls back), it removes exactly the layer
    selection's entries, and with ties at the threshold its count stays exact. Row groups keep the structure's mask."""
    from prunewise.structures.masks import Unstructured, smallest_overall

    sizes = []
    kthvalue = torch.kthvalue
    monkeypatch.setattr(torch, "kthvalue", lambda x, k: sizes.append(x.numel()) or kthvalue(x, k))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 96, generator=g)
    k = round(0.7 * z.numel())
    select = Unstructured("layer").selector(z.shape, 0.7)
    assert select.count == k
    for step in range(12):
        z = z + (0.02 if step % 4 else 1.0) * torch.randn(z.shape, generator=g)
        got = select(z.square())
        assert torch.equal(got, smallest_overall(z.square(), k)), step
    assert 0 < sizes.count(z.numel()) < 6 and max(n for n in sizes if n < z.numel()) < z.numel() // 2  # mostly a band
    tied = (torch.arange(64 * 96) // 500).float().view(64, 96)  # the threshold falls inside a run of 500 equal values
    for _ in range(2):
        got = select(tied)
        assert int(got.sum()) == k and tied[got].max() <= tied[~got].min()
    by_row = Unstructured("row")
    assert torch.equal(by_row.selector(z.shape, 0.7)(z.square()), by_row.mask(z.square(), 0.7))
