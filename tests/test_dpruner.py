"""D-Pruner (scores/dpruner.py) pinned against a hand computation of the reference's formulas."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model, write_paragraphs
from prunewise.data import calibration_spec_windows
from prunewise.errors import PrunewiseError
from prunewise.models.adapters import get_adapter
from prunewise.pipeline.parts import placement_for
from prunewise.pipeline.prune import general_regularised_gradients
from prunewise.recipe import make_recipe
from prunewise.scores.dpruner import DPrunerScore


def _hand_general(model, adapter, windows, damp=0.01):
    """``code/general.py``: H = 2/n sum x x^T over n windows, dampened, U = chol(chol_inv(chol(H)))^T, G = W^2/U_jj^2."""
    inputs: dict = {}
    hooks = []
    for i, block in enumerate(adapter.blocks(model)):
        for name, lin in adapter.linears(block).items():
            def hook(mod, args, key=(i, name)):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                inputs[key] = inputs.get(key, 0) + x.t() @ x
            hooks.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    general = {}
    for i, block in enumerate(adapter.blocks(model)):
        for name, lin in adapter.linears(block).items():
            H = inputs[(i, name)] * 2 / windows.shape[0]
            dead = torch.diag(H) == 0
            H[dead, dead] = 1
            H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
            U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
            G = lin.weight.detach().double() ** 2 / torch.diag(U).unsqueeze(0) ** 2
            G[:, dead] = 0
            general[(i, name)] = G
    return general


def _hand_importance(model, adapter, windows, general, batch, lam=0.1, lr=0.03, scale=2.0 ** 16, balance=None):
    """``code/src/lomo.py``: per batch, g = scale * grad, g' = g + lam*2*lr^2*G*g^2/1000, I += |g'w + (g'w)^2/2000 + w^3|."""
    model = copy.deepcopy(model)
    adapter = get_adapter(model)
    linears = {(i, n): lin for i, b in enumerate(adapter.blocks(model)) for n, lin in adapter.linears(b).items()}
    importance = {k: 0 for k in linears}
    for start in range(0, windows.shape[0], batch):
        chunk = windows[start:start + batch]
        model.zero_grad()
        model(input_ids=chunk, labels=chunk, use_cache=False).loss.backward()
        if balance is not None and start == 0:  # the default: one lam, the term balance x |g| at the median weight
            ratios = []
            for key, lin in linears.items():
                g = lin.weight.grad.double().flatten() * scale
                step = -(-g.numel() // 4096)
                r = 2 * lr ** 2 * general[key].flatten()[::step] * g[::step].abs() / 1000
                ratios.append(r[g[::step] != 0])
            lam = balance / float(torch.cat(ratios).median())
        for key, lin in linears.items():
            w, g = lin.weight.detach().double(), lin.weight.grad.double() * scale
            reg = 2 * lr ** 2 * general[key] * g ** 2 / 1000
            g = g + lam * reg
            t = g * w
            importance[key] = importance[key] + (t + t ** 2 / 2000 + w ** 3).abs()
    return importance


LAM = 30.0


@pytest.fixture
def setting(tiny_folder, tmp_path):
    general = write_paragraphs(tmp_path / "general.txt", 3)
    # lam far above the reference's 0.1, so that the regulariser moves the ranking of this tiny model (at 0.1 its term
    # is a vanishing share of the gradient, here as on smollm2-135m; see scores/dpruner.py)
    recipe = make_recipe(model=tiny_folder["model"], score={"name": "dpruner", "batch": 4, "lam": LAM}, sparsity=0.5,
                         calibration=tiny_folder["calib"], general_calibration=general, nsamples=8, seqlen=32,
                         evaluation=[tiny_folder["eval"]], completions=False)
    return recipe, tiny_folder


def test_dpruner_importance_equals_the_reference_formulas(setting):
    from prunewise.models.loading import load_model

    recipe, _ = setting
    model, tok = load_model(recipe.model, recipe.dtype)
    adapter = get_adapter(model)
    score = recipe.parts().score
    assert isinstance(score, DPrunerScore)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = general_regularised_gradients(model, adapter, recipe, score, tok,
                                        calibration_spec_windows(tok, recipe.calibration, 8, 32, 0),
                                        placement_for(model, recipe, recipe.parts()), False, {})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # scoring changes no weight
    general_windows = calibration_spec_windows(tok, recipe.general_calibration, 8, 32, 0)
    domain_windows = calibration_spec_windows(tok, recipe.calibration, 8, 32, 0)
    assert not torch.equal(general_windows, domain_windows)
    hand = _hand_importance(model, adapter, domain_windows, _hand_general(model, adapter, general_windows), batch=4,
                            lam=LAM)
    assert set(got) == set(hand) and len(got) == 14
    for key in hand:
        torch.testing.assert_close(got[key].double(), hand[key], rtol=2e-4, atol=1e-9, msg=str(key))
    # the regulariser matters: without the general importance the ranking changes somewhere
    no_general = _hand_importance(model, adapter, domain_windows, {k: torch.zeros_like(v) for k, v in hand.items()},
                                  batch=4, lam=0.0)
    assert any(not torch.equal(hand[k].argsort(), no_general[k].argsort()) for k in hand)


def test_dpruner_prunes_the_lowest_importance_of_each_matrix(setting):
    from prunewise.api import prune

    recipe, _ = setting
    result = prune(recipe, progress=False)
    model, tok = result.model, result.tokenizer
    dense = tiny_model("llama")  # the folder's weights
    adapter = get_adapter(dense)
    general = _hand_general(dense, adapter, calibration_spec_windows(tok, recipe.general_calibration, 8, 32, 0))
    hand = _hand_importance(dense, adapter, calibration_spec_windows(tok, recipe.calibration, 8, 32, 0), general, 4,
                            lam=LAM)
    agree = total = 0
    for (i, name), imp in hand.items():
        pruned = get_adapter(model).linears(get_adapter(model).blocks(model)[i])[name].weight == 0
        assert pruned.float().mean().item() == pytest.approx(0.5, abs=1e-3)
        expect = torch.zeros_like(pruned)
        expect.view(-1)[imp.view(-1).argsort()[: pruned.numel() // 2]] = True  # one percentile per matrix
        agree += (pruned == expect).sum().item()
        total += pruned.numel()
    assert agree / total > 0.999
    assert result.report["timings"]["general_importance_s"] > 0 and result.report["timings"]["gradients_s"] > 0


def test_general_calibration_refusals(setting, tmp_path):
    recipe, folder = setting
    with pytest.raises(Exception, match="--general-calibration is read by the dpruner score only"):
        make_recipe(model=folder["model"], score="wanda", general_calibration="wiki")
    from prunewise.pipeline.run import check_data

    overlapping = recipe.model_copy(update={"general_calibration": folder["eval"]})
    with pytest.raises(PrunewiseError, match="--general-calibration: .*overlap|--general-calibration: .*same text"):
        check_data(overlapping)
    check_data(recipe)  # the disjoint general set passes


def test_dpruner_default_balances_the_regulariser_against_the_gradient(setting):
    from prunewise.models.loading import load_model

    recipe, _ = setting
    recipe = recipe.model_copy(update={"score": {**recipe.score, "lam": None}})
    score = recipe.parts().score
    assert score.config.lam is None and score.config.balance == 1.5
    model, tok = load_model(recipe.model, recipe.dtype)
    adapter = get_adapter(model)
    domain_windows = calibration_spec_windows(tok, recipe.calibration, 8, 32, 0)
    got = general_regularised_gradients(model, adapter, recipe, score, tok, domain_windows,
                                        placement_for(model, recipe, recipe.parts()), False, {})
    general = _hand_general(model, adapter, calibration_spec_windows(tok, recipe.general_calibration, 8, 32, 0))
    hand = _hand_importance(model, adapter, domain_windows, general, batch=4, balance=1.5)
    # the term is as large as the gradient here, so the float32 Hessian's rounding in G shows on a few weights
    for key in hand:
        rel = (got[key].double() - hand[key]).abs() / hand[key].abs().clamp_min(1e-12)
        assert float(rel.median()) < 1e-4 and float(rel.max()) < 5e-2, key
    # and it is not the reference's lam: the regulariser is then orders of magnitude larger
    small = _hand_importance(model, adapter, domain_windows, general, batch=4, lam=0.1)
    assert any(float(((hand[k] - small[k]).abs() / small[k].abs().clamp_min(1e-12)).median()) > 1e-2 for k in hand)
