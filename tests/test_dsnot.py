"""DSnoT mask refinement: pinned against a row-by-row rendering of the reference's loop, counts and N:M kept."""

from __future__ import annotations

import pytest
import torch

from prunewise.recipe import make_recipe


def _layer(seed: int = 0, rows: int = 24, cols: int = 192, windows: int = 6, length: int = 40):
    from prunewise.core.stats import LinearStats, Needs

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(windows, length, cols, generator=g) * torch.linspace(0.2, 2.0, cols) + torch.randn(cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    stats = LinearStats.for_needs(cols, Needs(sq_norm=True, mean=True, window_variance=True))
    for i in range(0, windows, 2):  # two windows per call, as the engine batches them
        stats.add(x[i:i + 2])
    return w, x, stats


def _reference_row(contrib, var, wanda, pruned, thr, cycles, same_sign, rank=None, m=0):
    """One row of the reference's loop (zyxxmu/DSnoT lib/prune.py), written with Python scalars."""
    n = len(contrib)
    pruned = list(pruned)
    err = sum(c for c, p in zip(contrib, pruned) if p)
    sign0 = (err > 0) - (err < 0)
    grow = [contrib[j] / var[j] if pruned[j] else 0.0 for j in range(n)]
    grow_order = sorted(range(n), key=lambda j: grow[j])
    kept = sorted((j for j in range(n) if not pruned[j]), key=lambda j: wanda[j])
    neg = [j for j in kept if contrib[j] < 0]  # pruned in Wanda order when the error is >= 0
    pos = [j for j in kept if contrib[j] > 0]  # when it is < 0
    grow_pos = [j for j in reversed(grow_order) if pruned[j] and grow[j] > 0]
    grow_neg = [j for j in grow_order if pruned[j] and grow[j] < 0]
    blocked = list(pruned)
    for _ in range(cycles):
        source = grow_pos if err > 0 else grow_neg
        g = source.pop(0) if source else None
        if m and g is not None:
            start = g - g % m
            free = [j for j in range(start, start + m) if not blocked[j]]
            p = min(free, key=lambda j: rank[j]) if free else None
            if p is not None:
                blocked[p] = True
        elif not m:
            source = pos if err < 0 else neg
            p = source.pop(0) if source else None
        if g is None or p is None or abs(err) <= thr:  # out of candidates (the reference's pointers would walk on)
            break
        after = err + contrib[p] - contrib[g]
        if (same_sign or m) and ((after > 0) - (after < 0)) != sign0:
            break
        pruned[p], pruned[g], err = True, False, after
    return pruned


@pytest.mark.parametrize("same_sign", [False, True])
def test_dsnot_matches_the_reference_loop_row_by_row_unstructured(same_sign):
    from prunewise.compensation.dsnot import DSnoTCompensation, DSnoTConfig
    from prunewise.core.stats import wanda_metric
    from prunewise.structures import Unstructured

    w, _, stats = _layer()
    structure = Unstructured("row")
    wanda = wanda_metric(w, stats)
    mask = structure.mask(wanda, 0.6)
    part = DSnoTCompensation(DSnoTConfig(update_threshold=0.05, same_sign=same_sign))
    refined, notes = part.refine(w, stats, structure, mask)
    contrib = (w * (stats.sum / stats.windows).float()).tolist()
    var = stats.window_variance.float().tolist()
    for r in range(w.shape[0]):
        expected = _reference_row(contrib[r], var, wanda[r].tolist(), mask[r].tolist(), 0.05, 50, same_sign)
        assert refined[r].tolist() == expected, r
    assert notes["dsnot_swaps"] > 0
    assert torch.equal(refined.sum(1), mask.sum(1))  # every row keeps its count


def test_dsnot_matches_the_reference_loop_and_keeps_the_pattern_under_n_m():
    from prunewise.compensation.dsnot import DSnoTCompensation, DSnoTConfig
    from prunewise.core.stats import wanda_metric
    from prunewise.structures import NM

    w, _, stats = _layer(seed=3)
    structure = NM(2, 4)
    wanda = wanda_metric(w, stats)
    mask = structure.mask(wanda, 0.5)
    refined, notes = DSnoTCompensation(DSnoTConfig(update_threshold=0.05)).refine(w, stats, structure, mask,
                                                                                  importance=wanda)
    contrib = (w * (stats.sum / stats.windows).float()).tolist()
    var = stats.window_variance.float().tolist()
    for r in range(w.shape[0]):
        expected = _reference_row(contrib[r], var, wanda[r].tolist(), mask[r].tolist(), 0.05, 50, False,
                                  rank=wanda[r].tolist(), m=4)
        assert refined[r].tolist() == expected, r
    assert notes["dsnot_swaps"] > 0 and not torch.equal(refined, mask)
    assert (refined.reshape(w.shape[0], -1, 4).sum(-1) == 2).all()  # 2 zeros in every group of 4


def test_dsnot_with_the_sign_check_lowers_every_rows_expected_error_and_keeps_dense_values():
    from prunewise.core.stats import LinearStats
    from prunewise.pipeline.parts import make_pruner
    from prunewise.structures import Unstructured

    w, x, stats = _layer(seed=5, rows=48, cols=96)
    plain = make_pruner("wanda").prune(w, stats, Unstructured("row"), 0.6)
    refined = make_pruner("wanda", compensation=["dsnot"], same_sign=True).prune(w, stats, Unstructured("row"), 0.6)
    mean_x = x.reshape(-1, x.shape[-1]).mean(0)
    err = {k: ((w - o.weight) @ mean_x).abs() for k, o in (("plain", plain), ("dsnot", refined))}
    assert (err["dsnot"] <= err["plain"] + 1e-5).all()  # with the sign check a swap can only shrink |error|
    assert float(err["dsnot"].mean()) < 0.5 * float(err["plain"].mean()), err
    kept = ~refined.mask
    assert torch.equal(refined.weight[kept], w[kept]) and (refined.weight[refined.mask] == 0).all()
    assert torch.equal(refined.mask.sum(1), plain.mask.sum(1))
    assert isinstance(stats, LinearStats) and stats.windows == 6


def test_window_variance_is_the_mean_of_per_window_population_variances():
    w, x, stats = _layer(seed=7)
    expected = x.var(dim=1, unbiased=False).mean(0).double()
    assert torch.allclose(stats.window_variance, expected, rtol=1e-5, atol=1e-6)


def test_dsnot_in_a_run_keeps_counts_and_skip_leaves_a_sublayer_to_the_selection(tiny_folder):
    from prunewise.api import prune
    from prunewise.models.loading import load_model

    # parallel: every linear of block 0 sees the dense block, so a skipped MLP's masks equal the plain run's
    base = dict(model=tiny_folder["model"], calibration=tiny_folder["calib"], nsamples=8, seqlen=32, evaluation=[],
                score="wanda", sparsity=0.6, within_block="parallel")
    model, tok = load_model(tiny_folder["model"])
    plain = prune(make_recipe(**base), model, tok, progress=False)
    results = {}
    for skip in ("none", "mlp", None):  # None: the default, the reference's (mlp)
        model, tok = load_model(tiny_folder["model"])
        step = {"name": "dsnot", "update_threshold": 0.0, **({"skip": skip} if skip else {})}
        results[skip] = prune(make_recipe(**base, compensation=[step]), model, tok, progress=False)
    a, full, skipped, default = (dict(r.masks.weight_masks()) for r in (plain, results["none"], results["mlp"],
                                                                        results[None]))
    assert default.keys() == skipped.keys() and all(torch.equal(default[n], skipped[n]) for n in default)
    for name in a:
        assert torch.equal(full[name].sum(1), a[name].sum(1)), name
        if ".mlp." in name and name.startswith("model.layers.0."):  # later blocks see inputs that DSnoT changed
            assert torch.equal(skipped[name], a[name]), name
    first = {n for n in a if n.startswith("model.layers.0.")}  # block 0 sees the same inputs in every run
    assert any(not torch.equal(full[n], a[n]) for n in first)
    assert any(not torch.equal(skipped[n], a[n]) for n in first if ".self_attn." in n)
    assert results["none"].report["score"].startswith("wanda+dsnot") or "dsnot" in str(results["none"].report)


def test_sparsegpt_with_dsnot_reconstructs_for_the_refined_mask():
    from prunewise.core.stats import LinearStats, Needs
    from prunewise.pipeline.parts import make_pruner
    from prunewise.structures import Unstructured

    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 64, 48, generator=g) + torch.randn(48, generator=g)
    w = torch.randn(16, 48, generator=g)
    stats = LinearStats.for_needs(48, Needs(sq_norm=True, hessian=True, mean=True, window_variance=True))
    stats.add(x)
    base = make_pruner("sparsegpt").prune(w, stats, Unstructured("row"), 0.5)
    both = make_pruner("sparsegpt", compensation=["obs", "dsnot"], update_threshold=0.0).prune(
        w, stats, Unstructured("row"), 0.5)
    assert not torch.equal(both.mask, base.mask)
    assert torch.equal(both.mask.sum(1), base.mask.sum(1))
    fixed = make_pruner("wanda", compensation=["obs"]).reconstruct[0].compensate(
        w, stats, Unstructured("row"), 0.5, mask=both.mask)
    assert torch.equal(both.weight, fixed.weight)  # OBS ran again with the refined mask fixed


