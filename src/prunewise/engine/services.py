"""Engine services beyond the block walk: gradient passes and whole-output measurements.

Like the walk itself, these are the only places that hook a model's blocks: gradients of the LM
loss for every block linear (Taylor, GBLM-Pruner), block and sublayer influence on the residual
stream (ShortGPT, and the means FLAP's bias compensation folds in), and the output damage of
silencing one sublayer (FinerCut).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.stats import LinearStats, Needs, check_weight
from ..errors import PrunewiseError


class StatsVisitor:
    """Dense pass keeping, for every linear of every block, its input statistics (as ``needs`` asks)."""

    modifies_weights = False

    def __init__(self, needs: Needs | None = None, on_block=None, more: dict[str, Needs] | None = None) -> None:
        self.stats: dict[int, dict[str, LinearStats]] = {}
        self._needs = needs or Needs(sq_norm=True, mean=True)
        self.on_block = on_block  # called with (i, block) while the block is still resident (streamed walks)
        self.more = more or {}  # linear name -> what it needs beyond ``needs`` (a Hessian for one projection only)

    def needs(self, i: int, name: str) -> Needs:
        return self._needs | self.more.get(name)

    def visit(self, i: int, name: str, linear: nn.Linear, stats: LinearStats | None) -> None:
        check_weight(f"block {i} {name}", linear.weight)
        self.stats.setdefault(i, {})[name] = stats

    def end_block(self, i: int, block: nn.Module) -> None:
        if self.on_block is not None:
            self.on_block(i, block)


def loss_gradients(model: nn.Module, adapter, windows: torch.Tensor, kind: str = "sum", chunk_size: int = 4,
                   progress: bool = True, fold=None) -> dict[tuple[int, str], torch.Tensor]:
    """Gradients of the next-token loss over ``windows`` for every block linear: (block, name) -> tensor.

    ``kind="sum"``: the gradient of the loss summed over the windows (LLM-Pruner's Taylor score), in
    chunks of ``chunk_size`` windows. ``kind="per_sample_l2"``: GBLM-Pruner's gradient, one window at
    a time, ``sqrt(sum_s (g_s / n)^2)`` of the per-window gradients ``g_s`` of the mean loss (see
    :func:`_per_sample_l2`). ``kind="folded"``: for each chunk of ``chunk_size`` windows, the gradient ``g`` of its
    mean loss is folded into an accumulator, ``acc = fold(key, weight, g, acc)`` (D-Pruner's importance, summed
    over batches of absolute values); returns the accumulators. Parameters keep their ``requires_grad`` as they
    were; the model is left in eval mode with no grads.
    """
    if kind not in ("sum", "per_sample_l2", "folded"):
        raise PrunewiseError(f"unknown gradient kind {kind!r}; use 'sum', 'per_sample_l2' or 'folded'")
    if kind == "folded" and fold is None:
        raise RuntimeError("folded gradients need the score's fold (see pipeline/prune.py)")
    with torch.enable_grad():  # also from inside a walk, which runs without autograd
        if kind == "per_sample_l2":
            return _per_sample_l2(model, adapter, windows, progress)
        if kind == "folded":
            return _folded(model, adapter, windows, chunk_size, progress, fold)
        return _summed(model, adapter, windows, chunk_size, progress)


@contextlib.contextmanager
def _weights_with_grads(model: nn.Module, adapter):
    """Every block linear by (block, name), with gradients on their weights only, the model in eval mode; afterwards
    every parameter's ``requires_grad`` and the mode are as they were, and no grads are left."""
    linears = {(i, n): lin for i, b in enumerate(adapter.blocks(model)) for n, lin in adapter.linears(b).items()}
    wanted = {id(lin.weight) for lin in linears.values()}
    before = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        yield linears
    finally:
        for p, flag in before.items():
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)


def _backward(model: nn.Module, batch: torch.Tensor, factor: float = 1.0) -> None:
    """Backward of ``factor`` times the mean next-token loss of ``batch``; a non-finite loss is one line."""
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss * factor
    if not torch.isfinite(loss):
        raise PrunewiseError("the language-model loss on the calibration data is not finite; check the weights")
    loss.backward()


def _summed(model: nn.Module, adapter, windows: torch.Tensor, chunk_size: int, progress: bool) -> dict:
    with _weights_with_grads(model, adapter) as linears:
        bar = tqdm(range(0, windows.shape[0], chunk_size), desc="taylor gradients", unit="chunk", disable=not progress)
        for start in bar:
            batch = windows[start:start + chunk_size]
            _backward(model, batch, batch.shape[0])  # mean over the chunk -> sum over windows
        # a linear no window reached (a routed expert the router never chose) has a zero gradient
        return {key: lin.weight.grad.detach().clone() if lin.weight.grad is not None
                else torch.zeros_like(lin.weight) for key, lin in linears.items()}


def _per_sample_l2(model: nn.Module, adapter, windows: torch.Tensor, progress: bool) -> dict:
    """GBLM-Pruner's gradient (``gradient_computation.py``): one window at a time, the gradient ``g_s`` of its
    mean next-token loss; returns ``sqrt(sum_s g_s^2)`` per weight, accumulated in float32. The reference's
    ``scale`` (100) multiplies every ``g_s``, so it factors out of the root: the score applies it."""
    with _weights_with_grads(model, adapter) as linears:
        sums = {key: torch.zeros_like(lin.weight, dtype=torch.float32) for key, lin in linears.items()}
        bar = tqdm(range(windows.shape[0]), desc="gradients per window", unit="window", disable=not progress)
        for s in bar:
            _backward(model, windows[s:s + 1])
            for key, lin in linears.items():
                if lin.weight.grad is not None:  # None: this window reached no token of it (a routed expert)
                    sums[key] += lin.weight.grad.float().pow(2)
                lin.weight.grad = None
    return {key: v.sqrt() for key, v in sums.items()}


def _folded(model: nn.Module, adapter, windows: torch.Tensor, chunk_size: int, progress: bool, fold) -> dict:
    """Per chunk of windows, the gradient of its mean next-token loss (windows of equal length: the mean of the
    windows' mean losses, one window's backward at a time) folded into the caller's accumulators."""
    with _weights_with_grads(model, adapter) as linears:
        acc: dict = {key: None for key in linears}
        bar = tqdm(range(0, windows.shape[0], chunk_size), desc="domain gradients", unit="batch", disable=not progress)
        for start in bar:
            batch = windows[start:start + chunk_size]
            for s in range(batch.shape[0]):  # one window at a time (its activations only); grads add up to the batch's
                _backward(model, batch[s:s + 1], 1 / batch.shape[0])
            for key, lin in linears.items():
                if lin.weight.grad is not None:  # None: no token of this batch reached it (a routed expert)
                    acc[key] = fold(key, lin.weight, lin.weight.grad, acc[key])
                lin.weight.grad = None
        return {key: v if v is not None else torch.zeros_like(lin.weight, dtype=torch.float32)
                for (key, v), lin in zip(acc.items(), linears.values())}


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
            o_name, down_name = self.adapter.roles["o"], self.adapter.roles["down"]

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
            for name in (o_name, down_name):
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

    def mean_input(self, i: int, role: str) -> torch.Tensor:
        """Mean input of block ``i``'s output projection ``role`` ('o' or 'down')."""
        return self.out_sums[(i, self.adapter.roles[role])] / self.tokens


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
            sub = adapter.sublayer(block, kind)
            if kind == "attention":
                handle = sub.register_forward_hook(silence_attention, with_kwargs=True)
            else:
                handle = sub.register_forward_hook(silence_mlp)
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
