"""The uptraining `Trainer`: distillation from a teacher, a time budget, the loss log, `TrainingArguments`.

`UptrainTrainer` is the stock transformers `Trainer` (so `accelerate launch`, DDP, FSDP and DeepSpeed work through
its arguments; FSDP on CPU processes too, see `distributed`) with one change: with a teacher, the training loss is
`lm_weight * LM + distill_weight * T^2 * KL(teacher || student)` on the logits (plus, with `hidden_weight`, a
distance between every layer's output and the teacher's), computed in one fused pass (`losses.distillation_loss`).
`TimeLimitCallback` stops training after a time budget, over which the "linear" / "cosine" schedules decay
(`time_aware_lr_factor`); `LossLogCallback` writes every log to `loss_log.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .config import UptrainConfig
from .data import TokenBlocks
from .distributed import enable_fsdp_on_cpu, mask_sharded_gradients
from .losses import distillation_loss, hidden_state_distance, scored_rows

#: The loss log `uptrain` writes in its `output_dir` (one JSON object per log).
LOSS_LOG = "loss_log.jsonl"


# -- learning-rate schedule over a time budget -----------------------------------------------------------------
#: `lr_scheduler_type`s that `uptrain(max_seconds=...)` decays over the time budget as well as over `max_steps`.
TIME_AWARE_SCHEDULES = ("linear", "cosine")


def time_aware_lr_factor(
    step: int, warmup_steps: int, max_steps: int, time_progress: float, schedule: str
) -> float:
    """Learning-rate multiplier: linear warmup over `warmup_steps`, then `schedule` ("linear" or "cosine") decay to
    0 over whichever runs out first, the steps (`max_steps`) or the time budget (`time_progress` in [0, 1])."""
    warm = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    step_progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    p = min(1.0, max(0.0, step_progress, time_progress))
    decay = 1.0 - p if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
    return warm * decay


# -- the trainer and its callbacks -----------------------------------------------------------------------------
class UptrainTrainer(Trainer):
    """A `Trainer` that distils from `teacher` when one is given.

    With a teacher, the training loss is `lm_weight * LM + distill_weight * T^2 * KL(teacher || student)` on the
    logits (one fused pass, `distillation_loss`), plus `hidden_weight * hidden_state_distance` on every layer's
    output when `hidden_weight > 0`. Every term is normalised like the LM loss (per token over the accumulated,
    device-averaged batch when the Trainer passes `num_items_in_batch`), so gradient accumulation and data
    parallelism scale them alike. Evaluation losses are the LM loss alone. Parameters named in `no_decay` are
    kept out of weight decay. Logs add `lm_loss`, `distill_kl` and, with `hidden_weight`, `hidden_distance`
    (token means since the last log), `eval_perplexity` and `train_tokens`.

    Under `accelerate launch` it trains data parallel (DDP) or sharded (FSDP2 or FSDP1, by the launcher's config or
    `fsdp=` in the `TrainingArguments`); on CPU processes (gloo) it turns FSDP on itself where accelerate would
    fall back to DDP (`distributed.enable_fsdp_on_cpu`). Under FSDP2 the `grad_masks` (`{parameter name: mask}`,
    K/V rows of fused projections) are applied to the sharded gradients after each backward pass.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        distill_weight: float = 1.0,
        temperature: float = 1.0,
        lm_weight: float = 1.0,
        hidden_weight: float = 0.0,
        no_decay: Sequence[str] = (),
        block_size: int | None = None,
        time_limit: TimeLimitCallback | None = None,
        grad_masks: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        self.grad_masks = dict(grad_masks or {})
        self._local_masks: dict[str, torch.Tensor] = {}
        super().__init__(*args, **kwargs)
        self.time_limit = time_limit
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
        self.distill_weight = distill_weight
        self.temperature = temperature
        self.lm_weight = lm_weight
        self.hidden_weight = hidden_weight
        self.no_decay = set(no_decay)
        self.block_size = block_size
        self._kl_sum, self._lm_sum, self._hidden_sum, self._count = 0.0, 0.0, 0.0, 0

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; on CPU processes (gloo) with FSDP asked for, FSDP turned on
        (`enable_fsdp_on_cpu`: accelerate itself shards only on accelerator devices)."""
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args):
            self.is_fsdp_enabled = True

    def training_step(self, model: nn.Module, inputs: dict[str, torch.Tensor], *args: Any, **kwargs: Any):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.grad_masks and self.is_fsdp_enabled:
            # FSDP2 replaced the parameters the K/V gradient hooks were registered on: mask the sharded grads
            mask_sharded_gradients(self.model, self.grad_masks, self._local_masks)
        return loss

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return [n for n in super().get_decay_parameter_names(model) if n not in self.no_decay]

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """With a `time_limit`, "linear" and "cosine" decay over the time budget too (`time_aware_lr_factor`)."""
        schedule = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
        if self.lr_scheduler is None and self.time_limit is not None and schedule in TIME_AWARE_SCHEDULES:
            warmup = self.args.get_warmup_steps(num_training_steps)
            limit = self.time_limit

            def factor(step: int) -> float:
                return time_aware_lr_factor(step, warmup, num_training_steps, limit.progress, schedule)

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

    def _teacher_outputs(self, inputs: dict[str, torch.Tensor], hidden: bool):
        device = inputs["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            return self.teacher(**inputs, output_hidden_states=hidden)

    def _token_scale(self, num_items_in_batch: torch.Tensor | int | None, count: int) -> float:
        """What a token sum is multiplied by to be normalised like the Trainer's LM loss."""
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            scale = 1.0 / float(num_items_in_batch)
            if self.args.average_tokens_across_devices:
                scale *= self.accelerator.num_processes
            return scale
        return 1.0 / max(count, 1)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        distill = self.teacher is not None and model.training
        if not distill or (self.distill_weight == 0 and self.hidden_weight <= 0):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = self.hidden_weight > 0
        outputs = model(**model_inputs, output_hidden_states=hidden)
        teacher = self._teacher_outputs(model_inputs, hidden)
        rows, _ = scored_rows(labels)
        scale = self._token_scale(num_items_in_batch, int(rows.numel()))
        loss, kl_sum, lm_sum, count = distillation_loss(
            outputs.logits,
            teacher.logits,
            labels,
            self.temperature,
            kl_weight=self.distill_weight * scale,
            lm_weight=self.lm_weight * scale,
        )
        if hidden:
            distance = hidden_state_distance(outputs.hidden_states, teacher.hidden_states, labels)
            loss = loss + (self.hidden_weight * scale) * distance
            self._hidden_sum += distance.item()
        self._kl_sum += kl_sum.item()
        self._lm_sum += lm_sum.item()
        self._count += count
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 700.0))
        if "loss" in logs and self._count:
            logs["lm_loss"] = self._lm_sum / self._count
            logs["distill_kl"] = self._kl_sum / self._count
            if self.hidden_weight > 0:
                logs["hidden_distance"] = self._hidden_sum / self._count
            self._kl_sum, self._lm_sum, self._hidden_sum, self._count = 0.0, 0.0, 0.0, 0
        if self.block_size:
            logs["train_tokens"] = self.state.global_step * self.tokens_per_step()
        super().log(logs, start_time)

    def tokens_per_step(self) -> int:
        """Training tokens per optimiser step over all processes."""
        args = self.args
        return (
            args.per_device_train_batch_size
            * args.gradient_accumulation_steps
            * args.world_size
            * (self.block_size or 0)
        )


