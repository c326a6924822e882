"""The sequential engine: the only code that walks a model, one block resident at a time.

The inputs of the first block, and the keyword arguments each block receives (rotary embeddings,
masks: they differ per block in Gemma 3, captured from one single-window forward), are recorded while
the decoder runs with every block standing aside (see :meth:`SequentialEngine.capture`). Then, block
by block, the calibration activations go through the block with hooks on its linears: a visitor
receives each linear's input statistics once they are complete and may rewrite the weight; the
block's outputs, recomputed with the rewritten weights, become the next block's inputs.

Within a block there are two orders. *Parallel* (the Wanda and SparseGPT reference code): every
linear's statistics come from the dense block, then all are pruned and the block is run again for
its outputs. *Sequential*: a linear's statistics are only used when every linear that ran before it
already computed with its final weights. That takes a single pass when every window waits, just
before each linear, for the linear to be pruned: with the calibration set in one chunk (the linear is
pruned in its pre-hook), or with the chunks taking turns (:class:`_Turns`: each chunk's forward is a
greenlet, one computing at a time, and all chunks meet before each linear whose statistics are still
incomplete). When the suspended chunks' activations would not fit the memory budget, chunks run
one after another and a block takes one extra pass per dependency level.

Each block is onloaded to the compute device (in the compute dtype) for its passes and offloaded
afterwards, its rewritten weights cast back to the storage dtype (:mod:`.placement`).
"""

from __future__ import annotations

import copy
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.memory import trim_heap
from ..core.stats import ExpertStats, LinearStats, Needs
from ..models.adapters import ArchitectureAdapter
from .placement import Placement

log = logging.getLogger(__name__)


class BlockVisitor(Protocol):
    """What the engine calls back while walking the model."""

    modifies_weights: bool

    def needs(self, block_index: int, name: str) -> Needs | None:
        """Statistics wanted (None or an empty request: none, the linear is visited before the pass)."""

    def visit(self, block_index: int, name: str, linear: nn.Linear, stats: LinearStats | None) -> None:
        """Called once per linear when its statistics are complete; may rewrite ``linear.weight``."""

    def end_block(self, block_index: int, block: nn.Module) -> None:
        """Called after a block is finished."""

    # optional: ``visit_experts(block_index, experts_module, stats: ExpertStats)``, called after the pass of every
    # block with routed experts (a visitor that does not modify weights: the statistics are of one dense pass)


@dataclass
class Captured:
    hidden: torch.Tensor          # (n, L, H) inputs of the first block
    kwargs: list[dict]            # per block: the keyword arguments it is called with


@dataclass
class Recording:
    """A dense walk kept for restarts: every block's input, the last block's output, the block kwargs."""

    inputs: list[torch.Tensor]
    final: torch.Tensor
    kwargs: list[dict]


def block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


ONE_CHUNK_BUDGET = 2 << 30  # bytes of block temporaries a one-pass sequential walk may hold (else several passes)


class _Abandon(Exception):
    """Thrown into a suspended chunk's forward to end it (an error elsewhere, an interrupt, or diverging paths)."""


class _Diverged(Exception):
    """Chunks of a turn pass stopped at different linears (data-dependent paths, e.g. experts with no tokens)."""


