"""`compare()`: the quality a conversion costs and the speed and memory it buys, in one report.

The original model and each converted variant are evaluated with lm-eval on the same tasks, limit and seeds. Each
variant is a deep copy of the original made in memory (the weights are never read from disk again), converted by
`hf_gqa.patch`, measured, then freed, so at most two copies of the model are in memory at a time.
"""

from __future__ import annotations

import copy
import difflib
import gc
import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..architectures import get_adapter
from ..errors import GQAError
from ..groups import Groups, groups_label, parse_groups
from ..methods import method_label
from ..patch import patch
from ..planning import plan_layers
from .bench import Variant, measure
from .common import environment, kv_layout, model_device, model_dtype
from .fidelity import kl_divergence, logits_on, next_token_agreement
from .report import Report, Score, VariantResult
from .tasks import BUNDLED_TAG, BUNDLED_TASKS
from .tasks import task_manager as make_task_manager


class UnknownTaskError(GQAError, KeyError):
    """A task name neither bundled with hf_gqa nor known to lm-eval."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class SpeedSettings:
    """The speed measurement `compare` makes of each variant (see `hf_gqa.evaluation.bench` for the method)."""

    batch: int = 1
    context: int = 512
    new_tokens: int = 32
    warmup: int = 1
    repeats: int = 3


class TaskDataError(GQAError):
    """A task whose data could not be loaded (a standard lm-eval task without the Hugging Face Hub)."""


#: Bundled offline counterparts of standard lm-eval tasks, for error messages.
OFFLINE_COUNTERPARTS = {
    "hellaswag": "hf_gqa_hellaswag",
    "arc_easy": "hf_gqa_arc_easy",
    "winogrande": "hf_gqa_winogrande",
    "wikitext": "hf_gqa_wikipedia",
}


def _load_tasks(manager, tasks: Sequence[str]) -> None:
    """Build every task once (reads its data), so that a task without data fails before any model runs."""
    for name in tasks:
        try:
            manager.load([name])
        except (ConnectionError, OSError) as err:
            offline = OFFLINE_COUNTERPARTS.get(name)
            hint = f" Offline, use the bundled {offline!r}." if offline else ""
            raise TaskDataError(f"could not load the data of task {name!r}: {err}.{hint}") from err


def check_tasks(tasks: Sequence[str], load: bool = True):
    """An lm-eval `TaskManager` that resolves every name in `tasks` (a task, group or tag name, or a path to a task
    YAML), or `UnknownTaskError` listing what exists.

    With `load`, each task is also built once, which reads its data (`TaskDataError` when that fails).
    """
    manager = make_task_manager(tasks)  # lm-eval's own tasks are indexed unless every name is a bundled one
    unknown = [t for t in tasks if t not in manager.all_tasks and not _is_task_file(t)]
    if unknown:
        lines = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            lines.append(
                f"unknown task {name!r}" + (f" (did you mean: {', '.join(close)}?)" if close else "")
            )
        others = len(manager.all_tasks) - len(BUNDLED_TASKS) - 1
        raise UnknownTaskError(
            "; ".join(lines)
            + ". Tasks bundled with hf_gqa (offline): "
            + ", ".join(BUNDLED_TASKS)
            + f" (tag "
            f"{BUNDLED_TAG!r}). The other {others} task, group and tag names lm-eval knows (`lm_eval ls tasks`) "
            "read their data from the Hugging Face Hub."
        )
    if load:
        with _quiet_lm_eval(verbose=False):
            _load_tasks(manager, tasks)
    return manager


def _is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


@contextmanager
def _quiet_lm_eval(verbose: bool):
    """lm-eval logs every request batch at INFO/WARNING; keep the terminal to progress bars unless verbose."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    if not verbose:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _scores(results: dict) -> dict[str, dict[str, Score]]:
    """lm-eval's `results` (`{"acc,none": x, "acc_stderr,none": s, ...}` per task) -> task -> metric -> Score."""
    out: dict[str, dict[str, Score]] = {}
    for task, values in results.items():
        metrics: dict[str, Score] = {}
        for key, value in values.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt == "none" else f"{metric} ({filt})"
            stderr = values.get(f"{metric}_stderr,{filt}")
            metrics[name] = Score(
                value=float(value) if isinstance(value, (int, float)) else None,
                stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
            )
        out[task] = metrics
    return out


