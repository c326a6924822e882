"""Structured scores: one number per MLP channel, query head and key/value head of a block.

- ``magnitude``: the L2 norm of all weights of the unit (group magnitude);
- ``wanda``: Wanda's ``|W_ij| * ||X_j||`` summed over the unit's weights;
- ``fluctuation`` (FLAP): for each input channel of the output projection, the sample variance of
  that input times the squared norm of its weight column, summed over the unit's channels (for
  attention channels the metric is squared first, as in the FLAP code; under global widths the
  channel metrics are standardised per block and a head gets the mean of its channels);
- ``taylor`` (LLM-Pruner, first order, element-wise): ``|W_ij * dL/dW_ij|`` summed over the unit,
  with gradients of the language-model loss on the calibration windows.

A unit's weights are the rows it owns in gate/up (q for heads; k/v for key/value heads) and the
columns it owns in down (o for heads). Statistics come from one dense pass of the sequential engine.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import PrunewiseError
from ..scores.base import LinearStats, check_weight
from .geometry import BlockGeometry

STRUCTURED_SCORES = ("magnitude", "wanda", "fluctuation", "taylor")


class StatsVisitor:
    """Dense pass keeping, for every linear of every block, its input statistics (sums of squares and sums)."""

    modifies_weights = False

    def __init__(self) -> None:
        self.stats: dict[int, dict[str, LinearStats]] = {}

    def needs(self, i: int, name: str) -> str:
        return "sq_norm+mean"

    def visit(self, i: int, name: str, linear: nn.Linear, stats: LinearStats | None) -> None:
        check_weight(f"block {i} {name}", linear.weight)
        self.stats.setdefault(i, {})[name] = stats

    def end_block(self, i: int, block: nn.Module) -> None:
        return None


def _element(score: str, weight: torch.Tensor, stats: LinearStats | None, grad: torch.Tensor | None) -> torch.Tensor:
    w = weight.float()
    if score == "magnitude":
        return w.pow(2)
    if score == "wanda":
        return w.abs() * stats.sq_norm.sqrt().float().unsqueeze(0)
    if score == "taylor":
        return (w * grad.float()).abs()
    raise PrunewiseError(f"unknown structured score '{score}'; choose one of {', '.join(STRUCTURED_SCORES)}")


def unit_scores(score: str, block: nn.Module, g: BlockGeometry, stats: dict[str, LinearStats],
                grads: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Scores of a block's units: ``channels`` (I,), ``query`` (H,), ``kv`` (KV,); higher = keep.

    ``query`` holds what a query head owns (q rows, o columns); ``kv`` what a key/value head owns
    beyond its query heads (k, v rows). Magnitude scores are returned squared (sum of squares), so
    that a group of units adds up before the square root is taken by the caller.
    """
    a, m = block.self_attn, block.mlp
    hd = g.head_dim
    grads = grads or {}
    if score == "fluctuation":
        down, o = stats["mlp.down_proj"], stats["self_attn.o_proj"]
        channels = down.variance.float() * m.down_proj.weight.float().pow(2).sum(0)
        per_col = (o.variance.float() * a.o_proj.weight.float().pow(2).sum(0)).pow(2)  # FLAP squares the attention metric
        return {"channels": channels, "query": per_col.view(g.heads, hd).sum(1), "kv": torch.zeros(g.kv_heads),
                "query_channels": per_col}

    def el(name: str, linear: nn.Linear) -> torch.Tensor:
        if score == "taylor" and name not in grads:
            raise PrunewiseError(f"no gradient for {name}; the taylor score needs gradients of every targeted linear")
        return _element(score, linear.weight, stats.get(name), grads.get(name))

    channels = (el("mlp.gate_proj", m.gate_proj).sum(1) + el("mlp.up_proj", m.up_proj).sum(1)
                + el("mlp.down_proj", m.down_proj).sum(0))
    query = (el("self_attn.q_proj", a.q_proj).sum(1).view(g.heads, hd).sum(1)
             + el("self_attn.o_proj", a.o_proj).sum(0).view(g.heads, hd).sum(1))
    kv = (el("self_attn.k_proj", a.k_proj).sum(1).view(g.kv_heads, hd).sum(1)
          + el("self_attn.v_proj", a.v_proj).sum(1).view(g.kv_heads, hd).sum(1))
    return {"channels": channels, "query": query, "kv": kv}


def finish(score: str, values: torch.Tensor) -> torch.Tensor:
    """Group magnitude is a norm: the square root of the summed squares."""
    return values.sqrt() if score == "magnitude" else values


def taylor_gradients(model: nn.Module, adapter, windows: torch.Tensor, chunk_size: int = 4,
                     progress: bool = True) -> dict[tuple[int, str], torch.Tensor]:
    """Gradients of the summed next-token loss over ``windows`` for every block linear: (block, name) -> grad.

    Parameters keep their ``requires_grad`` as they were; the model is left in eval mode with no grads.
    """
    blocks = adapter.blocks(model)
    linears = {(i, n): lin for i, b in enumerate(blocks) for n, lin in adapter.linears(b).items()}
    wanted = {id(lin.weight) for lin in linears.values()}
    before = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(range(0, windows.shape[0], chunk_size), desc="taylor gradients", unit="chunk", disable=not progress)
        for start in bar:
            batch = windows[start:start + chunk_size]
            out = model(input_ids=batch, labels=batch, use_cache=False)
            loss = out.loss * batch.shape[0]  # mean over the chunk -> sum over windows
            if not torch.isfinite(loss):
                raise PrunewiseError("the language-model loss on the calibration data is not finite; check the weights")
            loss.backward()
        grads = {key: lin.weight.grad.detach().clone() for key, lin in linears.items()}
    finally:
        for p, flag in before.items():
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    return grads


