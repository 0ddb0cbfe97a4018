"""Prefill and decode speed, and KV-cache memory, of a model before and after conversion.

For every point of a grid of batch sizes and context lengths, each variant (the original, each patched model, and
for each patched model a *natively* GQA transformers model of the identical shape holding the same weights) runs
the same code: a prefill forward over `[batch, context]` random token ids into an empty KV cache, then
`new_tokens` greedy decode steps (one forward each, feeding back the argmax token with a growing attention mask,
as `generate()` does without its logits processors). Each variant uses the cache `generate()` would give it (a
`GQACache` for patched models, a `DynamicCache` otherwise). Variants are measured interleaved, in a rotating
order, `warmup` untimed and `repeats` timed times; the report gives medians. On CPU (by default) the decode steps
of all variants run in lockstep, each step timed on its own, so that load from other processes hits every variant
alike. On CUDA every timing is bracketed by `torch.cuda.synchronize()`.

The native model shows what a model trained with GQA would run at: the patched/native decode ratio is the
overhead of hf_gqa itself (target: >= 0.97).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from .. import compat
from ..architectures import get_adapter
from ..attention import ATTN_IMPLEMENTATION
from ..cache import GQACache, cache_nbytes, quantized_cache
from ..errors import GQAError
from ..groups import Groups, groups_label
from ..methods import method_label
from ..patch import META_KEY, is_patched, patch
from .common import environment, kv_layout, load_model, model_device, model_dtype
from .formatting import fmt_bytes, fmt_rate, fmt_ratio, format_table


@dataclass
class Variant:
    """One model being measured."""

    name: str
    kind: str  # "original", "patched" or "native"
    groups: Groups | None
    model: PreTrainedModel


@dataclass
class BenchRow:
    """The timings of one variant at one grid point (seconds per repeat)."""

    variant: str
    kind: str
    groups: Groups | None
    kv_heads: list[int]
    batch: int
    context: int
    new_tokens: int
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    kv_bytes: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.context / statistics.median(self.prefill_s)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * self.new_tokens / statistics.median(self.decode_s)

    @property
    def decode_spread(self) -> float:
        """`(slowest - fastest) / median` of the timed decode runs: how far apart the runs the median summarises
        are (0 for one run)."""
        return _spread(self.decode_s)

    @property
    def prefill_spread(self) -> float:
        """`(slowest - fastest) / median` of the timed prefills."""
        return _spread(self.prefill_s)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        out["decode_spread"] = self.decode_spread
        out["prefill_spread"] = self.prefill_spread
        return out


#: Runs of one variant further apart than this (`(max - min) / median`) make a report warn that its figures are
#: not to be trusted: another process shared the machine, or the repeats were too few to settle.
SPREAD_WARNING = 0.10


def _spread(seconds: list[float]) -> float:
    return (max(seconds) - min(seconds)) / statistics.median(seconds) if len(seconds) > 1 else 0.0


# -- variants ---------------------------------------------------------------------------------------------------
def _copy_buffers(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Give `target` every buffer of `source` (non-persistent ones such as rotary `inv_freq` included)."""
    for name, buffer in source.named_buffers():
        module_name, _, buffer_name = name.rpartition(".")
        module = target.get_submodule(module_name) if module_name else target
        persistent = buffer_name not in module._non_persistent_buffers_set
        module.register_buffer(buffer_name, buffer, persistent=persistent)


def native_gqa_model(patched: PreTrainedModel) -> PreTrainedModel | None:
    """A plain transformers model of the patched model's family whose config has `num_key_value_heads=G`, holding
    the patched model's weights (shared, not copied), on its stock attention.

    None where no such model exists: a family without native GQA support, or different KV counts per layer.
    """
    adapter = get_adapter(patched)
    meta = getattr(patched.config.get_text_config(decoder=True), META_KEY, None) or {}
    kv_heads = meta.get("kv_heads") or kv_layout(patched).kv_heads
    if not adapter.native_gqa or len(set(kv_heads)) != 1:
        return None
    config = copy.deepcopy(patched.config)
    text = config.get_text_config(decoder=True)
    if hasattr(text, META_KEY):
        delattr(text, META_KEY)
    text.num_key_value_heads = kv_heads[0]
    attn = patched.config._attn_implementation
    attn = "sdpa" if attn == ATTN_IMPLEMENTATION else attn
    with init_empty_weights():
        native = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn, dtype=model_dtype(patched)
        )
    native.load_state_dict(patched.state_dict(), strict=True, assign=True)
    _copy_buffers(patched, native)
    return native.eval()


