"""`UptrainConfig`: every setting of `hf_gqa.uptrain` in one validated object (like PEFT's `LoraConfig`).

    config = UptrainConfig(method="lora", max_steps=500, lora_r=8, training_args={"bf16": True})
    trained = hf_gqa.uptrain(model, tokenizer, texts, config, teacher=original)

`uptrain(model, tokenizer, texts, method="lora", max_steps=500, bf16=True)` builds the same config from its
keywords (`UptrainConfig.from_kwargs`): keywords naming a field set it, every other keyword is a
`TrainingArguments` argument.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import GQAError

METHODS = ("lora", "kv", "attention", "full")

#: Learning rates used when `uptrain` is given none.
DEFAULT_LEARNING_RATES: dict[str, float] = {"lora": 5e-4, "kv": 2e-4, "attention": 5e-5, "full": 5e-5}


@dataclass
class UptrainConfig:
    """Settings of `hf_gqa.uptrain`. Validated on construction (`GQAError`, a `ValueError`, on a bad value).

    The models (`teacher`), the text (`train_data`, `eval_data`) and `TrainerCallback`s are arguments of
    `uptrain`, not settings.
    """

    method: str = "lora"
    """What trains: `"lora"` (a PEFT LoRA adapter on the family's attention projections), `"kv"` (only the
    converted key/value projections), `"attention"` (every parameter of the converted attention modules) or
    `"full"` (every parameter); one of `METHODS`. Default `"lora"`."""

    max_steps: int = 100
    """Optimiser steps (a cap when `max_seconds` is set). Default 100."""

    learning_rate: float | None = None
    """Peak learning rate. Default `None`: `DEFAULT_LEARNING_RATES[method]` (5e-4 for LoRA, 2e-4 for K/V,
    5e-5 for attention and full)."""

    lora_r: int = 16
    """LoRA rank (`method="lora"`). Default 16."""

    lora_alpha: float | None = None
    """LoRA scale numerator (`method="lora"`). Default `None`: `2 * lora_r`."""

    lora_dropout: float = 0.0
    """Dropout on the LoRA input (`method="lora"`). Default 0."""

    target_modules: Sequence[str] | str | None = None
    """LoRA targets: module names, or a PEFT regular expression (`method="lora"`). Default `None`:
    `default_lora_targets(model)`, the family adapter's `lora_targets` inside every converted attention module."""

    merge_adapter: bool = False
    """For `method="lora"`: return `merge_and_unload()`, a plain converted model with the adapter folded in,
    instead of the `peft.PeftModel`. Default False. (Formerly `uptrain(merge=...)`, which read like
    `hf_gqa.patch`'s head-merging `merge=`.)"""

    distill_weight: float = 1.0
    """With a teacher: weight of the KL term, `loss = lm_weight * LM + distill_weight * T^2 * KL(teacher ||
    student)`. Default 1."""

    temperature: float = 1.0
    """With a teacher: softmax temperature `T` of the KL term (the LM loss is always at `T = 1`). Default 1."""

    lm_weight: float = 1.0
    """With a teacher: weight of the next-token loss (0: distil only). Without a teacher the loss is the
    next-token loss whatever this is. Default 1."""

    hidden_weight: float = 0.0
    """With a teacher: also add `hidden_weight * hidden_state_distance`, every layer's output matched to the
    teacher's (relative squared distance, averaged over layers, per token). Default 0 (off)."""

    block_size: int = 512
    """Tokens per packed block, for training and evaluation. Default 512."""

    text_column: str = "text"
    """The text column of a `datasets.Dataset` given as training or evaluation data. Default `"text"`."""

    eval_fraction: float = 0.0
    """Without `eval_data`: hold out this fraction of the training blocks (the last ones) for evaluation.
    Default 0 (no evaluation set)."""

    max_eval_blocks: int | None = None
    """Evaluate on at most this many blocks. Default `None` (all)."""

    output_dir: str | os.PathLike | None = None
    """Where the Trainer writes and the loss log (`loss_log.jsonl`) goes; the trained model is not saved there.
    Default `None`: a temporary folder, deleted afterwards."""

    max_seconds: float | None = None
    """Stop after this much training time (evaluation excluded). The "linear" and "cosine" schedules then decay
    to 0 at whichever comes first, `max_steps` or `max_seconds`, and warmup defaults to
    `min(10, max_steps // 20)` steps. Default `None` (no time limit)."""

    training_args: dict[str, Any] = field(default_factory=dict)
    """Other `transformers.TrainingArguments` (`per_device_train_batch_size` (default 4),
    `gradient_accumulation_steps`, `weight_decay`, `lr_scheduler_type` (default "cosine"), `warmup_steps`,
    `eval_steps`, `logging_steps`, `bf16`, `seed`, `fsdp`, `deepspeed`, ...); they win over uptrain's defaults.
    Default `{}`."""

    def __post_init__(self) -> None:
        self.training_args = dict(self.training_args)
        _check_method(self.method, self.merge_adapter)
        _check_positive(max_steps=self.max_steps, lora_r=self.lora_r, temperature=self.temperature)
        _check_positive_or_none(
            learning_rate=self.learning_rate,
            lora_alpha=self.lora_alpha,
            max_eval_blocks=self.max_eval_blocks,
            max_seconds=self.max_seconds,
        )
        _check_non_negative(
            distill_weight=self.distill_weight, lm_weight=self.lm_weight, hidden_weight=self.hidden_weight
        )
        if self.block_size < 2:
            raise GQAError(f"block_size must be at least 2 tokens (one prediction), got {self.block_size}.")
        _check_fraction("lora_dropout", self.lora_dropout)
        _check_fraction("eval_fraction", self.eval_fraction)
        _check_training_args(self.training_args)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> UptrainConfig:
        """The config of `uptrain(...)`'s keywords: a keyword naming a field sets it; every other keyword is a
        `TrainingArguments` argument (added to `training_args`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        settings = {key: value for key, value in kwargs.items() if key in names}
        extra = {key: value for key, value in kwargs.items() if key not in names}
        training_args = {**settings.pop("training_args", {}), **extra}
        return cls(**settings, training_args=training_args)

    @property
    def resolved_learning_rate(self) -> float:
        """`learning_rate`, or the method's default (`DEFAULT_LEARNING_RATES`) when it is `None`."""
        if self.learning_rate is not None:
            return self.learning_rate
        return DEFAULT_LEARNING_RATES[self.method]