class _Turns:
    """The forwards of a block's chunks as greenlets on this thread, run one at a time and meeting at linears.

    The scheduler resumes each live chunk in order; a chunk runs until it stops before a linear (:meth:`stop`,
    from a pre-hook) or finishes. When every chunk waits before the same linear, the scheduler completes that
    linear's statistics and prunes it, and the chunks go on computing with the pruned weight. Greenlets, not
    threads: the same thread keeps torch's thread pool and its allocator's warm memory (chunks as 64 threads,
    one computing at a time, ran 1.5-1.8x slower than the plain pass on 2 cores; as greenlets 1.05-1.15x).
    """

    def __init__(self, n: int, run_chunk) -> None:
        import greenlet

        self.n = n
        self.scheduler = greenlet.getcurrent()
        self.greenlets = [greenlet.greenlet(lambda c=c: run_chunk(c)) for c in range(n)]
        self.at: list[str | None] = [None] * n
        self.outs: list = [None] * n
        self.chunk: int | None = None  # the chunk computing now (None: the scheduler)

    def stop(self, name: str) -> None:
        """Called by the computing chunk before linear ``name``: wait there until the scheduler resumes it."""
        self.at[self.chunk] = name
        self.scheduler.switch()

    def round(self) -> str | None:
        """Resume every live chunk once, in order, each until it stops or finishes. Returns the linear all of them
        wait before, None when all finished; a chunk's error propagates; raises :class:`_Diverged`."""
        for c, g in enumerate(self.greenlets):
            if g.dead:
                continue
            self.chunk, self.at[c] = c, None
            try:
                out = g.switch()
            finally:
                self.chunk = None
            if g.dead:
                self.outs[c] = out
        if all(g.dead for g in self.greenlets):
            return None
        waiting = {self.at[c] for c in range(self.n)}
        if len(waiting) != 1 or any(g.dead for g in self.greenlets):
            raise _Diverged
        return waiting.pop()

    def close(self) -> None:
        """End every chunk still suspended: its forward raises :class:`_Abandon` where it waits, and unwinds."""
        for g in self.greenlets:
            if g:  # started and not finished
                try:
                    g.throw(_Abandon)
                except _Abandon:
                    pass


