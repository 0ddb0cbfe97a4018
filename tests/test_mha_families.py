"""Family-specific checks of the multi-head-only families (GPT-2, OPT, GPT-NeoX) beyond `test_families.py`."""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from peft import LoraConfig, get_peft_model
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D

import hf_gqa
from hf_gqa.architectures.gpt2 import GPT2GQAAttention
from hf_gqa.architectures.gpt_neox import GPTNeoXGQAAttention
from hf_gqa.architectures.opt import OPTGQAAttention
from hf_gqa.cache import GQACache

from .cases.mha_shared import (
    HEADS,
    gpt2_config,
    gpt2_mean_reference,
    gpt_neox_config,
    gpt_neox_mean_reference,
    make_model,
    opt_config,
    opt_mean_reference,
)

HIDDEN, HEAD_DIM = 64, 8

FAMILIES = {
    "gpt2": (gpt2_config, gpt2_mean_reference, ["c_attn", "c_proj"], GPT2GQAAttention),
    "opt": (opt_config, opt_mean_reference, ["q_proj", "k_proj", "v_proj", "out_proj"], OPTGQAAttention),
    "gpt_neox": (gpt_neox_config, gpt_neox_mean_reference, ["query_key_value", "dense"], GPTNeoXGQAAttention),
}

VARIANTS = [
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
    ("gpt2", dict(reorder_and_upcast_attn=True)),
    ("opt", dict(do_layer_norm_before=False)),
    ("opt", dict(enable_bias=False)),
    ("gpt_neox", dict(rotary_pct=1.0, use_parallel_residual=False)),
    ("gpt_neox", dict(attention_bias=False)),
]
VARIANT_IDS = [f"{family}-{'-'.join(kw)}" for family, kw in VARIANTS]


def logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def gqa_modules(model, cls) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


@pytest.mark.parametrize("family", FAMILIES)
def test_module_layout_and_names(family: str):
    config_fn, _, names, cls = FAMILIES[family]
    model = hf_gqa.patch(make_model(config_fn)(), groups=2)
    modules = gqa_modules(model, cls)
    assert len(modules) == 2
    for module in modules:
        assert module.num_key_value_heads == 2 and module.num_key_value_groups == HEADS // 2
        for name in names:
            assert hasattr(module, name)
    kv = 2 * HEAD_DIM
    m = modules[0]
    if family == "gpt2":
        assert isinstance(m.c_attn, Conv1D) and m.c_attn.weight.shape == (HIDDEN, HIDDEN + 2 * kv)
        assert m.c_attn.bias.shape == (HIDDEN + 2 * kv,)
    elif family == "opt":
        assert m.k_proj.weight.shape == m.v_proj.weight.shape == (kv, HIDDEN)
        assert m.q_proj.weight.shape == (HIDDEN, HIDDEN)
    else:
        assert m.query_key_value.weight.shape == (HIDDEN + 2 * kv, HIDDEN)


@pytest.mark.parametrize("family", FAMILIES)
def test_gqa_module_built_from_config_matches_patched_one(family: str, ids):
    """`GPTxGQAAttention(config, layer_idx, num_key_value_heads)` has the layout `patch` builds."""
    config_fn, _, _, cls = FAMILIES[family]
    model = hf_gqa.patch(make_model(config_fn)(), groups=2)
    patched = gqa_modules(model, cls)[0]
    direct = cls(model.config, layer_idx=0, num_key_value_heads=2)
    assert {k: v.shape for k, v in direct.state_dict().items()} == {
        k: v.shape for k, v in patched.state_dict().items()
    }
    assert direct.num_key_value_groups == patched.num_key_value_groups == HEADS // 2
    assert hf_gqa.get_adapter(model).read(direct).num_kv_heads == 2
    with pytest.raises(ValueError, match="divide"):
        cls(model.config, layer_idx=0, num_key_value_heads=3)


def test_gpt_neox_fused_layout_is_grouped_per_kv_head():
    """Rows `[q heads of group j, k_j, v_j]` per KV head `j`: at `K == H` GPT-NeoX's own `[q_h, k_h, v_h]`."""
    original = make_model(gpt_neox_config)()
    weight = original.gpt_neox.layers[0].attention.query_key_value.weight.detach().clone()
    bias = original.gpt_neox.layers[0].attention.query_key_value.bias.detach().clone()
    identity = hf_gqa.patch(make_model(gpt_neox_config)(), groups=HEADS, merge="first")
    assert torch.equal(identity.gpt_neox.layers[0].attention.query_key_value.weight, weight)
    assert torch.equal(identity.gpt_neox.layers[0].attention.query_key_value.bias, bias)

    per_head = weight.reshape(HEADS, 3, HEAD_DIM, HIDDEN)  # stock: [q_h, k_h, v_h] per head
    model = hf_gqa.patch(original, groups=2, merge="first")
    r = HEADS // 2
    expected = torch.cat(
        [
            torch.cat(
                [per_head[j * r : (j + 1) * r, 0].reshape(-1, HIDDEN), per_head[j * r, 1], per_head[j * r, 2]]
            )
            for j in range(2)
        ]
    )
    assert torch.equal(model.gpt_neox.layers[0].attention.query_key_value.weight, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_transformers_loads_identity_and_refuses_grouped(family: str, ids, tmp_path):
    """At `K == H` the saved layout is the family's own; with `K < H` plain loading fails, never misreads."""
    from transformers import AutoModelForCausalLM

    config_fn = FAMILIES[family][0]
    identity = hf_gqa.patch(make_model(config_fn)(), groups=HEADS)
    identity.save_pretrained(tmp_path / "identity")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "identity")
    torch.testing.assert_close(logits(plain, ids), logits(identity, ids), atol=0, rtol=0)

    hf_gqa.patch(make_model(config_fn)(), groups=2).save_pretrained(tmp_path / "grouped")
    with pytest.raises(RuntimeError, match="mismatched"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "grouped")