def _check_native(patched: PreTrainedModel, native: PreTrainedModel, vocab: int) -> float:
    """Max |logit difference| between the patched and native models on a short random batch (expected ~0)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=g).to(model_device(patched))
    with torch.inference_mode():
        a = patched(input_ids=ids, use_cache=False).logits.float()
        b = native(input_ids=ids, use_cache=False).logits.float()
    return (a - b).abs().max().item()


def build_variants(
    model: PreTrainedModel,
    groups: Sequence[Groups],
    merge: str | None = None,
    native: bool = True,
    **patch_kwargs,
) -> tuple[list[Variant], dict[str, float]]:
    """The original, and for each `groups` entry a patched deep copy and (where possible) its native twin.

    Returns the variants and, per native twin, the max logit difference from its patched model.
    """
    variants = [Variant("original", "original", None, model)]
    checks: dict[str, float] = {}
    layout = kv_layout(model)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    for g in groups:
        if layout.is_unchanged_by(g):
            continue
        label = groups_label(g)
        patched = patch(copy.deepcopy(model), groups=g, merge=merge, **patch_kwargs).eval()
        variants.append(Variant(f"{label} patched", "patched", g, patched))
        twin = native_gqa_model(patched) if native else None
        if twin is not None:
            variants.append(Variant(f"{label} native", "native", g, twin))
            checks[f"{label} native vs patched max |logit diff|"] = _check_native(patched, twin, vocab)
    return variants, checks


# -- timing -----------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_cache(model: PreTrainedModel, cache_config: dict | None = None) -> DynamicCache:
    """The cache `generate()` gives `model`: a `GQACache` when patched, else a `DynamicCache`; with a quantized
    `cache_config` (as `generate(cache_implementation="quantized", cache_config=...)` takes it) a
    `GQAQuantizedCache`."""
    if cache_config is not None:
        return quantized_cache(model, cache_config)
    config = model.config.get_text_config(decoder=True)
    return GQACache(config=config) if is_patched(model) else DynamicCache(config=config)


@dataclass
class Prefilled:
    """The state after a prefill: the cache, the first generated token `[batch, 1]` and the attention mask
    `[batch, context + new_tokens]` (ones) that the decode steps slice."""

    cache: DynamicCache
    token: torch.Tensor
    mask: torch.Tensor
    context: int


@torch.inference_mode()
def time_prefill(
    model: PreTrainedModel, input_ids: torch.Tensor, new_tokens: int, cache_config: dict | None = None
) -> tuple[float, Prefilled]:
    """Prefill `input_ids` `[batch, context]` into a new cache (quantized with a `cache_config`); returns
    (seconds, the state to decode from)."""
    device = input_ids.device
    batch, context = input_ids.shape
    mask = torch.ones(batch, context + new_tokens, dtype=torch.long, device=device)
    cache = new_cache(model, cache_config)
    _sync(device)
    start = time.perf_counter()
    out = model(
        input_ids=input_ids,
        attention_mask=mask[:, :context],
        **compat.cache_kwargs(cache),
        use_cache=True,
        logits_to_keep=1,
    )
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - start, Prefilled(cache, token, mask, context)


@torch.inference_mode()
def time_decode(model: PreTrainedModel, state: Prefilled, new_tokens: int) -> tuple[float, int]:
    """Decode `new_tokens` greedy tokens from `state` (whose cache grows); returns (seconds, KV-cache bytes)."""
    device = state.token.device
    cache, token = state.cache, state.token
    _sync(device)
    start = time.perf_counter()
    for step in range(new_tokens):
        out = model(
            input_ids=token,
            attention_mask=state.mask[:, : state.context + step + 1],
            **compat.cache_kwargs(cache),
            use_cache=True,
        )
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - start, cache_nbytes(cache)


@torch.inference_mode()
def time_decode_lockstep(
    models: Sequence[PreTrainedModel], states: Sequence[Prefilled], new_tokens: int
) -> list[tuple[float, int]]:
    """Decode `new_tokens` greedy tokens with every model in lockstep: step `t` of each model (in an order that
    rotates every step) is timed on its own, so all models see the same machine load to within one step.

    Returns:
        per model, (seconds summed over its steps, KV-cache bytes at the end).
    """
    device = states[0].token.device
    tokens = [s.token for s in states]
    seconds = [0.0] * len(models)
    for step in range(new_tokens):
        shift = step % len(models)
        for i in list(range(shift, len(models))) + list(range(shift)):
            state = states[i]
            _sync(device)
            start = time.perf_counter()
            out = models[i](
                input_ids=tokens[i],
                attention_mask=state.mask[:, : state.context + step + 1],
                **compat.cache_kwargs(state.cache),
                use_cache=True,
            )
            tokens[i] = out.logits[:, -1:].argmax(-1)
            _sync(device)
            seconds[i] += time.perf_counter() - start
    return [(seconds[i], cache_nbytes(states[i].cache)) for i in range(len(models))]


def _clone(state: Prefilled) -> Prefilled:
    return Prefilled(copy.deepcopy(state.cache), state.token, state.mask, state.context)


def measure(
    variants: Sequence[Variant],
    batch: int,
    context: int,
    new_tokens: int,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    progress: tqdm | None = None,
    prefill_repeats: int | None = None,
    lockstep: bool = False,
    cache_config: dict | None = None,
) -> list[BenchRow]:
    """Time every variant at one grid point, interleaved in a rotating order; `warmup` rounds are not recorded.

    Each of the `warmup + repeats` rounds prefills every variant, then decodes `new_tokens` tokens with each: one
    variant after the other, or with `lockstep` all of them step by step (see `time_decode_lockstep`). With
    `prefill_repeats` < `repeats`, the later rounds decode from a copy of the last prefilled cache instead of
    prefilling again (prefill is the slow part on CPU); only the first `prefill_repeats` timed prefills are kept.
    A quantized `cache_config` runs every variant on transformers' quantized cache (`new_cache`).
    """
    prefill_repeats = repeats if prefill_repeats is None else max(1, min(prefill_repeats, repeats))
    vocab = variants[0].model.config.get_text_config(decoder=True).vocab_size
    device = model_device(variants[0].model)
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, context), generator=g).to(device)
    rows = [
        BenchRow(v.name, v.kind, v.groups, kv_layout(v.model).kv_heads, batch, context, new_tokens)
        for v in variants
    ]
    pristine: dict[int, Prefilled] = {}  # prefilled states kept for the rounds that do not prefill again
    for rep in range(warmup + repeats):
        shift = rep % len(variants)
        order = list(range(shift, len(variants))) + list(range(shift))
        states: dict[int, Prefilled] = {}
        for i in order:
            if rep < warmup + prefill_repeats:
                prefill_s, states[i] = time_prefill(variants[i].model, input_ids, new_tokens, cache_config)
                if rep >= warmup:
                    rows[i].prefill_s.append(prefill_s)
                if prefill_repeats < repeats:
                    pristine[i], states[i] = states[i], _clone(states[i])
            else:
                states[i] = _clone(pristine[i])
            if not lockstep:  # decode right away, then free the cache
                decode_s, kv_bytes = time_decode(variants[i].model, states.pop(i), new_tokens)
                _record(rows[i], rep >= warmup, decode_s, kv_bytes, progress)
        if lockstep:
            results = time_decode_lockstep(
                [variants[i].model for i in order], [states[i] for i in order], new_tokens
            )
            for i, (decode_s, kv_bytes) in zip(order, results):
                _record(rows[i], rep >= warmup, decode_s, kv_bytes, progress)
    return rows


def _record(row: BenchRow, keep: bool, decode_s: float, kv_bytes: int, progress: tqdm | None) -> None:
    if keep:
        row.decode_s.append(decode_s)
        row.kv_bytes = kv_bytes
    if progress is not None:
        progress.update(1)


# -- the report -------------------------------------------------------------------------------------------------
def _range(ratios: list[float] | None) -> str:
    """`x1.01-x1.05` for the lowest and highest of `ratios`, `-` without any."""
    if not ratios:
        return "-"
    return f"x{min(ratios):.2f}-x{max(ratios):.2f}"


def _paired_ratio(reference_s: list[float], variant_s: list[float]) -> float:
    """Median over rounds of `reference time / variant time` (each round times both back to back, so a change
    of machine load between rounds cancels out): the variant's speed relative to the reference."""
    return statistics.median(_paired_ratios(reference_s, variant_s))


