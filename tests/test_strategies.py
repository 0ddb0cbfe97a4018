"""Data-aware conversion: calibration, similarity grouping, activation-aware merges, refine and KV budgets."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_gqa
from hf_gqa.budget import choose_heads
from hf_gqa.calibration import calibration_blocks
from hf_gqa.methods import get_method

from .cases import TINY, all_cases

CASES = all_cases()
IDS = [c.name for c in CASES]
MERGES = ["mean", "first", "pca", "score", "procrustes"]
CALIB = dict(calibration_tokens=256, block_size=32, batch_size=4, show_progress=False)


def calibration_ids(vocab: int = 200, n: int = 2048, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def blocks_folding(model) -> bool:
    """Key norms or q/k/v clipping: the activation-aware merges must refuse these models."""
    norms = any(
        getattr(m, "k_norm", None) is not None or getattr(m, "k_layernorm", None) is not None
        for m in model.modules()
    )
    return norms or getattr(model.config, "clip_qkv", None) is not None


#: one family per weight layout in the fast suite; every family under `-m slow` (about 5 minutes)
LAYOUT_REPRESENTATIVES = {
    "llama-gqa",
    "qwen3-gqa",
    "phi3-gqa-partial-rotary",
    "gpt2",
    "opt",
    "gpt_neox",
    "gptj",
}
LAYOUT_REPRESENTATIVES |= {"falcon-old-alibi", "falcon-new-gqa", "bloom", "olmo-mha"}


@pytest.mark.parametrize(
    "case",
    [c if c.name in LAYOUT_REPRESENTATIVES else pytest.param(c, marks=pytest.mark.slow) for c in CASES],
    ids=IDS,
)
def test_every_method_is_exact_when_groups_equal_heads(case, ids):
    """With one KV head per group every grouping and merge (and refine) must reproduce the original."""
    original = case.make()
    expected = logits(original, ids)
    for merge, grouping in itertools.product([*MERGES, "refine"], ["consecutive", "similarity"]):
        model = copy.deepcopy(original)
        calibrated = get_method(merge).needs_calibration or grouping == "similarity"
        kw = dict(calibration=calibration_ids(), **CALIB) if calibrated else {}
        kw["merge"] = merge
        if merge == "refine":
            kw["refine_steps"] = 5
        if calibrated and get_method(merge).folds_maps and blocks_folding(model):
            with pytest.raises(ValueError, match="cannot fold"):
                hf_gqa.patch(model, groups=case.kv_heads, grouping=grouping, **kw)
            continue
        hf_gqa.patch(model, groups=case.kv_heads, grouping=grouping, **kw)
        torch.testing.assert_close(logits(model, ids), expected, atol=1e-4, rtol=0, msg=f"{merge}/{grouping}")


def _permute_heads(model, perms: list[list[int]]) -> None:
    """Shuffle the heads of each Llama layer (q, k, v rows and o columns together): the function is unchanged."""
    for layer, perm in zip(model.model.layers, perms):
        attn = attn_d = layer.self_attn
        d = attn_d.head_dim
        rows = torch.tensor([h * d + i for h in perm for i in range(d)])
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj"):
                lin = getattr(attn, name)
                lin.weight.copy_(lin.weight[rows])
            attn.o_proj.weight.copy_(attn.o_proj.weight[:, rows])


def _tiny_llama(heads: int = 8, kv: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY, intermediate_size=128, num_attention_heads=heads, num_key_value_heads=kv)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_similarity_grouping_is_permutation_invariant(ids):
    model = _tiny_llama()
    shuffled = copy.deepcopy(model)
    rng = random.Random(3)
    _permute_heads(shuffled, [rng.sample(range(8), 8) for _ in model.model.layers])
    torch.testing.assert_close(logits(shuffled, ids), logits(model, ids), atol=1e-5, rtol=0)
    kw = dict(groups=4, grouping="similarity", merge="score", calibration=calibration_ids(), **CALIB)
    hf_gqa.patch(model, **kw)
    hf_gqa.patch(shuffled, **kw)
    torch.testing.assert_close(logits(shuffled, ids), logits(model, ids), atol=1e-4, rtol=0)


def _rotation_scale_copies(model) -> None:
    """Make KV head 2j+1 of every layer a RoPE-commuting image of head 2j: keys rotated and scaled per rotary
    frequency pair, values mapped by an invertible matrix. Merging such a pair loses nothing."""
    g = torch.Generator().manual_seed(9)
    for layer in model.model.layers:
        attn = layer.self_attn
        d = attn.head_dim
        k = attn.k_proj.weight.data.view(-1, d, attn.k_proj.in_features)
        v = attn.v_proj.weight.data.view(-1, d, attn.v_proj.in_features)
        half = d // 2
        for j in range(0, k.shape[0], 2):
            angle = torch.rand(half, generator=g) * 6.28
            scale = 0.5 + torch.rand(half, generator=g)
            cr, ci = (scale * torch.cos(angle))[:, None], (scale * torch.sin(angle))[:, None]
            a, b = k[j, :half], k[j, half:]
            k[j + 1, :half] = cr * a - ci * b  # (a + ib) * (cr + i ci)
            k[j + 1, half:] = cr * b + ci * a
            mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
            v[j + 1] = mix @ v[j]


def test_rope_aware_merge_is_exact_on_rotation_scale_copies(ids):
    original = _tiny_llama()
    _rotation_scale_copies(original)
    expected = logits(original, ids)
    for merge in ("pca", "score"):
        model = hf_gqa.patch(
            copy.deepcopy(original), groups=4, merge=merge, calibration=calibration_ids(), **CALIB
        )
        torch.testing.assert_close(logits(model, ids), expected, atol=1e-4, rtol=0)
    mean = hf_gqa.patch(copy.deepcopy(original), groups=4, merge="mean")
    assert (
        logits(mean, ids) - expected
    ).abs().max() > 1e-2  # the test can fail: mean pooling is not exact here


def test_converted_scores_depend_only_on_relative_position():
    """Scores of the converted layer for one query/key token pair are the same at any absolute offset."""
    original = _tiny_llama()
    model = hf_gqa.patch(original, groups=2, merge="score", calibration=calibration_ids(), **CALIB)
    attn = model.model.layers[0].self_attn
    rotary = model.model.rotary_emb
    x = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(4))
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    scores = []
    for offset in (0, 7, 50):
        pos = torch.tensor([[offset, offset + 5]])
        cos, sin = rotary(x, pos)
        q = attn.q_proj(x).view(1, 2, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, 2, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
        scores.append((q[:, :, 1] * k[:, :, 0]).sum(-1))
    torch.testing.assert_close(scores[1], scores[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[2], scores[0], atol=1e-5, rtol=1e-5)


def test_activation_aware_merges_beat_mean_on_a_real_block(ids):
    """On calibration data the pca/score merges reconstruct the attention output better than mean pooling."""
    from hf_gqa.budget import block_error

    base = _tiny_llama(seed=1)
    errors = {}
    for merge in ("mean", "pca", "score"):
        model = copy.deepcopy(base)
        kw = {} if merge == "mean" else dict(calibration=calibration_ids(), **CALIB)
        hf_gqa.patch(model, groups=2, merge=merge, **kw)
        inputs = [((torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0)),), {})]
        cos_sin = base.model.rotary_emb(inputs[0][0][0], torch.arange(16)[None].expand(2, 16))
        inputs = [((inputs[0][0][0],), {"position_embeddings": cos_sin, "attention_mask": None})]
        errors[merge] = block_error(base.model.layers[0].self_attn, model.model.layers[0].self_attn, inputs)
    assert errors["pca"] < errors["mean"]
    assert errors["score"] < errors["mean"]


def test_calibration_is_deterministic_under_a_seed(ids):
    data = calibration_ids(n=4096)
    a = calibration_blocks(data, num_tokens=256, block_size=32, seed=1)
    b = calibration_blocks(data, num_tokens=256, block_size=32, seed=1)
    c = calibration_blocks(data, num_tokens=256, block_size=32, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kw = dict(groups=2, merge="refine", refine_steps=10, calibration=data, **CALIB)
    m1 = hf_gqa.patch(_tiny_llama(), seed=1, **kw)
    m2 = hf_gqa.patch(_tiny_llama(), seed=1, **kw)
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_calibration_from_text_and_datasets():
    from datasets import Dataset

    class WordTokenizer:
        eos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + (hash(w) % 190) for w in text.split()]}

    text = " ".join(f"w{i % 97}" for i in range(3000))
    tok = WordTokenizer()
    from_text = calibration_blocks(text, tok, num_tokens=256, block_size=32)
    from_list = calibration_blocks([text], tok, num_tokens=256, block_size=32)
    from_ds = calibration_blocks(Dataset.from_dict({"text": [text]}), tok, num_tokens=256, block_size=32)
    assert from_text.shape == (8, 32)
    assert torch.equal(from_text, from_list) and torch.equal(from_text, from_ds)
    with pytest.raises(ValueError, match="tokenizer"):
        calibration_blocks(text, None)


def test_refine_reduces_block_error():
    model = hf_gqa.patch(
        _tiny_llama(seed=2),
        groups=1,
        merge="score",
        refine_steps=60,
        refine_lr=1e-3,
        calibration=calibration_ids(),
        **CALIB,
    )
    log = model._hf_gqa_conversion_log
    assert all(entry["after"] < entry["before"] for entry in log)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_layer_refine_is_exact_at_equal_heads_fits_and_round_trips(case, ids, tmp_path):
    """refine_scope="layer": exact at groups == heads, every decoder layer's error falls, the refined layers
    (MLP included) save and load back exactly."""
    original = case.make()
    expected = logits(original, ids)
    merge = "mean" if blocks_folding(original) else "score"
    kw = dict(
        calibration=calibration_ids(), merge=merge, refine_steps=20, refine_lr=1e-3, refine_scope="layer"
    )
    same = hf_gqa.patch(copy.deepcopy(original), groups=case.kv_heads, **kw, **CALIB)
    torch.testing.assert_close(logits(same, ids), expected, atol=1e-4, rtol=0)
    if min(case.groups) == case.kv_heads:
        return  # nothing to reduce (multi-query already)
    model = hf_gqa.patch(copy.deepcopy(original), groups=min(case.groups), **kw, **CALIB)
    log = model._hf_gqa_conversion_log
    assert all(entry["after"] <= entry["before"] for entry in log), log
    assert any(entry["after"] < entry["before"] for entry in log), log
    mlp_changed = any(
        not torch.equal(p, original.state_dict()[name])
        for name, p in model.state_dict().items()
        if "mlp" in name and name in original.state_dict()
    )
    assert mlp_changed or "mlp" not in str(list(original.state_dict()))
    model.save_pretrained(tmp_path)
    loaded = hf_gqa.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=0)

    kw["refine_scope"] = "attention"  # the attention-only fit on the same family (ALiBi rows, fused layouts)
    attention_only = hf_gqa.patch(copy.deepcopy(original), groups=min(case.groups), **kw, **CALIB)
    log = attention_only._hf_gqa_conversion_log
    assert all(e["after"] <= e["before"] for e in log) and any(e["after"] < e["before"] for e in log), log


def test_calibrated_merge_without_data_raises_and_leaves_model():
    model = _tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(hf_gqa.GQAError, match="calibration"):
        hf_gqa.patch(model, groups=2, merge="pca")
    with pytest.raises(hf_gqa.GroupsError, match="kv_budget"):
        hf_gqa.patch(model, groups="auto")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not hf_gqa.is_patched(model)


def test_choose_heads_matches_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        layers = rng.randint(1, 4)
        kv = [rng.choice([2, 4, 6]) for _ in range(layers)]
        dims = [rng.choice([8, 16]) for _ in range(layers)]
        errors = [{g: rng.random() / g for g in range(1, k + 1) if k % g == 0} for k in kv]
        budget = rng.uniform(0.3, 1.0)
        total = sum(k * d for k, d in zip(kv, dims))
        feasible = [
            c
            for c in itertools.product(*[sorted(e) for e in errors])
            if sum(g * d for g, d in zip(c, dims)) <= budget * total
        ]
        if not feasible:
            with pytest.raises(ValueError):
                choose_heads(errors, kv, dims, budget)
            continue
        best = min(sum(e[g] for e, g in zip(errors, c)) for c in feasible)
        got = choose_heads(errors, kv, dims, budget)
        assert sum(g * d for g, d in zip(got, dims)) <= budget * total + 1e-9
        assert sum(e[g] for e, g in zip(errors, got)) == pytest.approx(best)


def test_auto_budget_gives_per_layer_heads_that_generate_like_uncached(padded):
    model = _tiny_llama(kv=8)
    model.model.layers[1].self_attn.k_proj.weight.data.mul_(5)  # make layer 1 more sensitive than layer 0
    hf_gqa.patch(model, groups="auto", kv_budget=0.5, calibration=calibration_ids(), merge="score", **CALIB)
    heads = [layer.kv_heads_after for layer in hf_gqa.describe(model).layers]
    assert sum(heads) <= 0.5 * 16 and len(set(heads)) >= 1
    ids, mask = padded
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, return_dict_in_generate=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.past_key_values.kv_heads() == heads
    assert torch.equal(cached.sequences, uncached)


def _random_attention(heads: int, kv_heads: int, rotary_dim: int, bias: bool, seed: int = 0):
    """Random canonical weights `[H, d, D]` (head_dim 16, hidden 48) with `rotary_dim` rotary dimensions, biases on
    q/k/v when `bias`, and a random `[D+1, D+1]` input second moment."""
    from hf_gqa.canonical import AttentionWeights, RotarySpec

    g = torch.Generator().manual_seed(seed)
    d, hidden = 16, 48

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    weights = AttentionWeights(
        q=rand(heads, d, hidden),
        k=rand(kv_heads, d, hidden),
        v=rand(kv_heads, d, hidden),
        o=rand(heads, d, hidden),
        q_bias=rand(heads, d) if bias else None,
        k_bias=rand(kv_heads, d) if bias else None,
        v_bias=rand(kv_heads, d) if bias else None,
        rotary=RotarySpec(rotary_dim) if rotary_dim else None,
    )
    x = torch.cat([rand(512, hidden).double(), torch.ones(512, 1, dtype=torch.float64)], dim=1)
    return weights, x.T @ x / 512


def _heads(weights, first_kv: int, kv: int):
    """The canonical weights of KV heads `first_kv:first_kv + kv` and their query heads (`permute_kv` with
    a subset of the heads selects them)."""
    return weights.permute_kv(list(range(first_kv, first_kv + kv)))


@pytest.mark.parametrize("merge", ["pca", "score", "procrustes"])
@pytest.mark.parametrize(
    "heads,kv_heads,rotary_dim,bias",
    [(8, 8, 16, False), (8, 4, 8, True), (6, 6, 0, True)],
    ids=["mha-rotary", "gqa-partial-rotary-bias", "mha-no-rotary-bias"],
)
def test_activation_merges_convert_each_group_on_its_own(merge, heads, kv_heads, rotary_dim, bias):
    """The merges hold one group's heads in float64 at a time: merging a layer into G groups equals merging each
    group's heads alone into one, tensor for tensor, and leaves the weights they read unchanged."""
    from hf_gqa.calibration import LayerStats
    from hf_gqa.merging import merge_pca, merge_procrustes, merge_score

    fn = {"pca": merge_pca, "score": merge_score, "procrustes": merge_procrustes}[merge]
    weights, sigma = _random_attention(heads, kv_heads, rotary_dim, bias)
    before = {k: v.clone() for k, v in vars(weights).items() if isinstance(v, torch.Tensor)}
    stats = LayerStats(sigma=sigma, tokens=512)
    groups = 2
    merged = fn(weights, groups, stats)
    per = kv_heads // groups
    for g in range(groups):
        alone = fn(_heads(weights, g * per, per), 1, stats)
        for name in ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias"):
            a, b = getattr(alone, name), getattr(_heads(merged, g, 1), name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert torch.equal(a, b), (merge, g, name)
    for k, v in before.items():
        assert torch.equal(getattr(weights, k), v), k
    # the merge did merge: the keys of a group are not one of its heads
    assert not torch.equal(merged.k[0], weights.k[0])


def test_row_energy_is_the_query_energy_diagonal():
    from hf_gqa.merging import _query_energy, _row_energy, augment

    weights, sigma = _random_attention(4, 4, 16, True)
    heads = augment(weights.q, weights.q_bias)  # [4, 16, 49]
    rows = _row_energy(heads, sigma)  # [4, 16]
    for h in range(4):
        torch.testing.assert_close(
            rows[h], _query_energy(heads[h : h + 1], sigma).diagonal(), rtol=1e-12, atol=0
        )
    assert (rows > 0).all()