@pytest.mark.parametrize("family", FAMILIES)
def test_config_is_unchanged_but_for_metadata(family: str):
    config_fn = FAMILIES[family][0]
    model = make_model(config_fn)()
    before = model.config.to_dict()
    hf_gqa.patch(model, groups=2)
    after = model.config.to_dict()
    assert after.pop("hf_gqa")["kv_heads"] == [2, 2]
    for key in ("_attn_implementation_autoset", "_attn_implementation"):
        before.pop(key, None), after.pop(key, None)
    assert after == before


@pytest.mark.parametrize("family, kw", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_variants_equal_reference(family: str, kw: dict, attn: str, ids, padded):
    config_fn, reference_fn, _, _ = FAMILIES[family]
    make = make_model(config_fn, **kw)
    reference = make()
    reference_fn(reference, 2)
    model = hf_gqa.patch(make(), groups=2)
    if attn == "eager":
        reference.set_attn_implementation("eager")
        model.set_attn_implementation("eager")
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, *padded), logits(reference, *padded), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, kw", VARIANTS, ids=VARIANT_IDS)
def test_variants_save_load(family: str, kw: dict, ids, tmp_path):
    model = hf_gqa.patch(make_model(FAMILIES[family][0], **kw)(), groups=[4, 1])
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = hf_gqa.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_groups_and_twice_patched_round_trip(family: str, ids, tmp_path):
    config_fn, reference_fn, _, cls = FAMILIES[family]
    model = hf_gqa.patch(hf_gqa.patch(make_model(config_fn)(), groups=[4, 4]), groups=[2, 1])
    assert [m.num_key_value_heads for m in gqa_modules(model, cls)] == [2, 1]
    cache = GQACache(config=model.config)
    with torch.no_grad():
        expected = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    assert cache.kv_heads() == [2, 1]
    model.save_pretrained(tmp_path)
    loaded = hf_gqa.from_pretrained(tmp_path)
    assert [m.num_key_value_heads for m in gqa_modules(loaded, cls)] == [2, 1]
    torch.testing.assert_close(logits(loaded, ids), expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_attention_weights_cover_every_query_head(family: str, ids):
    model = hf_gqa.patch(make_model(FAMILIES[family][0])(), groups=1)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    assert len(out.attentions) == 2
    for weights in out.attentions:
        assert weights.shape == (ids.shape[0], HEADS, ids.shape[1], ids.shape[1])
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_lora_on_family_module_names(family: str, ids):
    config_fn, _, names, _ = FAMILIES[family]
    patched = hf_gqa.patch(make_model(config_fn)(), groups=2)
    expected = logits(patched, ids)
    peft_model = get_peft_model(patched, LoraConfig(r=4, target_modules=names, task_type="CAUSAL_LM"))
    wrapped = [n for n, _ in peft_model.named_modules() if n.endswith(tuple(f".{x}" for x in names))]
    assert wrapped, "LoRA found none of the family's module names"
    torch.testing.assert_close(logits(peft_model, ids), expected, atol=1e-6, rtol=0)  # LoRA B starts at 0

    peft_model.train()
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    lora = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())
    with torch.no_grad():
        for p in lora.values():
            p.add_(0.01 * torch.randn_like(p))
    peft_model.eval()
    tuned = logits(peft_model, ids)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), tuned, atol=1e-5, rtol=0)


def test_gpt2_cross_attention_stays_multi_head(ids):
    model = make_model(gpt2_config, add_cross_attention=True)()
    hf_gqa.patch(model, groups=2)
    blocks = model.transformer.h
    assert all(isinstance(b.attn, GPT2GQAAttention) for b in blocks)
    assert all(type(b.crossattention) is GPT2Attention for b in blocks)
    encoder = torch.randn(ids.shape[0], 5, HIDDEN)
    with torch.no_grad():
        out = model(input_ids=ids, encoder_hidden_states=encoder, use_cache=True)
    assert out.past_key_values.self_attention_cache.layers[0].keys.shape[1] == 2
    assert out.past_key_values.cross_attention_cache.layers[0].keys.shape[1] == HEADS


class CountingHook(ModelHook):
    """An accelerate hook (as `device_map` dispatch attaches) that counts the forwards it wraps."""

    def __init__(self) -> None:
        self.calls = 0

    def post_forward(self, module, output):
        self.calls += 1
        return output


@pytest.mark.parametrize("family", FAMILIES)
def test_accelerate_hooks_are_moved_to_the_gqa_module(family: str, ids):
    """A hooked module's `forward` is bound to the module itself: the converted one must run, hook and all."""
    config_fn, reference_fn, _, cls = FAMILIES[family]
    model = make_model(config_fn)()
    adapter = hf_gqa.get_adapter(model)
    hooks = [CountingHook() for _ in adapter.attention_modules(model)]
    for (_, module), hook in zip(adapter.attention_modules(model), hooks):
        add_hook_to_module(module, hook)
    reference = make_model(config_fn)()
    reference_fn(reference, 2)
    hf_gqa.patch(model, groups=2)
    assert all(isinstance(m, cls) for _, m in adapter.attention_modules(model))
    calls = [h.calls for h in hooks]
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)
    assert [h.calls for h in hooks] == [c + 1 for c in calls]