# -- validation ------------------------------------------------------------------------------------------------
def _check_method(method: str, merge_adapter: bool) -> None:
    if method not in METHODS:
        raise GQAError(f"method must be one of {METHODS}, got {method!r}.")
    if merge_adapter and method != "lora":
        raise GQAError(f"merge_adapter=True applies to method='lora' only (method={method!r}).")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise GQAError(f"{name} must be positive, got {value}.")


def _check_positive_or_none(**values: float | None) -> None:
    _check_positive(**{name: value for name, value in values.items() if value is not None})


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise GQAError(f"{name} must be 0 or more, got {value}.")


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise GQAError(f"{name} must be in [0, 1), got {value}.")


@functools.cache
def _training_argument_names() -> frozenset[str]:
    from transformers import TrainingArguments

    return frozenset(inspect.signature(TrainingArguments.__init__).parameters) - {"self"}


def _check_training_args(training_args: dict[str, Any]) -> None:
    """Every key is a `TrainingArguments` argument that is not set through a config field."""
    fields = {f.name for f in dataclasses.fields(UptrainConfig)}
    shadowed = sorted(set(training_args) & fields)
    if shadowed:
        raise GQAError(
            f"Set {shadowed} as UptrainConfig fields, not in training_args (uptrain sets those "
            "TrainingArguments from the fields)."
        )
    known = _training_argument_names()
    unknown = sorted(set(training_args) - known)
    if unknown:
        hints = [
            f"{name!r} (did you mean {match[0]!r}?)" if match else repr(name)
            for name in unknown
            for match in [difflib.get_close_matches(name, sorted(known | fields), n=1)]
        ]
        raise GQAError(
            f"Unknown uptrain setting {', '.join(hints)}: neither an UptrainConfig field nor a "
            "transformers TrainingArguments argument."
        )


__all__ = ["DEFAULT_LEARNING_RATES", "METHODS", "UptrainConfig"]
