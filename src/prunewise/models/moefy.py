"""A mixture of experts made from a dense Llama-family model's own MLPs (MoEfication), as a stock Qwen2-MoE.

Each block's MLP channels are split into a shared expert and ``E`` routed experts of equal width (the caller
chooses which channels go where and fits the router); a channel's gate row, up row and down column move
together, so with every expert selected the MLP is the dense one. Qwen2-MoE is the stock class that allows it:
Llama attention (``qkv_bias`` off), a shared expert beside the routed ones, and routing weights that are the
router's softmax probabilities, not renormalised over the top-k (``norm_topk_prob`` off). The caller keeps the router's
logits within ``+-s`` (s about 1e-3), so every probability is ``1/E`` to a factor ``exp(2s)``, and each routed expert's down projection is multiplied by ``E``: the selected experts then add
their channels' dense contribution, to that factor. The shared expert's gate row is zero (``sigmoid(0) = 1/2``)
and its down projection doubled.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

from ..errors import PrunewiseError
from .adapters import get_adapter

SOURCE_FAMILIES = ("llama", "mistral", "qwen2")


def moe_config(dense_config, experts: int, expert_width: int, shared_width: int, top_k: int) -> Qwen2MoeConfig:
    c = dense_config.get_text_config()
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False) or getattr(c, "hidden_act", "silu") != "silu":
        raise PrunewiseError("MoEfication keeps the attention and MLP as they are; this model has biases or a "
                             f"{c.hidden_act} MLP, which Qwen2-MoE cannot hold exactly")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise PrunewiseError("Qwen2-MoE derives the head width from hidden_size / heads; this model's differs")
    return Qwen2MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act="silu", max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        rope_parameters=dict(c.rope_parameters), use_sliding_window=False, decoder_sparse_step=1, mlp_only_layers=[],
        moe_intermediate_size=expert_width, shared_expert_intermediate_size=shared_width, num_experts=experts,
        num_experts_per_tok=top_k, norm_topk_prob=False, qkv_bias=False, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None))


@torch.no_grad()
def moe_from_dense(dense: nn.Module, groups: list[torch.Tensor], shared: list[torch.Tensor],
                   routers: list[torch.Tensor], top_k: int) -> nn.Module:
    """The Qwen2-MoE twin of ``dense``: per block, ``groups[i]`` (E, width) channel indices of each routed expert,
    ``shared[i]`` the shared expert's channels, ``routers[i]`` (E, hidden) the router, already scaled so that its
    logits stay small (see the module's note)."""
    adapter = get_adapter(dense)
    if adapter.family not in SOURCE_FAMILIES:
        raise PrunewiseError(f"MoEfication builds from a Llama-family model ({', '.join(SOURCE_FAMILIES)}), not "
                             f"{adapter.family}")
    n_experts, width = groups[0].shape
    config = moe_config(dense.config, n_experts, width, int(shared[0].numel()), top_k)
    with torch.device("meta"):
        moe = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name, tensor in dense.state_dict().items():
        if ".mlp." not in name:
            state[name] = tensor.detach().float()
    for i, block in enumerate(adapter.blocks(dense)):
        lin = adapter.roles_of(block)
        gate, up, down = lin["gate"].weight.float(), lin["up"].weight.float(), lin["down"].weight.float()
        p = f"model.layers.{i}.mlp"
        idx = groups[i]
        state[f"{p}.experts.gate_up_proj"] = torch.cat([gate[idx], up[idx]], dim=1)          # [E, 2w, H]
        state[f"{p}.experts.down_proj"] = down[:, idx].permute(1, 0, 2) * n_experts           # [E, H, w]
        r = routers[i].float()
        state[f"{p}.gate.weight"] = r
        s = shared[i]
        state[f"{p}.shared_expert.gate_proj.weight"] = gate[s]
        state[f"{p}.shared_expert.up_proj.weight"] = up[s]
        state[f"{p}.shared_expert.down_proj.weight"] = down[:, s] * 2.0
        state[f"{p}.shared_expert_gate.weight"] = torch.zeros(1, gate.shape[1])
    missing, unexpected = moe.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise PrunewiseError(f"the MoE twin does not match the dense model (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); this transformers version lays Qwen2-MoE out differently")
    if config.tie_word_embeddings:
        moe.tie_weights()
    # the rotary frequencies (a buffer, not in the state dict) were built on the meta device: build them again
    moe.model.rotary_emb = type(moe.model.rotary_emb)(config=config)
    left = [n for n, t in list(moe.named_parameters()) + list(moe.named_buffers()) if t.is_meta]
    if left:
        raise PrunewiseError(f"the MoE twin left {left[:3]} unset; this transformers version lays Qwen2-MoE out "
                             "differently")
    return moe.eval()