class SequentialEngine:
    """Walks the blocks of a causal LM in order over calibration windows."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, windows: torch.Tensor | None,
                 chunk_size: int | None = None, progress: bool = True, desc: str = "pruning",
                 sequential: bool = True, placement: Placement | None = None, stream=None,
                 propagate: str = "pruned") -> None:
        self.model = model
        self.placement = placement or Placement.of(model)
        self.stream = stream  # out of core: blocks read from the shards on arrival, written and released after
        self.adapter = adapter
        self.windows = windows
        self.requested_chunk = chunk_size
        self.chunk_size = min(chunk_size or 8, windows.shape[0]) if windows is not None else 0
        self.progress = progress
        self.desc = desc
        self.sequential = sequential  # False: every linear of a block sees the dense block (reference Wanda/SparseGPT)
        if propagate not in ("pruned", "dense") or (propagate == "dense" and sequential):
            raise ValueError(f"propagate={propagate!r} with sequential={sequential}")
        # "dense" (parallel order only): the dense block's outputs feed the next block, one pass per block
        self.propagate_dense = propagate == "dense"
        # seconds by phase of the last run() (see :meth:`breakdown`); on a GPU the phase boundaries wait for the device
        self.timings: dict[str, float] = {}
        self.unreached = []

    def _clock(self, sync: bool = True) -> float:
        if sync and self.placement.device.type == "cuda":
            torch.cuda.synchronize(self.placement.device)
        return time.perf_counter()

    def _add_time(self, key: str, since: float, sync: bool = True) -> float:
        now = self._clock(sync)
        self.timings[key] = self.timings.get(key, 0.0) + now - since
        return now

    def breakdown(self, total: float) -> dict[str, float]:
        """The last run's ``total`` seconds by phase: ``capture`` (the inputs of block 0), ``statistics`` (the hooks
        adding each linear's inputs to its statistics), ``linear_work`` (scores, masks, reconstruction: the
        visitor's per-linear calls), ``propagation`` (the block passes themselves, less the hooks' work),
        ``placement`` (onloading and offloading blocks: copies and casts), ``bookkeeping`` (the rest: the
        visitor's end of block, progress, heap trims)."""
        t = self.timings
        passes = t.get("passes", 0.0)
        parts = {"capture_s": t.get("capture", 0.0), "statistics_s": t.get("statistics", 0.0),
                 "linear_work_s": t.get("linear_work", 0.0),
                 "propagation_s": max(passes - t.get("statistics", 0.0) - t.get("linear_work_in_pass", 0.0), 0.0),
                 "placement_s": t.get("placement", 0.0)}
        parts["bookkeeping_s"] = max(total - sum(parts.values()), 0.0)
        return parts

    @torch.no_grad()
    def capture(self, windows: torch.Tensor | None = None) -> Captured:
        """Inputs of block 0 for every window, and the kwargs of every block (from one window).

        No block computes: while the decoder runs, every block's forward is replaced by one that
        records what it is called with and returns its input, so only the shell around the blocks
        (embedding, rotary embedding, masks) runs, on the compute device and in the compute dtype.
        """
        windows = self.windows if windows is None else windows
        decoder = self.adapter.decoder(self.model)
        blocks = self.adapter.blocks(self.model)
        kwargs: list[dict | None] = [None] * len(blocks)
        hidden_parts: list[torch.Tensor] = []
        mode = {"hidden": False}

        def recorder(i):
            def forward(*args, **kw):
                hidden = args[0] if args else kw.pop("hidden_states")
                if args[1:]:
                    raise RuntimeError("blocks called with positional extras are not supported")
                if mode["hidden"]:
                    if i == 0:
                        hidden_parts.append(hidden.detach().clone())
                else:
                    kwargs[i] = {k: v for k, v in kw.items() if k not in ("past_key_values", "use_cache")}
                return hidden
            return forward

        shell = [m for m in decoder.children() if m is not blocks]
        if self.stream is not None:
            self.stream.load_shell()
        saved = [self.placement.onload(m) for m in shell]
        for i, b in enumerate(blocks):
            b.forward = recorder(i)
        try:
            decoder(input_ids=windows[:1].to(self.placement.device), use_cache=False)
            mode["hidden"] = True
            chunk = self.chunk_size or windows.shape[0]
            for start in range(0, windows.shape[0], chunk):
                decoder(input_ids=windows[start:start + chunk].to(self.placement.device), use_cache=False)
        finally:
            for b in blocks:
                del b.forward
            for m, sv in zip(shell, saved):
                self.placement.offload(m, sv, write_back=False)
            if self.stream is not None:
                self.stream.release_shell()
        return Captured(hidden_parts[0] if len(hidden_parts) == 1 else torch.cat(hidden_parts), kwargs)

    passes = 0
    unreached: list  # (block, linear) of the last run no calibration token reached (routed experts), in order
    _called: set = frozenset()  # linears called in the current pass
    _stale: set = frozenset()   # linears that computed with weights not yet final in the last pass
    turning: _Turns | None = None  # the chunks of the turn pass running now
    turns = False  # the last run's sequential passes: chunks taking turns in one pass (see _Turns)
    gradients: dict | None = None  # (block, linear) -> gradient, from compute_gradients, given to the visitors
    _in_pass = False  # a block pass is running (its time includes the hooks' visits)

    def _visit(self, visitor, index: int, name: str, linear: nn.Linear, stats: LinearStats | None,
               need: Needs | None) -> None:
        if need is not None and need.gradient:
            if self.gradients is None or (index, name) not in self.gradients:
                raise RuntimeError(f"block {index} {name}: gradients were asked for but not computed "
                                   "(call compute_gradients first)")
            # siblings reading one input share their statistics; each gets its own gradient on a shallow copy
            stats = LinearStats(linear.in_features, device=linear.weight.device) if stats is None else copy.copy(stats)
            stats.gradient = self.gradients[(index, name)]
        t0 = self._clock()
        visitor.visit(index, name, linear, stats)
        t1 = self._add_time("linear_work", t0)
        if self._in_pass:
            self.timings["linear_work_in_pass"] = self.timings.get("linear_work_in_pass", 0.0) + t1 - t0

    def walk_without_data(self, visitor: BlockVisitor) -> None:
        """Visit every linear with no input statistics (parts that need no calibration pass)."""
        blocks = self.adapter.blocks(self.model)
        for i, block in enumerate(blocks):
            self._arrive(blocks, i)
            for name, linear in self.adapter.linears(block).items():
                self._visit(visitor, i, name, linear, None, visitor.needs(i, name))
            visitor.end_block(i, block)
            self._leave(block, visitor.modifies_weights)

    def _arrive(self, blocks, i: int) -> None:
        if self.stream is not None:
            self.stream.load(blocks[i], prefetch=blocks[i + 1] if i + 1 < len(blocks) else None)

    def _leave(self, block, write: bool) -> None:
        if self.stream is not None:
            self.stream.done(block, write=write)

    @torch.no_grad()
    def run(self, visitor: BlockVisitor, record: bool = False) -> Recording | None:
        """Walk all blocks with ``visitor``; afterwards the model holds the visitor's weights.

        Without windows the linears are visited with no statistics. With ``record`` (a visitor that does
        not modify weights) every block's input and the last block's output are kept for restarts.
        """
        kind = self._gradient_kind(visitor)
        if kind and self.gradients is None:  # gradients of the dense model, before any block changes
            from .services import loss_gradients

            if self.windows is None:
                raise RuntimeError("gradients were asked for without calibration windows")
            self.gradients = loss_gradients(self.model, self.adapter, self.windows, kind,
                                            chunk_size=min(self.requested_chunk or 4, 4), progress=self.progress)
        if self.windows is None or (not record and not self._any_inputs(visitor)):
            self.walk_without_data(visitor)
            return None
        n = self.windows.shape[0]
        # Sequential pruning in one chunk takes one pass; otherwise the number of passes does not depend
        # on the chunk size, and small chunks run faster (the block's activations stay in cache). One chunk
        # only while its temporaries fit the budget: 128 x 2048 windows through a 7B block would take ~46 GB.
        one_pass = self.sequential and visitor.modifies_weights and self._one_chunk_fits()
        if self.requested_chunk:
            self.chunk_size = min(self.requested_chunk, n)
        elif one_pass:  # a CPU: chunks of one window taking turns (cache-resident); an accelerator: one chunk
            self.chunk_size = n if self.placement.device.type != "cpu" else 1
        else:
            self.chunk_size = min(self._default_chunk(), n)
        self.turns = one_pass and self.chunk_size < n
        self.passes = 0  # block passes of this run (one per block is the floor)
        self.unreached = []
        self.timings = {}
        t0 = self._clock()
        cap = self.capture()
        self._add_time("capture", t0)
        self.captured = cap
        hidden = cap.hidden
        blocks = self.adapter.blocks(self.model)
        inputs = []
        bar = tqdm(range(len(blocks)), desc=self.desc, unit="block", disable=not self.progress)
        for i in bar:
            if record:
                inputs.append(hidden)
            t0 = self._clock()
            self._arrive(blocks, i)
            saved = self.placement.onload(blocks[i], keep_stored=self.stream is None)
            self._add_time("placement", t0)
            try:
                hidden = self._run_block(i, blocks[i], hidden, cap.kwargs[i], visitor)
                visitor.end_block(i, blocks[i])
            finally:  # the rewritten weights go back in the storage dtype (an interrupted block: as they are)
                t0 = self._clock()
                self.placement.offload(blocks[i], saved, write_back=visitor.modifies_weights)
                self._leave(blocks[i], visitor.modifies_weights)
                self._add_time("placement", t0)
            trim_heap()  # the block's temporaries are free: the next block's peak does not sit on their holes
        return Recording(inputs, hidden, cap.kwargs) if record else None

    def _default_chunk(self) -> int:
        """Windows per chunk when the pass count does not depend on it: one on a CPU, where a single window's
        activations stay in cache (a block pass at 1 window per chunk took 0.77x the time at 8 on 2 cores, 0.65x
        at 64, smollm2-135m, 512 tokens); 8 on an accelerator, whose kernels want the larger batch."""
        return 1 if self.placement.device.type == "cpu" else 8

    def _one_chunk_fits(self) -> bool:
        """Whether every calibration window through a block at once stays within ``ONE_CHUNK_BUDGET`` bytes of
        temporaries (about four MLP-wide activations per token in the compute dtype)."""
        config = self.model.config.get_text_config()
        width = max(getattr(config, "intermediate_size", 0) or 0, config.hidden_size)
        return self.windows.numel() * width * self.placement.compute.itemsize * 4 <= ONE_CHUNK_BUDGET

    def _gradient_kind(self, visitor) -> str | None:
        for i, block in enumerate(self.adapter.blocks(self.model)):
            for name in self.adapter.linears(block):
                need = visitor.needs(i, name)
                if need is not None and need.gradient:
                    return need.gradient
        return None

    def _any_inputs(self, visitor) -> bool:
        if hasattr(visitor, "visit_experts") and self.adapter.moe is not None:
            return True
        for i, block in enumerate(self.adapter.blocks(self.model)):
            for name in self.adapter.linears(block):
                need = visitor.needs(i, name)
                if need is not None and need.inputs:
                    return True
        return False

    @torch.no_grad()
    def forward_from(self, first: int, hidden: torch.Tensor, kwargs: list[dict], keep: bool = False):
        """Blocks ``first..end`` from ``hidden`` (their inputs) with the current weights: ``(output, kept)``,
        ``kept`` every block's input when ``keep`` (restarts for profiles and searches)."""
        blocks = self.adapter.blocks(self.model)
        kept = []
        h = hidden
        for j in range(first, len(blocks)):
            if keep:
                kept.append(h)
            self._arrive(blocks, j)
            saved = self.placement.onload(blocks[j], keep_stored=self.stream is None)
            try:
                h = block_output(blocks[j](h, **kwargs[j]))
            finally:
                self.placement.offload(blocks[j], saved, write_back=False)
            self._leave(blocks[j], False)
        return h, kept

    def _run_block(self, index: int, block: nn.Module, hidden: torch.Tensor, kwargs: dict,
                   visitor: BlockVisitor) -> torch.Tensor:
        linears = self.adapter.linears(block)
        pending = {}
        for name, linear in linears.items():
            need = visitor.needs(index, name)
            if need is None or not need.inputs:
                self._visit(visitor, index, name, linear, None, need)  # no input statistics: before any pass
            else:
                pending[name] = need
        n_chunks = (hidden.shape[0] + self.chunk_size - 1) // self.chunk_size
        turns = self.turns and n_chunks > 1
        experts = self._expert_hook(index, block, visitor)
        try:
            out = self._passes(index, block, linears, hidden, kwargs, pending, n_chunks, visitor, turns)
        finally:
            if experts is not None:
                for handle in experts[0]:
                    handle.remove()
        if experts is not None:
            experts[2].check_finite(f"block {index}")
            visitor.visit_experts(index, experts[1], experts[2])
        return out

    def _expert_hook(self, index: int, block: nn.Module, visitor):
        """For a visitor that asks (``visit_experts``): a hook on the block's routed experts collecting, from the
        tokens the router sends each one, its :class:`ExpertStats`, and two around the MLP sublayer weighing each
        token by how much the sublayer turns its residual stream (EASY-EP's ``1 - cos(h, h')``). Returns (handles,
        experts module, stats)."""
        if not hasattr(visitor, "visit_experts"):
            return None
        experts = self.adapter.experts_of(block)
        if experts is None:
            return None
        if visitor.modifies_weights:
            raise RuntimeError("expert statistics are collected in a dense pass; the visitor must not modify weights")
        stats = ExpertStats(int(experts.gate_up_proj.shape[0]))
        adapter = self.adapter

        def hook(module, args, kwargs):  # the stock call: experts(hidden_states, top_k_index, top_k_weights)
            x = args[0]
            routed = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            t0 = self._clock(sync=False)
            x = x.reshape(-1, x.shape[-1])
            stats.add(x, routed.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1),
                      lambda j, rows: adapter.expert_output(module, j, rows))
            self._add_time("statistics", t0, sync=False)

        residual = {}

        def entering(module, args):  # the mid norm's input: the residual stream the MoE sublayer adds to
            residual["h"] = args[0]

        def leaving(module, args, output):
            h = residual.pop("h").reshape(-1, output.shape[-1]).float()
            turned = torch.nn.functional.cosine_similarity(h, h + output.reshape(h.shape).float(), dim=-1)
            stats.weigh_tokens((1 - turned).clamp_min(0))

        return ([experts.register_forward_pre_hook(hook, with_kwargs=True),
                 adapter.mid_norm(block).register_forward_pre_hook(entering),
                 adapter.sublayer(block, "mlp").register_forward_hook(leaving)], experts, stats)

    def _passes(self, index, block, linears, hidden, kwargs, pending, n_chunks, visitor, turns):
        passes = 0
        while True:
            passes += 1
            self._called, self._stale = set(), set()
            try:
                out, stale = self._pass(index, block, linears, hidden, kwargs, pending, n_chunks, visitor, turns)
            except _Diverged:  # the linears pruned so far stay pruned; the rest in passes of chunks one by one
                log.info("block %d: chunks took different paths through the block; passes of chunks in turn", index)
                turns = False
                continue
            self._visit_unreached(index, linears, pending, visitor)
            if not pending and not stale:
                self.passes += passes
                if passes > 2:
                    log.debug("block %d took %d passes", index, passes)
                return out
            if passes > 2 * len(linears) + 2:
                raise RuntimeError(f"block {index}: linears {sorted(pending)} never saw clean inputs")

    def _visit_unreached(self, index, linears, pending, visitor) -> None:
        """Visit the pending linears no calibration token reached in the last pass (a routed expert the router never
        chose), once that is final: in the parallel order always (the pass was the dense block's), in the sequential
        order when nothing outside the linear's own expert changed during the pass (the routing stays as it was).
        They get :meth:`LinearStats.unreached` statistics: every input-aware score ranks their weights by magnitude and
        a reconstruction leaves their kept weights as they are. The engine lists them in ``unreached``."""
        for name in [n for n in pending if n not in self._called]:
            if self.sequential and any(self.adapter.depends(name, p) for p in self._stale):
                continue
            linear = linears[name]
            log.info("block %d %s: no calibration token reaches it; pruned by weight magnitude", index, name)
            self.unreached.append((index, name))
            self._visit(visitor, index, name, linear,
                        LinearStats.unreached(linear.in_features, pending[name], device=linear.weight.device),
                        pending[name])
            del pending[name]

    @staticmethod
    def _share_or_open(name, x, sibling, stats, owner, asked, pending) -> None:
        """``name``'s statistics: its sibling's (same input, same request at the start of the pass), else its own."""
        if sibling in stats and asked.get(sibling) == pending[name]:
            stats[name], owner[name] = stats[sibling], owner[sibling]
        else:
            stats[name] = LinearStats.for_needs(x.shape[-1], pending[name], device=x.device)
            owner[name] = name

    def _pass(self, index, block, linears, hidden, kwargs, pending, n_chunks, visitor, turns: bool = False):
        """One pass of all chunks through the block. Returns (outputs, whether any linear computed stale).

        With ``turns`` (sequential, chunks taking turns, see :class:`_Turns`) every pending linear is pruned
        before any chunk computes it, so one pass suffices; raises :class:`_Diverged` when the chunks' paths
        through the block differ."""
        if turns:
            return self._turn_pass(index, block, linears, hidden, kwargs, pending, n_chunks, visitor)
        by_module = {id(m): n for n, m in linears.items()}
        asked = dict(pending)                  # what each linear pending at the start of the pass needs
        stats: dict[str, LinearStats] = {}
        owner: dict[str, str] = {}             # linear -> the linear whose input feeds its shared stats
        collecting: dict[str, bool] = {}      # decided on chunk 0: stats of this linear are clean
        stale_in_pass: set[str] = set()        # linears that computed with weights not yet final
        # inputs read in this chunk, by weak reference: a sibling is found by identity (a dead input cannot be the
        # live one) without keeping every linear's input alive to the end of the block
        seen_inputs: list[tuple[weakref.ref, str]] = []
        called: list[str] = []                 # linears called so far in this chunk, in order
        state = {"chunk": 0}

        def pre_hook(module, args):
            name = by_module[id(module)]
            x = args[0]
            chunk = state["chunk"]
            self._called.add(name)
            if name in pending:
                if name not in collecting:  # decided where it is first called (chunk 0 unless tokens skip it)
                    sibling = next((n for t, n in seen_inputs if t() is x), None)
                    if sibling is not None and sibling in collecting:
                        collecting[name] = collecting[sibling]   # same input: same cleanliness
                    else:
                        # clean: no linear called before it in this chunk that it depends on is still stale
                        collecting[name] = not self.sequential or not any(
                            p in stale_in_pass and self.adapter.depends(name, p) for p in called)
                    if collecting[name]:
                        # (a sequential sibling may be visited and out of ``pending`` already: compare what it asked)
                        self._share_or_open(name, x, sibling, stats, owner, asked, pending)
                if collecting[name]:
                    if owner[name] == name:
                        # no device sync inside a pass (it would stall the queue): on a GPU this reads the
                        # time to queue the statistics, and their device time counts as propagation
                        t0 = self._clock(sync=False)
                        stats[name].add(x)
                        self._add_time("statistics", t0, sync=False)
                    if chunk == n_chunks - 1 and self.sequential:
                        stats[name].check_finite(f"block {index} {name}")
                        self._visit(visitor, index, name, module, stats[name], pending[name])
                        del pending[name]
            if name in pending and visitor.modifies_weights:
                stale_in_pass.add(name)
            seen_inputs.append((weakref.ref(x), name))
            called.append(name)

        handles = [m.register_forward_pre_hook(pre_hook) for m in linears.values()]
        # A parallel statistics pass throws its outputs away (the weights change after it), so the
        # last linear of the block, whose output feeds no other linear, need not compute at all; unless the
        # dense block's outputs are what feeds the next block.
        skip = list(linears.values())[-1] if (not self.sequential and pending and visitor.modifies_weights
                                              and not self.propagate_dense) else None
        if skip is not None:
            skip.forward = lambda x, _m=skip: x.new_zeros(*x.shape[:-1], _m.out_features)
        outs = []
        t_pass = self._clock()
        self._in_pass = True
        try:
            for c in range(n_chunks):
                state["chunk"] = c
                called.clear()
                seen_inputs.clear()
                x = hidden[c * self.chunk_size:(c + 1) * self.chunk_size]
                outs.append(block_output(block(x, **kwargs)))
        finally:
            self._in_pass = False
            self._add_time("passes", t_pass)
            for h in handles:
                h.remove()
            if skip is not None:
                del skip.forward
            seen_inputs.clear()
        # prune after the pass: every linear in the parallel order (statistics of the dense block); in the sequential
        # order the clean ones the last chunk did not call (a routed expert none of its tokens reached)
        for name in [n for n in pending if collecting.get(n)]:
            stats[name].check_finite(f"block {index} {name}")
            self._visit(visitor, index, name, linears[name], stats[name], pending[name])
            del pending[name]
        self._stale = stale_in_pass if visitor.modifies_weights else set()
        stale = bool(stale_in_pass) and visitor.modifies_weights and not self.propagate_dense
        assert skip is None or stale, "outputs of a pass that skipped a linear must not be used"
        return (outs[0] if len(outs) == 1 else torch.cat(outs)), stale  # one chunk: no copy of the outputs

    def _turn_pass(self, index, block, linears, hidden, kwargs, pending, n_chunks, visitor):
        by_module = {id(m): n for n, m in linears.items()}
        asked = dict(pending)
        stats: dict[str, LinearStats] = {}
        owner: dict[str, str] = {}
        seen: list[list[tuple[weakref.ref, str]]] = [[] for _ in range(n_chunks)]  # per chunk, as in _pass
        size = self.chunk_size

        def pre_hook(module, args):
            c = chunks.chunk
            if c is None:
                raise RuntimeError(f"block {index} ran a linear outside its chunks' turns")
            name = by_module[id(module)]
            x = args[0]
            self._called.add(name)
            if name in pending:
                sibling = next((n for t, n in seen[c] if t() is x), None)
                if name not in stats:  # the first chunk to arrive: share a sibling's statistics, or open its own
                    self._share_or_open(name, x, sibling, stats, owner, asked, pending)
                if owner[name] != name:  # a sibling's statistics, complete: it was pruned before anything computed
                    self._visit(visitor, index, name, module, stats[name], pending[name])
                    del pending[name]
                else:
                    t0 = self._clock(sync=False)
                    stats[name].add(x)
                    self._add_time("statistics", t0, sync=False)
                    chunks.stop(name)  # until every chunk added its inputs and the linear is pruned
            seen[c].append((weakref.ref(x), name))

        handles = [m.register_forward_pre_hook(pre_hook) for m in linears.values()]
        t_pass = self._clock()
        self._in_pass = True
        chunks = None
        try:
            self.turning = chunks = _Turns(n_chunks,
                                          lambda c: block_output(block(hidden[c * size:(c + 1) * size], **kwargs)))
            while (name := chunks.round()) is not None:
                stats[name].check_finite(f"block {index} {name}")
                self._visit(visitor, index, name, linears[name], stats[name], pending[name])
                del pending[name]
        finally:
            if chunks is not None:
                chunks.close()
            self.turning = None
            self._in_pass = False
            self._add_time("passes", t_pass)
            for h in handles:
                h.remove()
        return torch.cat(chunks.outs), False