def evaluate_quality(
    model: PreTrainedModel,
    tokenizer,
    tasks: Sequence[str],
    limit: int | float | None,
    manager,
    num_fewshot: int | None = None,
    batch_size: int | str = 1,
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 1234,
    verbose: bool = False,
) -> dict:
    """lm-eval's `simple_evaluate` on an in-memory model through the `hf-gqa` model class (no conversion)."""
    import lm_eval

    from .lm_eval_model import HFGQALM

    with _quiet_lm_eval(verbose):
        lm = HFGQALM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )


def _fidelity_ids(tokenizer, tokens: int) -> torch.Tensor:
    """The first `tokens` tokens `[tokens]` of the held-out Wikipedia text."""
    from ..data import heldout_paragraph

    ids = tokenizer(heldout_paragraph(min_chars=tokens * 8), return_tensors="pt").input_ids[0]
    return ids[:tokens]


def _max_positions(model: PreTrainedModel) -> int:
    return getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or 2048


def _measure_speed(
    model: PreTrainedModel,
    settings: SpeedSettings,
    seed: int,
    original: PreTrainedModel | None = None,
    cache_config: dict | None = None,
) -> dict[str, float]:
    """Prefill and decode tokens/sec of `model`. Given the `original`, both are timed interleaved (same
    conditions, so the ratios hold on a busy machine) and the ratios `model / original` are added."""
    context = max(1, min(settings.context, _max_positions(model) - settings.new_tokens))
    variants = [Variant("v", "v", None, model)]
    if original is not None:
        variants.append(Variant("original", "original", None, original))
    rows = measure(
        variants,
        settings.batch,
        context,
        settings.new_tokens,
        settings.warmup,
        settings.repeats,
        seed,
        lockstep=model_device(model).type == "cpu",
        cache_config=cache_config,
    )
    out = {
        "prefill_tokens_per_s": rows[0].prefill_tokens_per_s,
        "decode_tokens_per_s": rows[0].decode_tokens_per_s,
        "kv_cache_bytes": rows[0].kv_bytes,
        "batch": settings.batch,
        "context": context,
        "new_tokens": settings.new_tokens,
    }
    if original is not None:
        out["prefill_ratio"] = rows[0].prefill_tokens_per_s / rows[1].prefill_tokens_per_s
        out["decode_ratio"] = rows[0].decode_tokens_per_s / rows[1].decode_tokens_per_s
    return out