class LossLogCallback(TrainerCallback):
    """Writes every log (training loss, eval loss, speed) as one JSON line to `path`, on the main process."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "time_s": round(time.perf_counter() - self.start, 3), **logs}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


class TimeLimitCallback(TrainerCallback):
    """Stops training after `max_seconds` of training time, evaluating once more if an evaluation set is configured.

    Training time is the sum over optimiser steps of the time from `on_step_begin` to `on_step_end` (evaluation,
    logging and saving between steps are not counted), the largest over processes, so that all processes stop at
    the same step. `progress` (training time over `max_seconds`, at most 1) drives `UptrainTrainer`'s time-aware
    learning-rate schedules. Put it before other callbacks so their `on_step_end` work is not counted.
    """

    def __init__(self, max_seconds: float) -> None:
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}.")
        self.max_seconds = max_seconds
        self.elapsed = 0.0
        self._local = 0.0
        self._step_start = time.perf_counter()

    @property
    def progress(self) -> float:
        return min(1.0, self.elapsed / self.max_seconds)

    def on_train_begin(self, args, state, control, **kwargs):
        self.elapsed = self._local = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._local += time.perf_counter() - self._step_start
        elapsed = torch.tensor(self._local, dtype=torch.float64, device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        self.elapsed = elapsed.item()
        if self.elapsed >= self.max_seconds:
            control.should_training_stop = True
            control.should_evaluate = args.eval_strategy != "no"
            control.should_log = True
        return control


# -- building and running --------------------------------------------------------------------------------------
def build_trainer(
    model: nn.Module,
    config: UptrainConfig,
    output_dir: str | os.PathLike,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor | None,
    teacher: nn.Module | None = None,
    no_decay: Sequence[str] = (),
    callbacks: Sequence[TrainerCallback] = (),
    grad_masks: dict[str, torch.Tensor] | None = None,
) -> UptrainTrainer:
    """The `UptrainTrainer` of `config` on `train_blocks` `[n_train, block_size]` (and `eval_blocks`
    `[n_eval, block_size]`), with the loss log in `output_dir`, a `TimeLimitCallback` with `config.max_seconds`,
    then `callbacks`. `grad_masks` (`{parameter name: mask}`) are applied to sharded gradients under FSDP."""
    time_limit = TimeLimitCallback(config.max_seconds) if config.max_seconds is not None else None
    all_callbacks = [LossLogCallback(Path(output_dir) / LOSS_LOG), *callbacks]
    if time_limit is not None:
        all_callbacks.insert(0, time_limit)  # first: the others' on_step_end work is not training time
    return UptrainTrainer(
        model=model,
        args=_training_arguments(output_dir, config, evaluate=eval_blocks is not None),
        train_dataset=TokenBlocks(train_blocks),
        eval_dataset=TokenBlocks(eval_blocks) if eval_blocks is not None else None,
        callbacks=all_callbacks,
        teacher=teacher,
        distill_weight=config.distill_weight,
        temperature=config.temperature,
        lm_weight=config.lm_weight,
        hidden_weight=config.hidden_weight,
        no_decay=no_decay,
        block_size=config.block_size,
        time_limit=time_limit,
        grad_masks=grad_masks,
    )


def train_and_evaluate(trainer: Trainer) -> None:
    """`trainer.train()`, then one more evaluation when there is an evaluation set and the last step was not
    evaluated (so that the loss log ends with the final model's evaluation)."""
    trainer.train()
    if trainer.eval_dataset is not None and not _evaluated_at(
        trainer.state.log_history, trainer.state.global_step
    ):
        trainer.evaluate()


def _evaluated_at(log_history: list[dict[str, Any]], step: int) -> bool:
    return any("eval_loss" in row and row.get("step") == step for row in log_history)


def _distributed_cpu_launch() -> bool:
    """Several processes (`torchrun`, `accelerate launch --multi_gpu`) on a machine without an accelerator."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return not has_accelerator


def _training_arguments(
    output_dir: str | os.PathLike, config: UptrainConfig, evaluate: bool
) -> TrainingArguments:
    """`TrainingArguments` for uptraining: no checkpoints, no reporting, loss-only evaluation (every
    `max_steps // 10` steps when `evaluate`); `config.training_args` win."""
    max_steps = config.max_steps
    values: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        learning_rate=config.resolved_learning_rate,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        logging_steps=max(1, min(10, max_steps // 10)),
        save_strategy="no",
        report_to="none",
        prediction_loss_only=True,
        lr_scheduler_type="cosine",
        warmup_steps=max(0, min(100, max_steps // 20)),
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    if evaluate:
        values.update(eval_strategy="steps", eval_steps=max(1, max_steps // 10))
    if config.max_seconds is not None:
        # With a time budget, max_steps is a cap rather than a plan: warm up over a few steps, not max_steps // 20.
        values["warmup_steps"] = min(10, max(0, max_steps // 20))
    if _distributed_cpu_launch():
        values["use_cpu"] = (
            True  # data parallel on CPU: gloo (accelerate otherwise starts a group it does not use)
        )
    values.update(config.training_args)
    return TrainingArguments(**values)


__all__ = [
    "LOSS_LOG",
    "LossLogCallback",
    "TIME_AWARE_SCHEDULES",
    "TimeLimitCallback",
    "UptrainTrainer",
    "build_trainer",
    "time_aware_lr_factor",
    "train_and_evaluate",
]