def _paired_ratios(reference_s: list[float], variant_s: list[float]) -> list[float]:
    return [a / b for a, b in zip(reference_s, variant_s)]


@dataclass
class BenchReport:
    """Timings of every variant at every grid point, with settings, environment and the native-twin checks."""

    rows: list[BenchRow]
    settings: dict
    environment: dict
    checks: dict[str, float] = field(default_factory=dict)

    def _find(self, kind: str, groups: Groups | None, batch: int, context: int) -> BenchRow | None:
        for r in self.rows:
            if r.kind == kind and r.groups == groups and r.batch == batch and r.context == context:
                return r
        return None

    def summary(self) -> list[dict]:
        """Per grid point and converted variant: decode/prefill tokens/sec of patched, native and original, the
        patched/native ratios, the speedups over the original and the KV-cache bytes."""
        out = []
        for r in self.rows:
            if r.kind != "patched":
                continue
            native = self._find("native", r.groups, r.batch, r.context)
            original = self._find("original", None, r.batch, r.context)
            out.append(
                {
                    "groups": r.groups,
                    "batch": r.batch,
                    "context": r.context,
                    "new_tokens": r.new_tokens,
                    "decode_tokens_per_s": {
                        "original": original.decode_tokens_per_s if original else None,
                        "patched": r.decode_tokens_per_s,
                        "native": native.decode_tokens_per_s if native else None,
                    },
                    "prefill_tokens_per_s": {
                        "original": original.prefill_tokens_per_s if original else None,
                        "patched": r.prefill_tokens_per_s,
                        "native": native.prefill_tokens_per_s if native else None,
                    },
                    "decode_patched_over_native": r.decode_tokens_per_s / native.decode_tokens_per_s
                    if native
                    else None,
                    "decode_patched_over_native_paired": _paired_ratio(native.decode_s, r.decode_s)
                    if native
                    else None,
                    "prefill_patched_over_native": r.prefill_tokens_per_s / native.prefill_tokens_per_s
                    if native
                    else None,
                    "decode_speedup_over_original": r.decode_tokens_per_s / original.decode_tokens_per_s
                    if original
                    else None,
                    "decode_speedup_over_original_runs": _paired_ratios(original.decode_s, r.decode_s)
                    if original
                    else None,
                    "prefill_speedup_over_original": r.prefill_tokens_per_s / original.prefill_tokens_per_s
                    if original
                    else None,
                    "kv_bytes": {"original": original.kv_bytes if original else None, "patched": r.kv_bytes},
                }
            )
        return out

    def _rows_table(self, markdown: bool) -> str:
        headers = [
            "variant",
            "batch",
            "context",
            "prefill tok/s",
            "decode tok/s",
            "peak KV cache",
            "decode runs (s)",
            "decode spread",
        ]
        rows = [
            [
                r.variant,
                str(r.batch),
                str(r.context),
                fmt_rate(r.prefill_tokens_per_s),
                fmt_rate(r.decode_tokens_per_s),
                fmt_bytes(r.kv_bytes),
                " ".join(f"{s:.2f}" for s in r.decode_s),
                f"{r.decode_spread:.0%}" + (" !" if r.decode_spread > SPREAD_WARNING else ""),
            ]
            for r in self.rows
        ]
        return format_table(headers, rows, markdown)

    def _summary_table(self, markdown: bool) -> str:
        headers = [
            "KV heads",
            "batch",
            "context",
            "decode tok/s original",
            "patched",
            "native GQA",
            "patched / native",
            "paired",
            "speedup vs original",
            "per round",
            "KV cache vs original",
        ]
        rows = []
        for s in self.summary():
            kv = s["kv_bytes"]
            rows.append(
                [
                    groups_label(s["groups"]),
                    str(s["batch"]),
                    str(s["context"]),
                    fmt_rate(s["decode_tokens_per_s"]["original"]),
                    fmt_rate(s["decode_tokens_per_s"]["patched"]),
                    fmt_rate(s["decode_tokens_per_s"]["native"]),
                    fmt_ratio(s["decode_patched_over_native"]),
                    fmt_ratio(s["decode_patched_over_native_paired"]),
                    fmt_ratio(s["decode_speedup_over_original"]),
                    _range(s["decode_speedup_over_original_runs"]),
                    fmt_ratio(kv["patched"] / kv["original"]) if kv["original"] else "-",
                ]
            )
        return format_table(headers, rows, markdown)

    def warnings(self) -> list[str]:
        """One line per variant and grid point whose timed runs spread wider than `SPREAD_WARNING`, and per
        conversion whose per-round speedups over the original disagree by more than that."""
        out = []
        for r in self.rows:
            for what, spread, runs in (
                ("decode", r.decode_spread, r.decode_s),
                ("prefill", r.prefill_spread, r.prefill_s),
            ):
                if spread > SPREAD_WARNING:
                    out.append(
                        f"{r.variant} (batch {r.batch}, context {r.context}): {what} runs {min(runs):.3g}-"
                        f"{max(runs):.3g} s, {spread:.0%} apart"
                    )
        for s in self.summary():
            runs = s["decode_speedup_over_original_runs"]
            if runs and len(runs) > 1 and (max(runs) - min(runs)) / statistics.median(runs) > SPREAD_WARNING:
                out.append(
                    f"KV heads {groups_label(s['groups'])} (batch {s['batch']}, context {s['context']}): decode "
                    f"speedup over the original x{min(runs):.2f}-x{max(runs):.2f} across rounds"
                )
        if out:
            out.append(
                f"Runs more than {SPREAD_WARNING:.0%} apart: the machine was shared or the runs too few to "
                "settle; do not trust these speed figures. Rerun on a quiet machine, with more --repeats."
            )
        return out

    def table(self) -> str:
        text = self._summary_table(False) + "\n\n" + self._rows_table(False)
        warnings = self.warnings()
        return text + ("\n\nWARNING:\n" + "\n".join(f"  {w}" for w in warnings) if warnings else "")

    def __str__(self) -> str:
        return self.table()

    def to_markdown(self) -> str:
        env = self.environment
        machine = env.get("machine", {})
        lines = [
            "# hf-gqa speed benchmark",
            "",
            f"- date: {env.get('date')}",
            f"- device: {env.get('device')} ({machine.get('gpu') or machine.get('cpu')}, "
            f"{machine.get('cpu_cores')} cores, {machine.get('torch_threads')} torch threads)",
            f"- dtype: {self.settings.get('dtype')}; model: {self.settings.get('model')}",
            f"- settings: new_tokens={self.settings.get('new_tokens')}, warmup={self.settings.get('warmup')}, "
            f"repeats={self.settings.get('repeats')} (medians), prefill_repeats={self.settings.get('prefill_repeats')}, "
            f"interleaved={self.settings.get('interleave')}, lockstep decode={self.settings.get('lockstep')}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()),
        ]
        if self.settings.get("command"):
            lines.append(f"- command: `{self.settings['command']}`")
        lines += ["", "## Decode: patched vs native GQA vs the original", "", self._summary_table(True)]
        lines += [
            "",
            "`patched / native` is the ratio of the median decode tokens/sec; `paired` is the median over rounds "
            "of the ratio within a round (the two run back to back, or step by step with lockstep decode, so load "
            "changes between rounds cancel).",
        ]
        lines += ["", "## Every variant", "", self._rows_table(True)]
        lines += [
            "",
            "`decode spread` is `(slowest - fastest) / median` of a variant's timed decode runs; `per round` gives "
            "the lowest and highest of the per-round speedups over the original.",
        ]
        warnings = self.warnings()
        if warnings:
            lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
        if self.checks:
            lines += ["", "## Checks", ""] + [f"- {k}: {v:.3g}" for k, v in self.checks.items()]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "environment": self.environment,
            "summary": self.summary(),
            "rows": [r.to_dict() for r in self.rows],
            "warnings": self.warnings(),
            "checks": self.checks,
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def save(self, directory: str | Path, name: str = "bench") -> dict[str, Path]:
        """Write `<name>.json` and `<name>.md` into `directory`; returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"json": directory / f"{name}.json", "markdown": directory / f"{name}.md"}
        paths["json"].write_text(self.to_json() + "\n")
        paths["markdown"].write_text(self.to_markdown())
        return paths


def bench(
    model_or_path: PreTrainedModel | str,
    groups: Sequence[Groups] = (4, 1),
    batch: Sequence[int] = (1, 8),
    context: Sequence[int] = (512, 2048),
    new_tokens: int = 128,
    warmup: int = 1,
    repeats: int = 3,
    prefill_repeats: int | None = None,
    merge: str | None = None,
    native: bool = True,
    interleave: bool = True,
    lockstep: bool | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    gguf_file: str | None = None,
    seed: int = 0,
    progress: bool = True,
    cache_config: dict | None = None,
    **patch_kwargs,
) -> BenchReport:
    """Prefill and decode tokens/sec and peak KV-cache bytes of the original and converted models.

    Args:
        model_or_path: a model (not modified: each variant is a deep copy) or a path / Hub id to load.
        groups: the converted variants, each an int or a per-layer list; one equal to the model's KV head count
            is the original and is skipped.
        batch, context: the grid; `new_tokens` greedy tokens are decoded after a prefill of `context` tokens.
        warmup, repeats: untimed and timed runs per variant and grid point; the report gives medians.
        prefill_repeats: timed prefills per variant and grid point (default `repeats`); fewer saves time where
            prefill is slow (CPU): the other rounds decode from a copy of the prefilled cache.
        merge, patch_kwargs: as for `hf_gqa.patch`, with its defaults (refine with `calibration=`, mean without).
        native: also time a natively-GQA transformers model of each converted shape (same weights).
        interleave: keep every variant in memory and alternate between them (fairest on a noisy machine);
            False measures one converted variant at a time (for models too large to hold several copies).
        lockstep: decode all variants step by step, alternating every step, timing each step on its own (a
            busy CPU's load changes then hit every variant alike). None (default): on CPU, not on CUDA, where
            synchronising after every step would hide the overlap of kernel launches with execution.
        dtype, device, gguf_file: for loading from a path (a given model is used as it is).
        cache_config: run every variant on transformers' quantized KV cache, e.g. `{"backend": "hqq", "nbits": 4}`
            (as `generate(cache_implementation="quantized", cache_config=...)` takes it); the peak KV cache is then
            the bytes its quantized tensors (and float residual window) hold.
    """
    if isinstance(model_or_path, str):
        model = load_model(model_or_path, gguf_file=gguf_file, dtype=dtype, device=device)
        name = model_or_path if not gguf_file else f"{model_or_path}/{gguf_file}"
    else:
        model, name = (
            model_or_path.eval(),
            getattr(model_or_path.config, "_name_or_path", "") or type(model_or_path).__name__,
        )
    grid = [(b, c) for b in batch for c in context]
    max_positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if max_positions and max(context) + new_tokens > max_positions:
        raise GQAError(
            f"context {max(context)} + new_tokens {new_tokens} exceeds the model's {max_positions} positions."
        )
    groups = list(groups)
    settings = {
        "model": name,
        "groups": groups,
        "batch": list(batch),
        "context": list(context),
        "new_tokens": new_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "prefill_repeats": repeats if prefill_repeats is None else prefill_repeats,
        "merge": method_label(merge, patch_kwargs.get("calibration") is not None),
        "native": native,
        "interleave": interleave,
        "lockstep": lockstep,
        "dtype": str(model_dtype(model)).replace("torch.", ""),
        "seed": seed,
        "original_kv_heads": kv_layout(model).kv_heads,
        "cache_config": cache_config,
    }
    if lockstep is None:
        lockstep = model_device(model).type == "cpu"
        settings["lockstep"] = lockstep
    batches = [groups] if interleave else [[g] for g in groups]
    rows: list[BenchRow] = []
    checks: dict[str, float] = {}
    with tqdm(total=0, desc="hf-gqa bench", unit="run", disable=not progress) as bar:
        for i, subset in enumerate(batches):
            variants, found = build_variants(model, subset, merge=merge, native=native, **patch_kwargs)
            if i > 0:  # the original was measured with the first subset
                variants = variants[1:]
            checks.update(found)
            bar.total += len(variants) * (warmup + repeats) * len(grid)
            bar.refresh()
            for b, c in grid:
                rows.extend(
                    measure(
                        variants,
                        b,
                        c,
                        new_tokens,
                        warmup,
                        repeats,
                        seed,
                        bar,
                        prefill_repeats,
                        lockstep,
                        cache_config,
                    )
                )
            del variants
    rows.sort(key=lambda r: (r.batch, r.context))
    return BenchReport(rows, settings, environment(model_device(model)), checks)


__all__ = [
    "BenchReport",
    "BenchRow",
    "Variant",
    "bench",
    "build_variants",
    "native_gqa_model",
]