class InfluenceVisitor:
    """How much each block and sublayer changes the residual stream (ShortGPT's block influence, per sublayer).

    Hooks: the block's input ``h0``, the input of its mid norm ``h1`` (after the attention sublayer)
    and the block's output ``h2``. Influence is ``1 - mean_t cos(in_t, out_t)``: blocks ``h0 -> h2``,
    attention ``h0 -> h1``, MLP ``h1 -> h2``. Also keeps the mean input of every output projection
    (for bias compensation of removed sublayers).
    """

    def __init__(self, model: nn.Module, adapter) -> None:
        self.model, self.adapter = model, adapter
        n = len(adapter.blocks(model))
        self.cos = {k: torch.zeros(n, dtype=torch.float64) for k in ("block", "attention", "mlp")}
        self.tokens = 0
        self.out_sums: dict[tuple[int, str], torch.Tensor] = {}

    @torch.no_grad()
    def run(self, windows: torch.Tensor, chunk_size: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
        blocks = self.adapter.blocks(self.model)
        cur: dict[int, dict[str, torch.Tensor]] = {}
        handles = []

        def cos(a, b):
            return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).double().sum()

        for i, block in enumerate(blocks):
            mid = self.adapter.mid_norm(block)

            def pre(module, args, kwargs, i=i):
                cur[i] = {"h0": (args[0] if args else kwargs["hidden_states"])}

            def mid_pre(module, args, i=i):
                cur[i]["h1"] = args[0]

            def post(module, args, kwargs, out, i=i):
                h2 = out[0] if isinstance(out, (tuple, list)) else out
                h0, h1 = cur[i]["h0"], cur[i]["h1"]
                self.cos["block"][i] += cos(h0, h2)
                self.cos["attention"][i] += cos(h0, h1)
                self.cos["mlp"][i] += cos(h1, h2)
                del cur[i]

            def proj_pre(module, args, key):
                x = args[0].reshape(-1, args[0].shape[-1]).double().sum(0)
                self.out_sums[key] = self.out_sums.get(key, 0) + x

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(mid.register_forward_pre_hook(mid_pre))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
            for name in ("self_attn.o_proj", "mlp.down_proj"):
                lin = block.get_submodule(name)
                handles.append(lin.register_forward_pre_hook(lambda mod, args, key=(i, name): proj_pre(mod, args, key)))
        try:
            bar = tqdm(range(0, windows.shape[0], chunk_size), desc="block influence", unit="chunk", disable=not progress)
            for start in bar:
                batch = windows[start:start + chunk_size]
                self.model(input_ids=batch, use_cache=False)
                self.tokens += batch.numel()
        finally:
            for h in handles:
                h.remove()
        return {k: 1 - v / self.tokens for k, v in self.cos.items()}

    def mean_input(self, i: int, name: str) -> torch.Tensor:
        return self.out_sums[(i, name)] / self.tokens


@torch.no_grad()
def sublayer_damage(model: nn.Module, adapter, windows: torch.Tensor, chunk_size: int = 4,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """For every attention and MLP sublayer, the mean KL(dense || model without that sublayer alone) of the
    next-token distributions over ``windows`` (FinerCut measures a sublayer by the change of the model's output)."""
    blocks = adapter.blocks(model)

    def log_probs() -> list[torch.Tensor]:
        return [torch.log_softmax(model(input_ids=windows[s:s + chunk_size], use_cache=False).logits.float(), -1)
                for s in range(0, windows.shape[0], chunk_size)]

    dense = log_probs()
    damage = {"attention": torch.zeros(len(blocks), dtype=torch.float64), "mlp": torch.zeros(len(blocks), dtype=torch.float64)}

    def silence_attention(module, args, kwargs, out):
        return (torch.zeros_like(out[0]),) + tuple(out[1:])

    def silence_mlp(module, args, out):
        return torch.zeros_like(out)

    bar = tqdm(total=2 * len(blocks), desc="sublayer damage", unit="sublayer", disable=not progress)
    for i, block in enumerate(blocks):
        for kind in ("attention", "mlp"):
            if kind == "attention":
                handle = block.self_attn.register_forward_hook(silence_attention, with_kwargs=True)
            else:
                handle = block.mlp.register_forward_hook(silence_mlp)
            try:
                kl, count = 0.0, 0
                for ref, lp in zip(dense, log_probs()):
                    kl += float((ref.exp() * (ref - lp)).sum(-1).double().sum())
                    count += ref.shape[0] * ref.shape[1]
            finally:
                handle.remove()
            damage[kind][i] = kl / count
            bar.update(1)
    bar.close()
    return damage
