"""Engine, scores, structures and allocation on tiny random models."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from prunewise.allocation.methods import (
    ImportanceSampleVisitor,
    OutlierVisitor,
    allocate_global,
    allocate_owl,
    allocate_uniform,
    owl_block_sparsity,
)
from prunewise.allocation.plan import exact_counts
from prunewise.core.hessian import inverse_hessian_factor
from prunewise.core.stats import LinearStats
from prunewise.engine.sequential import SequentialEngine
from prunewise.errors import PrunewiseError
from prunewise.models.adapters import get_adapter, prunable_weights
from prunewise.pipeline.parts import make_pruner as get_score
from prunewise.pipeline.visitor import PruneVisitor
from prunewise.structures.masks import NM, Unstructured, parse_structure


def prune_tiny(score_name, structure, sparsity=0.5, chunk=None, windows=None, family="llama", plan=None):
    model = tiny_model(family)
    adapter = get_adapter(model)
    numels = {n: w.numel() for n, w in prunable_weights(model).items()}
    score = get_score(score_name)
    plan = plan or allocate_uniform(numels, sparsity, structure)
    visitor = PruneVisitor(score, structure, plan, adapter.block_prefix(model))
    if windows is None:
        windows = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    SequentialEngine(model, adapter, windows, chunk, progress=False).run(visitor)
    return model, visitor


@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_has_exactly_n_zeros_in_every_group_of_m(score, nm):
    n, m = nm
    model, _ = prune_tiny(score, NM(n, m), sparsity=n / m)
    for name, w in prunable_weights(model).items():
        zeros = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
        assert torch.all(zeros == n), name


@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_per_row_fractions_are_exact(score, sparsity):
    model, _ = prune_tiny(score, Unstructured("row"), sparsity)
    for name, w in prunable_weights(model).items():
        per_row = (w == 0).sum(1)
        assert per_row.max() - per_row.min() <= 1, name
        assert int((w == 0).sum()) == round(sparsity * w.numel()), name


def test_unstructured_layer_group_is_exact_overall_not_per_row():
    model, _ = prune_tiny("magnitude", Unstructured("layer"), 0.5)
    spreads = []
    for w in prunable_weights(model).values():
        assert int((w == 0).sum()) == round(0.5 * w.numel())
        per_row = (w == 0).sum(1)
        spreads.append(int(per_row.max() - per_row.min()))
    assert max(spreads) > 1  # a per-layer threshold does not equalise rows


def _reference_wanda(model, windows, sparsity, sequential, dense=False):
    """Wanda as its paper defines it, written independently with whole-model forwards: block by block
    (inputs = outputs of the already pruned blocks), |W| * ||X_j||_2 ranked per output row. Sequential:
    linears pruned in forward order, each measured after its predecessors were pruned; parallel: all
    linears of a block measured on the dense block (the reference code's order); ``dense``: every linear
    measured on the dense model (one forward before anything is pruned)."""
    adapter = get_adapter(model)
    every = [lin for block in adapter.blocks(model) for lin in adapter.linears(block).values()]
    for block in ([None] if dense else adapter.blocks(model)):
        linears = every if dense else list(adapter.linears(block).values())
        groups = [[lin] for lin in linears] if sequential else [linears]
        for group in groups:
            acts = {id(lin): [] for lin in group}
            hooks = [lin.register_forward_hook(lambda mod, inp, out, acts=acts: acts[id(mod)].append(inp[0].reshape(-1, inp[0].shape[-1])))
                     for lin in group]
            with torch.no_grad():
                model(input_ids=windows, use_cache=False)
            for h in hooks:
                h.remove()
            for lin in group:
                norm = torch.cat(acts[id(lin)]).double().pow(2).sum(0).sqrt().float()
                metric = lin.weight.abs() * norm
                k = int(round(sparsity * lin.in_features))
                idx = torch.sort(metric, dim=1, stable=True)[1][:, :k]
                with torch.no_grad():
                    lin.weight.scatter_(1, idx, 0.0)
    return model


def _tiny_half_prune_visitor(model, score: str):
    numels = {n: w.numel() for n, w in prunable_weights(model).items()}
    structure = Unstructured("row")
    return PruneVisitor(get_score(score), structure, allocate_uniform(numels, 0.5, structure),
                        get_adapter(model).block_prefix(model))


def _tiny_half_prune(score: str):
    """A tiny llama, its adapter, and a visitor pruning every linear to 50% (per row) with ``score``."""
    model = tiny_model("llama")
    adapter = get_adapter(model)
    numels = {n: w.numel() for n, w in prunable_weights(model).items()}
    structure = Unstructured("row")
    visitor = PruneVisitor(get_score(score), structure, allocate_uniform(numels, 0.5, structure), adapter.block_prefix(model))
    return model, adapter, visitor


@pytest.mark.parametrize("within_block", ["sequential", "parallel"])
def test_wanda_matches_an_independent_reference_implementation(within_block):
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    model, adapter, visitor = _tiny_half_prune("wanda")
    SequentialEngine(model, adapter, windows, progress=False, sequential=within_block == "sequential").run(visitor)
    ours = model
    ref = _reference_wanda(tiny_model("llama"), windows, 0.5, sequential=within_block == "sequential")
    for (name, a), b in zip(prunable_weights(ours).items(), prunable_weights(ref).values()):
        assert torch.equal(a == 0, b == 0), name
        torch.testing.assert_close(a, b)


def test_dense_propagation_is_wanda_on_the_dense_models_statistics_in_one_pass_per_block():
    """``propagate="dense"``: every linear's statistics from the dense model (no pruned outputs fed forward), in one
    block pass each; it differs from the reference order after block 0 (whose inputs are the same in both)."""
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    model, adapter, visitor = _tiny_half_prune("wanda")
    engine = SequentialEngine(model, adapter, windows, progress=False, sequential=False, propagate="dense")
    engine.run(visitor)
    assert engine.passes == len(adapter.blocks(model))
    ref = _reference_wanda(tiny_model("llama"), windows, 0.5, sequential=False, dense=True)
    for (name, a), b in zip(prunable_weights(model).items(), prunable_weights(ref).values()):
        assert torch.equal(a == 0, b == 0), name
        torch.testing.assert_close(a, b)
    parallel = _reference_wanda(tiny_model("llama"), windows, 0.5, sequential=False)
    ours, theirs = prunable_weights(model), prunable_weights(parallel)
    assert all(torch.equal(ours[n], theirs[n]) for n in ours if n.startswith("model.layers.0."))
    assert any(not torch.equal(ours[n], theirs[n]) for n in ours if not n.startswith("model.layers.0."))
    with pytest.raises(ValueError, match="propagate"):
        SequentialEngine(model, adapter, windows, progress=False, sequential=True, propagate="dense")


def test_wanda_statistics_are_input_column_norms():
    x = torch.randn(3, 5, 7)
    stats = LinearStats(7)
    stats.add(x[:2])
    stats.add(x[2:])
    torch.testing.assert_close(stats.sq_norm.sqrt().float(), x.reshape(-1, 7).norm(dim=0))
    w = torch.randn(4, 7)
    expected = w.abs() * x.reshape(-1, 7).norm(dim=0)
    torch.testing.assert_close(get_score("wanda").importance(w, stats), expected)


@pytest.mark.parametrize("score", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("walk", ["turns", "passes"])
def test_chunked_walks_equal_a_single_chunk(score, walk, monkeypatch):
    """Chunks taking turns (one pass) and chunks one after another (a pass per dependency level) prune as one chunk."""
    import prunewise.engine.sequential as seq

    windows = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    model = tiny_model("llama")
    single = SequentialEngine(model, get_adapter(model), windows, 8, progress=False)
    single.run(_tiny_half_prune_visitor(model, score))
    if walk == "passes":
        monkeypatch.setattr(seq, "ONE_CHUNK_BUDGET", 0)
    chunked_model = tiny_model("llama")
    chunked = SequentialEngine(chunked_model, get_adapter(chunked_model), windows, 3, progress=False)
    chunked.run(_tiny_half_prune_visitor(chunked_model, score))
    assert single.passes == 2 and chunked.turns == (walk == "turns")  # one pass per block (the tiny llama has 2)
    assert (chunked.passes == 2) == (walk == "turns")
    for (name, a), b in zip(prunable_weights(model).items(), prunable_weights(chunked_model).values()):
        assert torch.equal(a == 0, b == 0), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_chunks_taking_different_paths_through_a_block_fall_back_to_passes_in_turn(monkeypatch):
    """When a chunk's forward skips a linear the others wait before (data-dependent paths, as experts with no
    tokens), the turn pass is abandoned: what it pruned stays, the rest is pruned in passes of chunks in turn."""
    import prunewise.engine.sequential as seq

    windows = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(2))
    results, skipped = {}, []
    for walk in ("diverging", "passes"):
        model = tiny_model("llama")
        adapter = get_adapter(model)
        engine = SequentialEngine(model, adapter, windows, 2, progress=False)
        block = adapter.blocks(model)[0]
        first_mlp_linear = list(adapter.linears(block).values())[4]
        parent = next(m for m in block.modules() if first_mlp_linear in m.children())
        if walk == "diverging":  # chunk 0's MLP stands aside in the turn pass (and computes in the passes after)
            dense_forward = parent.forward

            def skipping(x, *a, _f=dense_forward, _engine=engine, **k):
                if _engine.turning is not None and _engine.turning.chunk == 0:
                    skipped.append(1)
                    return torch.zeros_like(x)
                return _f(x, *a, **k)
            parent.forward = skipping
        else:
            monkeypatch.setattr(seq, "ONE_CHUNK_BUDGET", 0)
        engine.run(_tiny_half_prune_visitor(model, "wanda"))
        monkeypatch.undo()
        results[walk] = (engine.turns, prunable_weights(model))
    assert results["diverging"][0] and not results["passes"][0] and skipped == [1]
    for name, a in results["diverging"][1].items():
        assert torch.equal(a, results["passes"][1][name]), name  # the same per-chunk sums in the same order


def test_an_error_in_a_chunk_taking_turns_is_raised_and_the_other_chunks_are_ended():
    import gc

    import greenlet

    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    model = tiny_model("llama")
    adapter = get_adapter(model)
    engine = SequentialEngine(model, adapter, windows, 1, progress=False)
    block = adapter.blocks(model)[1]
    last = list(adapter.linears(block).values())[-1]
    dense_forward = last.forward

    def failing(*a, **k):
        if engine.turning is not None and engine.turning.chunk == 2:
            failing.turns = engine.turning
            raise ValueError("chunk 2 broke")
        return dense_forward(*a, **k)
    last.forward = failing
    with pytest.raises(ValueError, match="chunk 2 broke"):
        engine.run(_tiny_half_prune_visitor(model, "wanda"))
    # chunks 0 and 1 had passed the last linear; chunk 3 waited before it and was ended there
    assert all(g.dead for g in failing.turns.greenlets) and engine.turning is None
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is greenlet.greenlet and o and o.parent is not None]


def test_windows_whose_one_chunk_pass_would_not_fit_the_budget_go_in_chunks(monkeypatch):
    import prunewise.engine.sequential as seq

    windows = torch.randint(0, 256, (20, 16), generator=torch.Generator().manual_seed(1))
    walks, default = {}, seq.ONE_CHUNK_BUDGET
    for budget in (default, 1000):
        monkeypatch.setattr(seq, "ONE_CHUNK_BUDGET", budget)
        model = tiny_model("llama")
        adapter = get_adapter(model)
        numels = {n: w.numel() for n, w in prunable_weights(model).items()}
        visitor = PruneVisitor(get_score("wanda"), Unstructured("row"), allocate_uniform(numels, 0.5, Unstructured("row")),
                               adapter.block_prefix(model))
        engine = SequentialEngine(model, adapter, windows, None, progress=False)
        engine.run(visitor)
        walks[budget] = (engine.chunk_size, engine.turns, engine.passes)
        assert all(float((w == 0).float().mean()) == 0.5 for w in prunable_weights(model).values())
    blocks = len(get_adapter(model).blocks(model))
    # within the budget: one window per chunk (a CPU), the chunks taking turns, one pass per block; over it
    # (20 x 16 tokens x 4 x 4 bytes x width > 1000) the chunks go one after another, a pass per dependency level
    assert walks[default] == (1, True, blocks)
    assert walks[1000][:2] == (1, False) and walks[1000][2] > 2 * blocks


@pytest.mark.parametrize("fields, sequential", [
    ({"score": "wanda"}, True), ({"score": "magnitude"}, True), ({"score": "sparsegpt"}, True),
    ({"score": "wanda", "sparsity": 0.7}, False), ({"score": "sparsegpt", "sparsity": 0.7}, True),
    ({"score": "wanda", "budget": "remove_params=1000"}, False),
    ({"score": "wanda", "structure": "2:4"}, False), ({"score": "sparsegpt", "structure": "2:4"}, True),
    ({"score": "wanda", "within_block": "parallel"}, False), ({"score": "wanda", "structure": "2:4", "within_block":
                                                               "sequential"}, True),
    ({"score": "wanda", "propagate": "dense"}, False), ({"score": "sparsegpt", "within_block": "parallel"}, False),
])
def test_the_within_block_order_is_chosen_by_structure_and_reconstruction(fields, sequential):
    """Default: sequential (one pass per block) with obs and for unstructured sparsities up to 50%, the reference's
    parallel order above and for N:M (bench/results/within_block.md); the recipe's choice wins; ``propagate: dense``
    implies parallel."""
    from prunewise.recipe import make_recipe

    assert make_recipe(**fields).sequential is sequential


def test_sequential_and_parallel_within_block_differ_after_the_first_linear():
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    out = {}
    for mode in (True, False):
        model = tiny_model("llama")
        adapter = get_adapter(model)
        numels = {n: w.numel() for n, w in prunable_weights(model).items()}
        st = Unstructured("row")
        v = PruneVisitor(get_score("wanda"), st, allocate_uniform(numels, 0.5, st), adapter.block_prefix(model))
        SequentialEngine(model, adapter, windows, progress=False, sequential=mode).run(v)
        out[mode] = prunable_weights(model)
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(out[True][first], out[False][first])  # same inputs: block 0's q sees no pruned predecessor
    assert not torch.equal(out[True]["model.layers.0.mlp.down_proj"], out[False]["model.layers.0.mlp.down_proj"])


@pytest.mark.parametrize("sequential", [True, False])
def test_linears_reading_one_input_share_one_statistics_in_either_order(sequential):
    """q, k and v read one input (and gate and up another): one statistics object, filled once, each, in both orders
    (sequentially, q is pruned before k asks: its statistics must still be shared, not gathered again)."""
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    model, adapter, v = _tiny_half_prune("sparsegpt")
    seen = {}
    visit = v.visit
    v.visit = lambda i, name, linear, stats: (seen.setdefault((i, name), stats), visit(i, name, linear, stats))
    SequentialEngine(model, adapter, windows, progress=False, sequential=sequential).run(v)
    for i in range(len(adapter.blocks(model))):
        q, k, vv = (seen[(i, f"self_attn.{n}_proj")] for n in "qkv")
        assert q is k is vv and q.tokens == 4 * 16
        assert seen[(i, "mlp.gate_proj")] is seen[(i, "mlp.up_proj")]
        assert len({id(s) for (b, _), s in seen.items() if b == i}) == 4


def _layer_problem(seed=0, rows=48, cols=64, tokens=512):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix * (1 + 3 * torch.rand(cols, generator=g))  # correlated, uneven
    w = torch.randn(rows, cols, generator=g)
    stats = LinearStats(cols, hessian=True)
    stats.add(x)
    return w, x, stats


@pytest.mark.parametrize("structure", [Unstructured("row"), Unstructured("layer"), NM(2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(structure):
    w, x, stats = _layer_problem()
    err = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        out = get_score(name).prune(w, stats, structure, 0.5)
        assert int(out.mask.sum()) == w.numel() // 2
        assert torch.all(out.weight[out.mask] == 0)
        err[name] = float((x @ (w - out.weight).t()).pow(2).sum())
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"]


def _reference_sparsegpt(w, hessian, sparsity, blocksize=32, damp=0.01, nm=None):
    """SparseGPT as the paper's code shapes it (Cholesky, inverse, upper Cholesky; a column loop on column slices),
    with prunewise's per-tile count (the reference prunes ``int(numel * s)`` plus ties per tile); with ``nm=(n, m)``
    the reference's N:M branch: at every m-th column of a tile, the n smallest ``w^2 / d^2`` of the next m columns."""
    W = w.clone()
    H = hessian.clone()
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0])
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    rows, cols = W.shape
    total = round(sparsity * rows * cols)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        if nm is None:
            tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            k = round(total * i2 / cols) - round(total * i1 / cols)
            mask1 = torch.zeros(tmp.numel(), dtype=torch.bool)
            mask1[torch.argsort(tmp.flatten())[:k]] = True
            mask1 = mask1.view_as(tmp)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i:i + nm[1]] ** 2 / torch.diag(Hinv1)[i:i + nm[1]].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, nm[0], dim=1, largest=False).indices, True)
            w_i, d = W1[:, i], Hinv1[i, i]
            q = w_i.clone()
            q[mask1[:, i]] = 0
            err = (w_i - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, mask


def test_sparsegpt_equals_the_papers_column_loop():
    """The transposed sweep and the one-Cholesky factor give the paper-shaped loop's mask and weights (to float32
    rounding): a wrong factor, update or tile count changes both."""
    w, x, stats = _layer_problem(rows=48, cols=96, tokens=512)
    out = get_score("sparsegpt", blocksize=32).prune(w, stats, Unstructured("layer"), 0.5)
    ref_w, ref_mask = _reference_sparsegpt(w, stats.hessian, 0.5)
    assert torch.equal(out.mask, ref_mask)
    torch.testing.assert_close(out.weight, ref_w, rtol=1e-4, atol=1e-5)
    U = inverse_hessian_factor(stats.hessian, 0.01)[0]
    Hd = stats.hessian + 0.01 * stats.hessian.diagonal().mean() * torch.eye(96)
    assert torch.equal(U, U.triu())
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(Hd), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_sparsegpt_nm_equals_the_papers_column_loop(n, m):
    """N:M inside the sweep: each group chosen when the sweep reaches it, from the weights updated so far, as the
    reference's N:M branch does; a group chosen early, late or from stale weights changes the mask."""
    w, x, stats = _layer_problem(rows=48, cols=96, tokens=512)
    out = get_score("sparsegpt", blocksize=32).prune(w, stats, NM(n, m), n / m)
    ref_w, ref_mask = _reference_sparsegpt(w, stats.hessian, n / m, nm=(n, m))
    assert torch.equal(out.mask, ref_mask)
    assert torch.equal(out.mask.view(48, -1, m).sum(-1), torch.full((48, 96 // m), n))
    torch.testing.assert_close(out.weight, ref_w, rtol=1e-4, atol=1e-5)
    assert not out.weight[out.mask].any()
    # the groups' choice follows the updates: selecting every group from the dense weights gives another mask
    assert not torch.equal(out.mask, NM(n, m).mask(w.pow(2) / torch.linalg.inv(stats.hessian).diagonal()))


def test_sparsegpt_retries_cholesky_with_more_dampening_and_reports_it():
    w, x, _ = _layer_problem(cols=16, tokens=64)
    stats = LinearStats(16, hessian=True)
    stats.hessian = torch.diag(torch.tensor([1.0] * 15 + [-0.5]))  # indefinite: needs damp ~ 0.6 of the mean diagonal
    out = get_score("sparsegpt", damp=0.01).prune(w[:, :16], stats, Unstructured("row"), 0.5, module="m")
    assert out.notes["damp"] == pytest.approx(1.0)
    stats.hessian = torch.full((16, 16), float("nan"))
    with pytest.raises(PrunewiseError, match="Cholesky"):
        inverse_hessian_factor(stats.hessian, 0.01, "m")


def test_owl_layer_sparsities_average_to_target_and_follow_outliers():
    ratios = [0.01, 0.05, 0.02, 0.09, 0.03]
    s = owl_block_sparsity(ratios, 0.7, 0.08)
    assert abs(sum(s) / len(s) - 0.7) < 1e-12
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s[3] == min(s) and s[0] == max(s)  # most outliers -> least pruned


def test_owl_plan_on_a_model_meets_the_budget_exactly():
    model = tiny_model("llama", layers=4)
    adapter = get_adapter(model)
    prefix = adapter.block_prefix(model)
    numels = {n: w.numel() for n, w in prunable_weights(model).items()}
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    visitor = OutlierVisitor(prefix, set(numels), m=5.0)
    SequentialEngine(model, adapter, windows, progress=False).run(visitor)
    assert len(visitor.ratios) == 4 and all(0 <= r < 1 for r in visitor.ratios)
    blocks = [[f"{prefix}.{i}.{n}" for n in adapter.linears(b)] for i, b in enumerate(adapter.blocks(model))]
    plan = allocate_owl(visitor.ratios, blocks, numels, 0.7, Unstructured("row"), 5.0, 0.08)
    assert sum(plan.pruned_counts().values()) == round(0.7 * sum(numels.values()))
    assert len(set(round(v, 3) for v in plan.modules.values())) > 1
    nm_plan = allocate_owl(visitor.ratios, blocks, numels, 0.5, NM(4, 8), 5.0, 0.2)
    assert all(abs(v * 8 - round(v * 8)) < 1e-9 for v in nm_plan.modules.values())
    assert sum(plan.numels[m] * v for m, v in nm_plan.modules.items()) == pytest.approx(0.5 * sum(numels.values()))


def test_global_allocation_meets_budget_and_keeps_min_density():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    numels = {n: w.numel() for n, w in prunable_weights(model).items()}
    with torch.no_grad():  # make one module tiny in magnitude: a global threshold would wipe it out
        adapter.linears(adapter.blocks(model)[0])["mlp.down_proj"].weight.mul_(1e-3)
    visitor = ImportanceSampleVisitor(get_score("magnitude"), adapter.block_prefix(model), set(numels))
    for i, block in enumerate(adapter.blocks(model)):
        for name, lin in adapter.linears(block).items():
            visitor.visit(i, name, lin, None)
    plan = allocate_global(visitor.samples, numels, 0.6, Unstructured("layer"), min_density=0.1)
    assert sum(plan.pruned_counts().values()) == round(0.6 * sum(numels.values()))
    assert max(plan.modules.values()) <= 0.9 + 1e-9
    assert plan.modules["model.layers.0.mlp.down_proj"] == pytest.approx(0.9, abs=1e-3)


def test_exact_counts_hits_the_total_to_one_weight():
    numels = {"a": 1000, "b": 333, "c": 7}
    out = exact_counts({"a": 0.61, "b": 0.7777, "c": 0.5}, numels, 0.65)
    assert sum(round(out[m] * numels[m]) for m in numels) == round(0.65 * 1340)


@pytest.mark.parametrize("text", ["4:4", "0:4", "5:4", "2-4", "dense"])
def test_bad_structures_are_refused(text):
    with pytest.raises(PrunewiseError):
        parse_structure(text)


def test_nm_that_does_not_divide_the_input_width_is_refused():
    with pytest.raises(PrunewiseError, match="divisible by 3"):
        NM(2, 3).check("x", torch.zeros(4, 64))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3"])
@pytest.mark.parametrize("score", ["wanda", "sparsegpt"])
def test_every_family_prunes_through_its_adapter(family, score):
    model, visitor = prune_tiny(score, Unstructured("row"), 0.5, family=family)
    weights = prunable_weights(model)
    assert len(weights) == 7 * 2 and set(visitor.records) == set(weights)
    for name, w in weights.items():
        assert int((w == 0).sum()) == w.numel() // 2, name
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(20)[None]).logits).all()


def test_unknown_architecture_is_refused_with_the_supported_list():
    class Cfg:
        model_type = "bert"
    with pytest.raises(PrunewiseError, match="no architecture adapter for model_type 'bert'; supported: llama"):
        get_adapter(Cfg())


def test_row_masks_in_bands_equal_one_sort_of_the_whole_matrix():
    from prunewise.structures.masks import smallest_per_row

    torch.manual_seed(0)
    importance = torch.randn(4100, 1024)  # more than one band of rows
    importance[:, :3] = 0.0  # ties: the stable order decides
    counts = torch.randint(0, 1025, (4100,))
    order = torch.argsort(importance, dim=1, stable=True)
    expected = torch.zeros_like(importance, dtype=torch.bool).scatter_(
        1, order, torch.arange(1024).expand(4100, 1024) < counts.unsqueeze(1))
    assert torch.equal(smallest_per_row(importance, counts), expected)


@pytest.mark.parametrize("width", [7, 576, 1000])
def test_the_hessian_accumulated_on_its_upper_half_equals_the_full_product(width):
    """The banded symmetric-half accumulation gives the full product's matrix, bit for bit wherever the full product is
    itself exactly symmetric (on this CPU every width from 16 up; at 7 the BLAS's small kernel is not)."""
    g = torch.Generator().manual_seed(width)
    xs = [torch.randn(2, 64, width, generator=g) for _ in range(3)]
    stats = LinearStats(width, hessian=True)
    full = torch.zeros(width, width)
    for x in xs:
        stats.add(x)
        flat = x.reshape(-1, width)
        full.addmm_(flat.t(), flat)
    assert torch.equal(stats.hessian, stats.hessian.t())
    if torch.equal(full, full.t()):
        assert torch.equal(stats.hessian, full)
    else:
        assert width < 16
        torch.testing.assert_close(stats.hessian, full)
    assert torch.equal(stats.sq_norm, full.diagonal().double())