def compare(
    model: PreTrainedModel,
    tokenizer,
    groups: Sequence[Groups | str] = (4, 1),
    tasks: Sequence[str] = ("hf_gqa_wikipedia",),
    limit: int | float | None = None,
    merge: str | None = None,
    *,
    num_fewshot: int | None = None,
    batch_size: int | str = 1,
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 1234,
    speed: SpeedSettings | dict | bool = True,
    fidelity_tokens: int = 512,
    progress: bool = True,
    verbose: bool = False,
    task_manager=None,
    cache_config: dict | None = None,
    **patch_kwargs,
) -> Report:
    """Evaluate `model` and its conversions to each `groups` entry; report quality, speed and memory.

    Args:
        model: a transformers causal LM of a family hf_gqa converts. It is not modified.
        tokenizer: its tokenizer.
        groups: one converted variant per entry: KV heads (int) or a per-layer list. An entry equal to the model's
            KV head count is evaluated too (a converted copy with nothing merged: its deltas must be zero).
        tasks: lm-eval task names; the bundled offline ones are `hf_gqa.evaluation.tasks.BUNDLED_TASKS`.
        limit: lm-eval's `limit` (documents per task; a float < 1 is a fraction).
        merge, patch_kwargs: as for `hf_gqa.patch`, with its defaults: refine where `calibration=` (and
            `tokenizer=`) are given, mean pooling otherwise; e.g. `method=`, `grouping=`, `calibration_tokens=`.
        num_fewshot, batch_size, max_length, bootstrap_iters: passed to lm-eval (`bootstrap_iters` gives the
            stderr of perplexity-like metrics; 0 skips it).
        seed: every lm-eval seed (python, numpy, torch, few-shot), the same for every variant.
        speed: `SpeedSettings` (or a dict of its fields) for the prefill / decode measurement, True for the
            defaults, False to skip it. Each variant is timed interleaved with the original, and its speed ratios
            come from that paired measurement.
        fidelity_tokens: next-token agreement and KL divergence against the original's logits on this many
            held-out Wikipedia tokens (0 skips it).
        progress: show progress bars; verbose: let lm-eval log.
        task_manager: an lm-eval `TaskManager` that already resolved `tasks` (from `check_tasks`); by default
            `compare` makes one and checks the tasks before running anything.
        cache_config: a quantized KV cache for every variant, as `generate(cache_implementation="quantized",
            cache_config=...)` takes it (e.g. `{"backend": "hqq", "nbits": 4}`): KV bytes per token are then that
            cache's (codes, scales and zero-points; `hf_gqa.cache.KVQuantization`) and the speed is measured
            through it. lm-eval and the fidelity logits score full forwards, which do not read a KV cache, so the
            quality columns do not see the quantization (`benchmarks/quantized_cache.py` measures quality
            through the cache).

    Returns:
        A `Report` (`print(report)`, `report.to_markdown()`, `report.save(dir)`).
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    variants_groups = [parse_groups(g) if isinstance(g, str) else g for g in groups]
    adapter = get_adapter(model)
    for g in variants_groups:  # every bad groups value fails here, before anything runs
        plan_layers(model, adapter, g)
    manager = task_manager or check_tasks(tasks)
    if speed is True:
        speed = SpeedSettings()
    elif isinstance(speed, dict):
        speed = SpeedSettings(**speed)
    layout = kv_layout(model)
    dtype = model_dtype(model)
    was_training = model.training
    model.eval()

    reference = None
    fidelity_ids = None
    if fidelity_tokens:
        fidelity_ids = _fidelity_ids(tokenizer, fidelity_tokens)
        window = min(_max_positions(model), max_length or 2048, fidelity_ids.shape[0])
        reference = logits_on(model, fidelity_ids, window)

    settings = {
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_type": model.config.model_type,
        "groups": variants_groups,
        "merge": method_label(merge, patch_kwargs.get("calibration") is not None),
        "patch_kwargs": {k: v for k, v in patch_kwargs.items() if k != "stats"},
        "tasks": tasks,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
        "max_length": max_length,
        "bootstrap_iters": bootstrap_iters,
        "seed": seed,
        "speed": vars(speed) if speed else None,
        "fidelity_tokens": int(fidelity_ids.shape[0]) if fidelity_ids is not None else 0,
        "dtype": str(dtype).replace("torch.", ""),
        "original_kv_heads": layout.kv_heads,
        "num_heads": layout.num_heads,
        "cache_config": cache_config,
    }

    results: list[VariantResult] = []
    higher_is_better: dict[str, dict[str, bool]] = {}
    n_samples: dict[str, int] = {}
    plan = [None] + variants_groups
    for g in tqdm(plan, desc="hf-gqa compare", unit="variant", disable=not progress):
        start = time.perf_counter()
        variant = model if g is None else patch(copy.deepcopy(model), groups=g, merge=merge, **patch_kwargs)
        variant.eval()
        out = evaluate_quality(
            variant,
            tokenizer,
            tasks,
            limit,
            manager,
            num_fewshot,
            batch_size,
            max_length,
            bootstrap_iters,
            seed,
            verbose,
        )
        for task, flags in out.get("higher_is_better", {}).items():
            higher_is_better.setdefault(task, {}).update(flags)
        for task, counts in out.get("n-samples", {}).items():
            n_samples[task] = counts.get("effective", counts.get("original"))
        result = VariantResult(
            name=groups_label(g) + (" (unchanged)" if g is not None and layout.is_unchanged_by(g) else ""),
            groups=g,
            kv_heads=kv_layout(variant).kv_heads,
            kv_bytes_per_token=kv_layout(variant).bytes_per_token(dtype, cache_config),
            scores=_scores(out["results"]),
        )
        if speed:
            result.speed = _measure_speed(
                variant, speed, seed, None if variant is model else model, cache_config
            )
        if reference is not None:
            logits = reference if g is None else logits_on(variant, fidelity_ids, window)
            result.fidelity = {
                "next_token_agreement": next_token_agreement(logits, reference),
                "kl_divergence": kl_divergence(logits, reference),
            }
        result.seconds = time.perf_counter() - start
        results.append(result)
        if variant is not model:
            del variant
            gc.collect()
            if model_device(model).type == "cuda":
                torch.cuda.empty_cache()
    model.train(was_training)
    return Report(
        variants=results,
        higher_is_better=higher_is_better,
        n_samples=n_samples,
        settings=settings,
        environment=environment(model_device(model)),
    )


__all__ = ["SpeedSettings", "TaskDataError", "UnknownTaskError", "check_tasks", "compare", "evaluate_quality"]
