"""Multi-head-only families on transformers' shared attention interface: GPT-2, OPT, GPT-NeoX (Pythia).

Each reference is written in the family's own weight layout, without hf_gqa: every K/V head of the original
multi-head model is replaced by the mean of its group of `heads // groups` consecutive heads.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, OPTConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention
from transformers.models.opt.modeling_opt import OPTAttention

from . import TINY, FamilyCase, group_mean_heads

HEADS = 8


def gpt2_config(**kw) -> GPT2Config:
    defaults = dict(
        vocab_size=256, n_embd=64, n_layer=2, n_head=HEADS, n_positions=256, bos_token_id=1, eos_token_id=2
    )
    return GPT2Config(**{**defaults, **kw})


def opt_config(**kw) -> OPTConfig:
    defaults = dict(
        **TINY,
        num_attention_heads=HEADS,
        ffn_dim=128,
        word_embed_proj_dim=TINY["hidden_size"],
        pad_token_id=0,
    )
    return OPTConfig(**{**defaults, **kw})


def gpt_neox_config(**kw) -> GPTNeoXConfig:
    defaults = dict(**TINY, num_attention_heads=HEADS, intermediate_size=128)
    return GPTNeoXConfig(**{**defaults, **kw})


def make_model(config_fn, **kw):
    """A factory of a tiny fp32 model in eval mode, seeded, on `"sdpa"` attention."""

    def make():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config_fn(**kw), attn_implementation="sdpa").eval()

    return make


def gpt2_mean_reference(model, groups: int) -> None:
    """`c_attn` Conv1D weight `[hidden, 3 * hidden]`, columns `q | k | v`: average the k and v column blocks."""
    for module in model.modules():
        if isinstance(module, GPT2Attention) and not module.is_cross_attention:
            hidden, heads = module.embed_dim, module.num_heads
            with torch.no_grad():
                for block in (slice(hidden, 2 * hidden), slice(2 * hidden, 3 * hidden)):
                    weight = module.c_attn.weight[:, block]
                    module.c_attn.weight[:, block] = group_mean_heads(weight, heads, groups, dim=1)
                    module.c_attn.bias[block] = group_mean_heads(module.c_attn.bias[block], heads, groups)


def opt_mean_reference(model, groups: int) -> None:
    """Separate `k_proj`/`v_proj` linears `[heads * d, hidden]`: average the rows of each group of heads."""
    for module in model.modules():
        if isinstance(module, OPTAttention):
            for linear in (module.k_proj, module.v_proj):
                with torch.no_grad():
                    linear.weight.copy_(group_mean_heads(linear.weight, module.num_heads, groups))
                    if linear.bias is not None:
                        linear.bias.copy_(group_mean_heads(linear.bias, module.num_heads, groups))


def _mean_interleaved(t: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """`[heads * 3 * d, ...]` rows interleaved per head as `(q, k, v)`: k and v averaged over each group."""
    per_head = t.reshape(heads, 3, t.shape[0] // (3 * heads), *t.shape[1:]).clone()
    grouped = per_head.reshape(groups, heads // groups, *per_head.shape[1:])
    grouped[:, :, 1:] = grouped[:, :, 1:].mean(dim=1, keepdim=True)
    return grouped.reshape(t.shape)


def gpt_neox_mean_reference(model, groups: int) -> None:
    """`query_key_value` rows interleaved per head `[q_h, k_h, v_h]`: average the k_h and v_h of each group."""
    for module in model.modules():
        if isinstance(module, GPTNeoXAttention):
            heads = module.config.num_attention_heads
            linear = module.query_key_value
            with torch.no_grad():
                linear.weight.copy_(_mean_interleaved(linear.weight, heads, groups))
                if linear.bias is not None:
                    linear.bias.copy_(_mean_interleaved(linear.bias, heads, groups))


CASES = [
    FamilyCase(
        "gpt2",
        make_model(gpt2_config),
        gpt2_mean_reference,
        groups=[4, 2, 1],
        kv_heads=HEADS,
        num_heads=HEADS,
    ),
    FamilyCase(
        "opt",
        make_model(opt_config),
        opt_mean_reference,
        groups=[4, 2, 1],
        kv_heads=HEADS,
        num_heads=HEADS,
    ),
    FamilyCase(
        "gpt_neox",
        make_model(gpt_neox_config),
        gpt_neox_mean_reference,
        groups=[4, 2, 1],
        kv_heads=HEADS,
        num_heads=HEADS,
    ),
]
