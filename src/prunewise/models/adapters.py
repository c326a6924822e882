"""Architecture adapters: the only place that knows where a family keeps its blocks and linears.

Adding a model family means adding one entry to ``ADAPTERS``. Everything else in prunewise
(engine, scores, allocation, export) asks the adapter instead of hard-coding ``model.model.layers``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PrunewiseError
from .experts import EXPERT_LINEARS, UnfusedExperts, expert_matrices, expert_views, refuse, unfuse

LLAMA_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
# role -> linear name inside a block: what structured pruning slices (query/key/value/output, gate/up/down)
LLAMA_ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
# a dense layer's MLP where a MoE model has one, and the shared expert of its MoE layers
QWEN2_MOE_LINEARS = LLAMA_LINEARS + (
    "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")

# DeepSeek-V3's multi-head latent attention (q_proj without a query LoRA rank, else q_a_proj/q_b_proj), its dense
# layers' MLP, and its shared experts
DEEPSEEK_V3_LINEARS = (
    "self_attn.q_proj", "self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
    "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj")


@dataclass(frozen=True)
class MoELayout:
    """Where a mixture-of-experts family keeps its routed experts: transformers 5.x fuses a layer's experts into
    3-D parameters, ``gate_up_proj`` [E, 2I, H] (expert e's gate rows first, then its up rows) and ``down_proj``
    [E, H, I], beside a router whose ``weight`` [E, H] has one row per expert. A shared expert (Qwen2-MoE) is an
    ordinary MLP of the block, never a routed unit."""

    experts: str = "mlp.experts"
    router: str = "mlp.gate"
    count_key: str = "num_experts"  # the config field holding the routed-expert count (its canonical name)
    shared: tuple[str, ...] = ()    # modules of a shared expert and its gate (kept whole by the experts structure)
    # checkpoints on disk (what transformers 5 saves, and the hub holds) keep each expert's matrices apart:
    # ``{disk_experts}.{e}.{gate|up|down}.weight``, and may name the MoE module otherwise (``disk_renames``: the
    # in-memory piece of a name and its piece on disk); fused names are read from them (a streamed model)
    disk_experts: str = "mlp.experts"
    disk_parts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    disk_renames: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one decoder-only family keeps its decoder, blocks and prunable linears."""

    family: str
    model_types: tuple[str, ...]
    linear_names: tuple[str, ...] = LLAMA_LINEARS
    # candidate attribute paths from the CausalLM to the decoder (the module holding `.layers`)
    decoder_paths: tuple[str, ...] = ("model", "model.language_model", "language_model.model")
    final_norm: str = "norm"  # attribute path, from the decoder, of the norm applied after the last block
    # the norm whose input is the residual stream between the attention and the MLP sublayer (first found)
    mid_norms: tuple[str, ...] = ("pre_feedforward_layernorm", "post_attention_layernorm")
    roles: dict[str, str] = field(default_factory=lambda: dict(LLAMA_ROLES))
    attention_module: str = "self_attn"  # the attention sublayer inside a block
    mlp_module: str = "mlp"              # the MLP sublayer inside a block
    # stock config flags that switch on an output bias (zero biases are added to the siblings): bias kind -> flag
    bias_flags: dict[str, str] = field(default_factory=lambda: {"o_proj_bias": "attention_bias",
                                                                "down_proj_bias": "mlp_bias"})
    moe: MoELayout | None = None  # routed experts (mixture-of-experts families)

    def coupled(self, kind: str) -> tuple[str, ...]:
        """Linear names (relative to a block) of the attention or the MLP sublayer: pruned together by units."""
        return tuple(self.roles[r] for r in (ATTENTION_ROLES if kind == "attention" else MLP_ROLES))

    def roles_of(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The block's linears by role (q, k, v, o, gate, up, down)."""
        out = {}
        for role, name in self.roles.items():
            module = _get_path(block, name)
            if not isinstance(module, nn.Linear):
                raise PrunewiseError(f"a {self.family} block has no linear {name} ({role}); structured pruning needs "
                                     "q, k, v, o, gate, up and down projections")
            out[role] = module
        return out

    def sublayer(self, block: nn.Module, kind: str) -> nn.Module:
        """The block's ``attention`` or ``mlp`` sublayer module."""
        return getattr(block, self.attention_module if kind == "attention" else self.mlp_module)

    def set_sublayer(self, block: nn.Module, kind: str, module: nn.Module) -> None:
        setattr(block, self.attention_module if kind == "attention" else self.mlp_module, module)

    def set_blocks(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        """Replace the block list (survivors renumbered for the KV cache) and the config's block counts."""
        decoder = self.decoder(model)
        n = len(decoder.layers)
        keep = {id(b) for b in blocks}
        dropped = [i for i, b in enumerate(decoder.layers) if id(b) not in keep]
        decoder.layers = nn.ModuleList(blocks)
        for j, block in enumerate(blocks):
            if hasattr(block, "layer_idx"):
                block.layer_idx = j
            attn = getattr(block, self.attention_module, None)
            if hasattr(attn, "layer_idx"):
                attn.layer_idx = j
        configs = {id(model.config): model.config}
        text = getattr(model.config, "text_config", None)
        if text is not None:
            configs[id(text)] = text
        for config in configs.values():
            if getattr(config, "num_hidden_layers", None) == n:
                config.num_hidden_layers = len(blocks)
            types = getattr(config, "layer_types", None)
            if isinstance(types, list) and len(types) == n:
                config.layer_types = [t for i, t in enumerate(types) if i not in dropped]

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module that owns the embedding, the block list and the final norm."""
        for path in self.decoder_paths:
            module = _get_path(model, path)
            if module is not None and isinstance(getattr(module, "layers", None), nn.ModuleList):
                return module
        raise PrunewiseError(
            f"{type(model).__name__} has no decoder with a `.layers` list at {self.decoder_paths}; "
            "this checkpoint layout is not supported by the "
            f"{self.family} adapter"
        )

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def block_prefix(self, model: nn.Module) -> str:
        """Full module name of the block list, e.g. ``model.layers``."""
        decoder = self.decoder(model)
        for name, module in model.named_modules():
            if module is decoder:
                return f"{name}.layers" if name else "layers"
        raise PrunewiseError("decoder not found among the model's modules")

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """Prunable linears of one block, by name relative to the block, in forward order."""
        found = {}
        for name in self.linear_names:
            module = _get_path(block, name)
            if module is None:
                continue
            if not isinstance(module, nn.Linear):
                raise PrunewiseError(f"{name} in a {self.family} block is {type(module).__name__}, not nn.Linear; "
                                     "quantized or fused checkpoints must be dequantized first")
            found[name] = module
        if not found:
            raise PrunewiseError(f"no prunable linears found in a {self.family} block (looked for {self.linear_names})")
        experts = _get_path(block, self.moe.experts) if self.moe is not None else None
        if isinstance(experts, UnfusedExperts):  # inside unfused(): the routed experts' linears, expert by expert
            for e, expert in enumerate(experts):
                for part in EXPERT_LINEARS:
                    found[f"{self.moe.experts}.{e}.{part}"] = getattr(expert, part)
        return found

    def weights(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """Prunable weights of one block by name: the linears', and each routed expert's matrices as views of the fused
        tensors (``mlp.experts.{e}.gate_proj`` ...: the names its linears have inside :meth:`unfused`)."""
        out = {name: linear.weight for name, linear in self.linears(block).items()}
        experts = self.experts_of(block)
        if experts is not None and not isinstance(experts, UnfusedExperts) and experts.gate_up_proj.numel():
            out.update(expert_views(experts, self.moe.experts))
        return out

    @contextlib.contextmanager
    def unfused(self, model: nn.Module) -> Iterator[None]:
        """Within: every MoE layer's routed experts are linears (:class:`~.experts.UnfusedExperts`), so the engine and
        every weight-level part reach them; on leaving (an error too) they are fused back into the stock modules."""
        swapped = []
        try:
            for block in self.blocks(model):
                experts = self.experts_of(block)
                if experts is None or isinstance(experts, UnfusedExperts):
                    continue
                if experts.gate_up_proj.is_meta:
                    raise PrunewiseError("pruning inside the routed experts of a model on the meta device (--offload "
                                         "disk) is not supported yet; load it in memory, or remove whole experts with "
                                         "--structure experts")
                owner, leaf = self._experts_owner(block)
                setattr(owner, leaf, unfuse(experts))
                swapped.append((owner, leaf))
            yield
        finally:
            for owner, leaf in swapped:
                setattr(owner, leaf, refuse(getattr(owner, leaf)))

    def _experts_owner(self, block: nn.Module) -> tuple[nn.Module, str]:
        parent, _, leaf = self.moe.experts.rpartition(".")
        return (_get_path(block, parent) if parent else block), leaf

    def disk_sources(self, full: str, present) -> str | list[list[str]] | None:
        """Where parameter ``full`` (a full in-memory name) lives in a checkpoint whose names ``present`` holds: a name
        on disk (a renamed module), or for a fused expert tensor, per expert the names concatenated along the first
        dimension (gate rows then up rows for ``gate_up_proj``) and stacked; None when neither applies."""
        if self.moe is None:
            return None
        for memory, disk in self.moe.disk_renames:
            renamed = full.replace(f".{memory}.", f".{disk}.", 1)
            if renamed != full and renamed in present:
                return renamed
        fused = f".{self.moe.experts}."
        head, sep, leaf = full.rpartition(fused)
        if not sep or leaf not in ("gate_up_proj", "down_proj"):
            return None
        gate, up, down = self.moe.disk_parts
        parts = (gate, up) if leaf == "gate_up_proj" else (down,)
        out = []
        for e in itertools.count():
            names = [f"{head}.{self.moe.disk_experts}.{e}.{part}.weight" for part in parts]
            if names[0] not in present:
                return out or None
            out.append(names)

    def in_routed_expert(self, name: str) -> bool:
        """Whether ``name`` (relative to a block) is a routed expert's matrix, ``mlp.experts.{e}.gate_proj`` ..."""
        return self.moe is not None and name.startswith(f"{self.moe.experts}.")

    def expert_group(self, name: str) -> tuple | None:
        """For a linear name inside a block: which routed expert (``("expert", e)``) or shared expert (``("shared",)``)
        it belongs to, else None. Linears of two different groups read the same MoE input and never each other's
        outputs, so one being pruned does not make the other's inputs stale."""
        if self.in_routed_expert(name):
            return ("expert", name[len(self.moe.experts) + 1:].split(".", 1)[0])
        if self.moe is not None and any(name.startswith(f"{s}.") for s in self.moe.shared):
            return ("shared",)
        return None

    def depends(self, name: str, earlier: str) -> bool:
        """Whether linear ``earlier``, called before ``name`` in a block, can change ``name``'s inputs: always, unless
        both belong to different experts of the MoE layer (routed or shared: all read the layer's input)."""
        group, other = self.expert_group(name), self.expert_group(earlier)
        return group is None or other is None or group == other

    def mid_norm(self, block: nn.Module) -> nn.Module:
        """The norm that reads the residual stream after the attention sublayer (its input is ``h + attn(h)``)."""
        for name in self.mid_norms:
            module = getattr(block, name, None)
            if module is not None:
                return module
        raise PrunewiseError(f"a {self.family} block has none of {self.mid_norms}; set mid_norms in its adapter")

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output: the decoder's final norm, the output head, and final softcapping.

        Softcapping follows the CausalLM forward of transformers: ``tanh(logits / c) * c`` where the
        model's own config sets ``final_logit_softcapping`` (Gemma 2/3 text models).
        """
        norm = _get_path(self.decoder(model), self.final_norm)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if norm is None or head is None:
            raise PrunewiseError(f"{type(model).__name__} has no final norm at decoder.{self.final_norm} or no output head; "
                                 f"set final_norm in the {self.family} adapter")
        logits = head(norm(hidden))
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def heads(self, config) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dimension)."""
        text = getattr(config, "text_config", None) or config
        n_heads = text.num_attention_heads
        n_kv = getattr(text, "num_key_value_heads", None) or n_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
        return n_heads, n_kv, head_dim

    # -- mixtures of experts: the routed experts of a block, one index slicing every tensor of an expert --

    def experts_of(self, block: nn.Module) -> nn.Module | None:
        """The block's fused routed-experts module, or None (a dense family, or a dense layer of a MoE model)."""
        if self.moe is None:
            return None
        experts = _get_path(block, self.moe.experts)
        if experts is None:
            return None
        if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True) or \
                getattr(experts, "has_bias", False):
            raise PrunewiseError(f"the {self.family} experts here are stored transposed, interleaved or with biases; "
                                 "prunewise reads [E, 2I, H] gate/up and [E, H, I] down without biases")
        return experts

    def router_of(self, block: nn.Module) -> nn.Module:
        return _get_path(block, self.moe.router)

    def expert_count(self, model: nn.Module) -> int | None:
        """Routed experts per MoE layer (the config's one count), or None for a dense model."""
        if self.moe is None:
            return None
        return getattr(model.config.get_text_config(), self.moe.count_key, None)

    def experts_per_token(self, model: nn.Module) -> int:
        return int(model.config.get_text_config().num_experts_per_tok)

    def router_groups(self, model: nn.Module) -> tuple[int, int]:
        """``(groups, groups chosen per token)`` of a grouped router (DeepSeek-V3: experts in ``n_group`` groups of
        consecutive indices, each token picking its experts inside its ``topk_group`` best groups, a group scored by
        its two best experts); ``(1, 1)`` for a plain top-k router."""
        text = model.config.get_text_config()
        return int(getattr(text, "n_group", None) or 1), int(getattr(text, "topk_group", None) or 1)

    @staticmethod
    def expert_matrices(experts: nn.Module, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s weights as linear-shaped views: gate and up [I, H], down [H, I]."""
        return dict(zip(("gate", "up", "down"), expert_matrices(experts, e)))

    @staticmethod
    def expert_output(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s output ``f_e(x)`` for token rows ``x`` [T, H], before its gate value (the stock forward's)."""
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        return torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])

    def keep_experts(self, block: nn.Module, keep: torch.Tensor) -> None:
        """Keep only the routed experts ``keep`` (sorted indices) of the block: every expert tensor and the router's
        rows (and any per-expert router bias) sliced with the same index; the modules' counts follow."""
        experts, router = self.experts_of(block), self.router_of(block)
        keep = keep.to(torch.long).sort().values
        for owner, names in ((experts, ("gate_up_proj", "down_proj")), (router, ("weight", "bias", "e_score_correction_bias"))):
            for name in names:
                t = getattr(owner, name, None)
                if t is None:
                    continue
                sliced = t.detach()[keep.to(t.device)].clone()
                if isinstance(t, nn.Parameter):
                    setattr(owner, name, nn.Parameter(sliced, requires_grad=t.requires_grad))
                else:
                    owner.register_buffer(name, sliced)
        for owner in (experts, router):
            if hasattr(owner, "num_experts"):
                owner.num_experts = int(keep.numel())

    @torch.no_grad()
    def merge_experts(self, block: nn.Module, groups: dict[int, list[int]], counts: torch.Tensor) -> None:
        """For each kept expert ``k`` with ``groups[k]`` to merge into it: its matrices become the ``counts``-weighted
        average of its own and theirs (every fused tensor of an expert, one index each; router rows unchanged)."""
        experts = self.experts_of(block)
        for k, merged in groups.items():
            if not merged:
                continue
            members = [k, *merged]
            weights = counts[members].double()
            weights = weights / weights.sum()
            for name in ("gate_up_proj", "down_proj"):
                t = getattr(experts, name)
                average = sum(w * t[m].double() for w, m in zip(weights.tolist(), members))
                t[k] = average.to(t.dtype)

    def set_expert_count(self, model: nn.Module, n: int) -> None:
        setattr(model.config.get_text_config(), self.moe.count_key, int(n))

    @contextlib.contextmanager
    def truncated(self, model: nn.Module, n_blocks: int) -> Iterator[None]:
        """Temporarily keep only the first ``n_blocks`` blocks, so a forward stops early."""
        decoder = self.decoder(model)
        full = decoder.layers
        decoder.layers = nn.ModuleList(list(full)[:n_blocks])
        try:
            yield
        finally:
            decoder.layers = full


ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter("llama", ("llama",)),
    ArchitectureAdapter("mistral", ("mistral",), bias_flags={}),
    ArchitectureAdapter("qwen2", ("qwen2",), bias_flags={}),
    ArchitectureAdapter("qwen3", ("qwen3",), bias_flags={}),
    ArchitectureAdapter("gemma", ("gemma", "gemma2"), bias_flags={}),
    ArchitectureAdapter("gemma3", ("gemma3", "gemma3_text"), bias_flags={"o_proj_bias": "attention_bias"}),
    # mixtures of experts: attention linears are weight-level units; routed experts are the experts structure's
    ArchitectureAdapter("mixtral", ("mixtral",), bias_flags={},
                        moe=MoELayout(count_key="num_local_experts", disk_experts="block_sparse_moe.experts",
                                      disk_parts=("w1", "w3", "w2"), disk_renames=(("mlp", "block_sparse_moe"),))),
    ArchitectureAdapter("qwen2_moe", ("qwen2_moe",), linear_names=QWEN2_MOE_LINEARS, bias_flags={},
                        moe=MoELayout(shared=("mlp.shared_expert", "mlp.shared_expert_gate"))),
    ArchitectureAdapter("qwen3_moe", ("qwen3_moe",), bias_flags={}, moe=MoELayout(count_key="num_local_experts")),
    ArchitectureAdapter("olmoe", ("olmoe",), bias_flags={}, moe=MoELayout()),
    # multi-head latent attention: weight-level units only (no q/k/v roles for structured attention pruning)
    ArchitectureAdapter("deepseek_v3", ("deepseek_v3",), linear_names=DEEPSEEK_V3_LINEARS, bias_flags={},
                        moe=MoELayout(count_key="n_routed_experts", shared=("mlp.shared_experts",))),
)


def get_adapter(model_or_config) -> ArchitectureAdapter:
    """The adapter for a model (or its config), chosen by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type.startswith("prunewise_"):  # a family's pruned twin (per-block widths)
        model_type = model_type[len("prunewise_"):]
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise PrunewiseError(f"no architecture adapter for model_type '{model_type}'; supported: {supported} "
                         "(add one to prunewise.models.adapters.ADAPTERS)")


def _get_path(root: nn.Module, path: str):
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full name -> weight of every prunable linear (and routed expert matrix, see ``ArchitectureAdapter.weights``), in
    block order."""
    adapter = get_adapter(model)
    prefix = adapter.block_prefix(model)
    out = {}
    for i, block in enumerate(adapter.blocks(model)):
        for name, weight in adapter.weights(block).items():
            out[f"{prefix}.{i}.{name}"] = weight
    return out
