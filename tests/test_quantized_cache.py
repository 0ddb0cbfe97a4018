"""GQA with transformers' quantized KV cache (`generate(cache_implementation="quantized", cache_config=...)`).

On the tiny model of every family where transformers' `QuantizedCache` works, a patched model (with a different
KV head count per layer) generates through it; the cache it used holds quantized keys and values of the grouped
heads only (`[batch, kv_heads_of_layer, seq, head_dim]`); the bytes `hf_gqa` accounts for are the bytes the
backend's tensors really hold; an 8-bit cache greedy-decodes what the float cache decodes and a 2-bit one does
not compute the float cache's logits (so the quantized K/V really are attended to).

The quanto and HQQ backends need `optimum-quanto` and `hqq` (the `dev` and `quant` extras); `fp8` needs nothing.
"""

from __future__ import annotations

import pytest
import torch

import hf_gqa
from hf_gqa import compat
from hf_gqa.cache import (
    GQACache,
    GQAQuantizedCache,
    KVQuantization,
    kv_bytes_per_token,
    layer_parts,
    quantized_cache,
)
from hf_gqa.evaluation.common import kv_layout

from .cases import FamilyCase, all_cases

CASES = all_cases()
IDS = [c.name for c in CASES]
#: The backends and bit widths the family tests run (every backend transformers 5.24 offers).
BACKENDS = [("quanto", 4), ("hqq", 4), ("fp8", 8)]
BACKEND_IDS = [f"{b}{n}" for b, n in BACKENDS]
PACKAGES = {"quanto": "optimum.quanto", "hqq": "hqq"}


def require(backend: str) -> None:
    if backend in PACKAGES:
        pytest.importorskip(
            PACKAGES[backend], reason=f"the {backend} backend needs its package (hf-gqa[quant])"
        )


def config_for(backend: str, nbits: int, head_dim: int, residual_length: int = 2) -> dict:
    """A cache_config with groups of one head vector (the tiny models' head_dim is smaller than the default 64)."""
    if backend == "fp8":
        return {"backend": "fp8"}
    return {"backend": backend, "nbits": nbits, "q_group_size": head_dim, "residual_length": residual_length}


def generate(model, ids, mask, new_tokens: int = 6, **kw):
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            **kw,
        )


def per_layer_groups(case: FamilyCase) -> list[int]:
    """A different KV head count in each of the two layers: the weakest and the strongest reduction."""
    return [case.groups[0], case.groups[-1]]


_ALLOWED: dict[str, str | None] = {}


def transformers_refusal(case: FamilyCase, ids, mask) -> str | None:
    """Why transformers refuses the quantized cache on the *unpatched* model of `case` (None if it accepts it)."""
    if case.name not in _ALLOWED:
        try:
            generate(
                case.make(), ids, mask, 2, cache_implementation="quantized", cache_config={"backend": "fp8"}
            )
            _ALLOWED[case.name] = None
        except ValueError as err:
            _ALLOWED[case.name] = str(err)
    return _ALLOWED[case.name]


def raw_parts(layer, backend: str) -> tuple[tuple[int, ...], torch.dtype, int]:
    """(logical shape, code dtype, bytes) of a layer's quantized keys plus values, read straight from the
    backend's own objects (not through hf_gqa's accounting)."""
    shape, dtype, nbytes = None, None, 0
    for q in (layer._quantized_keys, layer._quantized_values):
        if backend == "quanto":  # WeightQBitsTensor: PackedTensor codes, scale, shift
            packed = q._data._data
            shape, dtype = tuple(q.shape), packed.dtype
            nbytes += sum(t.numel() * t.element_size() for t in (packed, q._scale, q._shift))
        elif backend == "hqq":  # (packed codes, meta with scale and zero)
            codes, meta = q
            shape, dtype = tuple(meta["shape"]), codes.dtype
            nbytes += sum(t.numel() * t.element_size() for t in (codes, meta["scale"], meta["zero"]))
        else:  # fp8: (codes, per-tensor scale)
            codes, scale = q
            shape, dtype = tuple(codes.shape), codes.dtype
            nbytes += codes.numel() * codes.element_size() + scale.numel() * scale.element_size()
    return shape, dtype, nbytes