def test_sparsegpt_initialised_dsnot_ranks_rows_by_the_references_metric_and_keeps_dense_values():
    """``sparsegpt`` + ``dsnot`` without ``obs`` is the reference's ``--initial_method sparsegpt``: per row, the
    weights of smallest ``w^2 / U_jj^2`` (U the upper Cholesky factor of the dampened H^-1) pruned, no OBS update."""
    from prunewise.core.stats import LinearStats, Needs
    from prunewise.pipeline.parts import make_pruner
    from prunewise.structures import Unstructured

    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 64, 48, generator=g) * torch.linspace(0.3, 3.0, 48) + torch.randn(48, generator=g)
    w = torch.randn(16, 48, generator=g)
    stats = LinearStats.for_needs(48, Needs(sq_norm=True, hessian=True, mean=True, window_variance=True))
    stats.add(x)
    flat = x.reshape(-1, 48)  # the reference's metric, written out (its H is a mean; the dampening is relative)
    H = flat.t() @ flat
    H += 0.01 * H.diagonal().mean() * torch.eye(48)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    metric = w ** 2 / U.diagonal().unsqueeze(0) ** 2
    expected = torch.zeros_like(w, dtype=torch.bool)
    expected.scatter_(1, torch.sort(metric, dim=1, stable=True).indices[:, :24], True)
    plain = make_pruner("sparsegpt", compensation=["dsnot"], saliency="sweep", max_cycle_time=0, skip="none").prune(
        w, stats, Unstructured("row"), 0.5)
    assert torch.equal(plain.mask, expected)
    other = make_pruner("sparsegpt", compensation=["dsnot"], max_cycle_time=0, skip="none").prune(
        w, stats, Unstructured("row"), 0.5)
    assert not torch.equal(other.mask, expected)  # saliency=obs ranks by [H^-1]_jj, not U_jj^2
    refined = make_pruner("sparsegpt", compensation=["dsnot"], saliency="sweep", update_threshold=0.0,
                          skip="none").prune(w, stats, Unstructured("row"), 0.5)
    assert not torch.equal(refined.mask, expected) and torch.equal(refined.mask.sum(1), expected.sum(1))
    assert torch.equal(refined.weight, w.masked_fill(refined.mask, 0.0))  # kept weights keep their dense values


def test_a_sparsegpt_recipe_with_dsnot_alone_ranks_per_row_and_runs_without_obs():
    recipe = make_recipe(model="x", sparsity=0.5, score="sparsegpt:saliency=sweep", compensation=["dsnot"])
    assert recipe.score == {"name": "sparsegpt", "damp": 0.01, "saliency": "sweep"}  # as the command line writes it
    parts = recipe.parts()
    assert parts.structure.group == "row" and not parts.pruner().reconstruct
    with_obs = make_recipe(model="x", sparsity=0.5, score="sparsegpt", compensation=["obs", "dsnot"]).parts()
    assert with_obs.structure.group == "layer" and with_obs.pruner().reconstruct