@pytest.mark.parametrize(("backend", "nbits"), BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_generate_through_a_quantized_cache_of_grouped_heads(case: FamilyCase, backend, nbits, padded):
    require(backend)
    ids, mask = padded
    refusal = transformers_refusal(case, ids, mask)
    if refusal:
        pytest.skip(f"transformers refuses the quantized cache for {case.name}: {refusal[:120]}")
    groups = per_layer_groups(case)
    model = hf_gqa.patch(case.make(), groups=groups)
    head_dim = kv_layout(model).head_dim[0]
    cfg = config_for(backend, nbits, head_dim)
    out = generate(model, ids, mask, cache_implementation="quantized", cache_config=cfg)
    cache = compat.output_cache(out)
    assert type(cache) is GQAQuantizedCache
    assert cache.kv_heads() == groups
    tokens = out.sequences.shape[1] - 1  # the last generated token is never fed back
    quant = KVQuantization.from_config(cfg)
    assert cache.quantization() == quant
    dtype = next(model.parameters()).dtype
    for layer, g, nbytes in zip(cache.layers, groups, cache.layer_nbytes()):
        shape, code_dtype, raw_bytes = raw_parts(layer, backend)
        residual = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
        assert residual <= quant.residual_length
        assert shape == (ids.shape[0], g, tokens - residual, head_dim)  # grouped heads, quantized
        assert code_dtype == (torch.float8_e4m3fn if backend == "fp8" else torch.uint8)
        if residual:
            assert (
                tuple(layer.keys.shape) == tuple(layer.values.shape) == (ids.shape[0], g, residual, head_dim)
            )
        assert layer_parts(layer)["quantized"] == shape
        # what hf_gqa counts = what the backend's tensors hold = what KVQuantization predicts
        float_bytes = 2 * residual * ids.shape[0] * g * head_dim * dtype.itemsize
        assert nbytes == raw_bytes + float_bytes
        assert nbytes == quant.layer_nbytes(ids.shape[0], g, head_dim, tokens - residual, residual, dtype)
    assert cache.nbytes() == sum(cache.layer_nbytes())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_without_a_cache_implementation_generate_still_uses_the_float_gqa_cache(case: FamilyCase, padded):
    ids, mask = padded
    model = hf_gqa.patch(case.make(), groups=per_layer_groups(case))
    cache = compat.output_cache(generate(model, ids, mask, 2))
    assert type(cache) is GQACache
    assert cache.kv_heads() == per_layer_groups(case)


EXACT_CASES = [c for c in CASES if c.name in ("llama-gqa", "qwen2-mha", "gpt2", "opt", "bloom")]


@pytest.mark.parametrize("case", EXACT_CASES, ids=[c.name for c in EXACT_CASES])
def test_int8_cache_decodes_as_the_float_cache_and_int2_does_not(case: FamilyCase, padded):
    """With everything but the current token quantized (`residual_length=0`), an 8-bit HQQ cache gives the float
    cache's greedy tokens and per-step logits within 0.02 (the tiny models' logits are about 1 in size); a 2-bit
    one moves the logits at least 10 times as far, and by more than 1e-4 (the quantized K/V are what attention
    reads: a cache that handed back the float K/V would move them by 0)."""
    require("hqq")
    ids, mask = padded
    model = hf_gqa.patch(case.make(), groups=case.groups[-1])
    head_dim = kv_layout(model).head_dim[0]
    reference = generate(model, ids, mask, 8, output_logits=True)
    assert type(compat.output_cache(reference)) is GQACache
    errors = {}
    for nbits in (8, 2):
        cfg = config_for("hqq", nbits, head_dim, residual_length=0)
        out = generate(
            model, ids, mask, 8, output_logits=True, cache_implementation="quantized", cache_config=cfg
        )
        assert type(compat.output_cache(out)) is GQAQuantizedCache
        errors[nbits] = max((a - b).abs().max().item() for a, b in zip(out.logits, reference.logits))
        if nbits == 8:
            assert torch.equal(out.sequences, reference.sequences)
    assert errors[8] < 0.02, errors
    assert errors[2] > 1e-4, errors
    assert errors[2] > 10 * errors[8], errors


@pytest.mark.parametrize(
    ("backend", "nbits"), [("quanto", 2), ("quanto", 4), ("hqq", 2), ("hqq", 3), ("fp8", 8)]
)
def test_bytes_per_token_match_a_fully_quantized_cache(backend, nbits, ids):
    """`describe` / `kv_bytes_per_token` with the cache's bits, times the tokens held, is what a cache holds
    after generation with `residual_length=0` (everything quantized), up to the backend's packing round-up
    (quanto: the last byte row of a tensor; fp8: its 4-byte scale per tensor)."""
    require(backend)
    case = next(c for c in CASES if c.name == "llama-mha")
    groups = [4, 1]
    model = hf_gqa.patch(case.make(), groups=groups)
    head_dim = kv_layout(model).head_dim[0]
    cfg = config_for(backend, nbits, head_dim, residual_length=0)
    out = generate(model, ids, torch.ones_like(ids), 5, cache_implementation="quantized", cache_config=cfg)
    cache = compat.output_cache(out)
    held = cache.layer_nbytes()
    tokens = ids.shape[0] * (out.sequences.shape[1] - 1)  # batch x sequence
    description = hf_gqa.describe(model, cache_config=cfg)
    per_token = [layer.bytes_per_token_quantized for layer in description.layers]
    quant = KVQuantization.from_config(cfg)
    for g, predicted, actual in zip(groups, per_token, held):
        slack = 8 if backend == "fp8" else 0
        if (
            backend == "quanto"
        ):  # up to 8 // nbits - 1 padded code rows of q_group_size bytes, keys and values
            slack = 2 * (8 // nbits - 1) * quant.q_group_size
        assert actual >= predicted * tokens - 1e-6
        assert actual - predicted * tokens <= slack, (g, predicted * tokens, actual)
    assert description.bytes_per_token_quantized == pytest.approx(sum(per_token))


def test_bytes_per_token_figures_for_smollm2():
    """The per-token figures for SmolLM2-135M's layout (30 layers, head_dim 64, fp32), by hand: float 3 KV heads
    = 30 * 2 * 3 * 64 * 4 = 46,080 bytes; 1 KV head with a 4-bit cache in groups of 64 (a 4-byte scale and zero
    per group) = 30 * 2 * 64 * (0.5 + 8 / 64) = 2,400 bytes (19.2x less); HQQ 3-bit packs 10 codes per int32."""
    f32 = torch.float32
    assert sum(kv_bytes_per_token([3] * 30, 64, f32)) == 46_080
    assert sum(kv_bytes_per_token([1] * 30, 64, f32)) == 15_360
    for backend in ("quanto", "hqq"):
        four = {"backend": backend, "nbits": 4}
        assert sum(kv_bytes_per_token([1] * 30, 64, f32, four)) == pytest.approx(2_400)
        assert sum(kv_bytes_per_token([3] * 30, 64, f32, four)) == pytest.approx(7_200)
    assert sum(
        kv_bytes_per_token([1] * 30, 64, torch.float16, {"backend": "hqq", "nbits": 2})
    ) == pytest.approx(30 * 2 * 64 * (0.25 + 4 / 64))
    assert sum(kv_bytes_per_token([1] * 30, 64, f32, {"backend": "hqq", "nbits": 3})) == pytest.approx(
        30 * 2 * (7 * 4 + 8)
    )
    assert sum(kv_bytes_per_token([1] * 30, 64, f32, {"backend": "fp8"})) == 30 * 2 * 64
    with pytest.raises(ValueError, match="bits"):
        KVQuantization.from_config({"backend": "quanto", "nbits": 8})


def test_describe_reports_the_quantized_cache():
    from .tiny import tiny_llama

    model = hf_gqa.patch(tiny_llama(kv=8), groups=2)
    text = str(hf_gqa.describe(model, cache_config={"backend": "hqq", "nbits": 4, "q_group_size": 8}))
    assert "int4 (hqq" in text
    plain = hf_gqa.describe(model)
    assert plain.bytes_per_token_quantized is None
    assert "int4" not in str(plain)


def test_a_quantized_cache_passed_by_the_caller_is_used(padded):
    require("quanto")
    from .tiny import tiny_llama

    ids, mask = padded
    model = hf_gqa.patch(tiny_llama(kv=8), groups=[4, 1])
    cache = quantized_cache(model, {"backend": "quanto", "nbits": 2, "q_group_size": 8, "residual_length": 0})
    out = generate(
        model, ids, mask, 3, **compat.cache_kwargs(cache)
    )  # `cache=` (5.24) or `past_key_values=` (5.23)
    assert compat.output_cache(out) is cache
    assert cache.kv_heads() == [4, 1]
    assert cache.nbytes() > 0


def test_bench_measures_the_quantized_cache():
    """`bench`'s decode loop runs through the quantized cache and reports the bytes it holds."""
    require("hqq")
    from hf_gqa.evaluation.bench import Variant, measure, new_cache

    from .tiny import tiny_llama

    model = hf_gqa.patch(tiny_llama(kv=8), groups=2)
    cfg = {"backend": "hqq", "nbits": 4, "q_group_size": 8, "residual_length": 0}
    assert type(new_cache(model, cfg)) is GQAQuantizedCache
    (row,) = measure([Variant("v", "patched", 2, model)], 1, 8, 4, warmup=0, repeats=1, cache_config=cfg)
    # 2 layers x (K, V) of 2 heads x head_dim 8 x (8 + 4 = 12 tokens) in 4 bits, plus a float32 scale and zero
    # per group of 8
    expected = 2 * 2 * KVQuantization.from_config(cfg).tensor_nbytes(2 * 12 * 8, torch.float32)
    assert row.kv_bytes == expected
    float_row = measure([Variant("v", "patched", 2, model)], 1, 8, 4, warmup=0, repeats=1)[0]
    assert float_row.kv_bytes == 2 * 2 * 2 * 12 * 8 * 4


def test_compare_and_bench_layouts_count_the_quantized_bytes():
    """`KVLayout.bytes_per_token` (what `compare` reports per variant) agrees with `describe` for a quantized
    cache, and is the float figure without one."""
    from .tiny import tiny_llama

    model = hf_gqa.patch(tiny_llama(kv=8), groups=[4, 1])
    cfg = {"backend": "quanto", "nbits": 2, "q_group_size": 8}
    layout = kv_layout(model)
    # 2 layers, (4 + 1) heads x head_dim 8 x K and V x (2 bits + a float32 scale and shift per group of 8)
    assert layout.bytes_per_token(torch.float32, cfg) == pytest.approx(5 * 8 * 2 * (0.25 + 8 / 8))
    assert layout.bytes_per_token(torch.float32, cfg) == pytest.approx(
        hf_gqa.describe(model, cache_config=cfg).bytes_per_token_quantized
    )
    assert layout.bytes_per_token(torch.float32) == 5 * 8 * 2 * 4
