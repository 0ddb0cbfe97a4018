"""Uptraining converted models: PEFT LoRA, K/V-only, attention-only or full training on the transformers `Trainer`.

The GQA paper converts a multi-head checkpoint and then "uptrains" it briefly to recover quality. `uptrain` does
that on any model `hf_gqa.patch` converted:

    model = hf_gqa.patch(model, groups=4)
    config = UptrainConfig(method="lora", max_steps=500)
    trained = hf_gqa.uptrain(model, tokenizer, texts, config, teacher=original_model)
    trained.save_pretrained("out/")   # a PEFT adapter; `merge_adapter=True` returns a plain patched model instead

    hf_gqa.uptrain(model, tokenizer, texts, method="lora", max_steps=500)   # the same settings as keywords

The package:
    `config`: `UptrainConfig`, every setting (method, steps, learning rate, LoRA, distillation weights, data,
        extra `TrainingArguments`), validated; `METHODS`, `DEFAULT_LEARNING_RATES`.
    `data`: reading text (`read_texts`, `DataLike`), packing it into token blocks (`pack_blocks`, `TokenBlocks`),
        held-out perplexity on those blocks (`evaluate_perplexity`, scored by `hf_gqa.perplexity.perplexity`).
    `parameters`: which parameters train for each method (`prepare_for_method`, `default_lora_targets`,
        `kv_parameter_masks`, `attention_parameter_names`).
    `losses`: the fused LM + KL distillation loss (`distillation_loss`, `token_kl`), `hidden_state_distance`.
    `trainer`: `UptrainTrainer` (distillation, time-aware schedules), `TimeLimitCallback`, `LossLogCallback`.
    `distributed`: FSDP on CPU processes, gathering the sharded weights after training, K/V masks of sharded
        gradients.

Several processes: run the same code under `accelerate launch` (examples/accelerate/fsdp.yaml for FSDP2, sharding
each converted decoder layer; ddp.yaml for data parallel). The global batch is processes x
`per_device_train_batch_size` x `gradient_accumulation_steps`; under FSDP the main process gets the trained model
back whole (see `uptrain`), and only it should save:

    trained = hf_gqa.uptrain(model, tokenizer, texts, config)
    if accelerate.PartialState().is_main_process:
        trained.save_pretrained("out/")
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, set_seed

from ..errors import GQAError
from ..patch import is_patched
from .config import DEFAULT_LEARNING_RATES, METHODS, UptrainConfig
from .data import DataLike, TokenBlocks, evaluate_perplexity, pack_blocks, read_texts, train_and_eval_blocks
from .distributed import empty_copy, fsdp_version, gather_full_model
from .losses import distillation_loss, hidden_state_distance, token_kl
from .parameters import (
    attention_parameter_names,
    attention_projection_names,
    base_model,
    default_lora_targets,
    kv_parameter_masks,
    prepare_for_method,
)
from .trainer import (
    LOSS_LOG,
    TIME_AWARE_SCHEDULES,
    LossLogCallback,
    TimeLimitCallback,
    UptrainTrainer,
    build_trainer,
    time_aware_lr_factor,
    train_and_evaluate,
)

logger = logging.getLogger("hf_gqa")

#: `TrainingArguments`' default seed, which `uptrain` also seeds the LoRA initialisation with.
_DEFAULT_SEED = 42


def uptrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_data: DataLike,
    config: UptrainConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    eval_data: DataLike | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    **kwargs: Any,
) -> nn.Module:
    """Uptrain a converted model on text with the transformers `Trainer`; returns the trained model (eval mode).

    Args:
        model: a model converted by `hf_gqa.patch` (any transformers causal LM of a supported family works).
        tokenizer: its tokenizer (its pad token is set to EOS when it has none).
        train_data: training text (`DataLike`: a file or folder path, a list of `pathlib.Path`, a
            `datasets.Dataset`, an iterable of strings) or packed `[num_blocks, block_size]` token ids.
        config: the settings (`UptrainConfig`). Without it they are built from `kwargs`
            (`UptrainConfig.from_kwargs`: a keyword naming a field sets it, any other is a `TrainingArguments`
            argument); passing both is an error. `merge=` is a deprecated name of `merge_adapter=`.
        teacher: optional model (typically the original, unconverted one) whose logits the student matches
            (`distill_weight`, `temperature`, `lm_weight`, `hidden_weight`). Put in eval mode and run without
            gradients, on the student's device. It must be a separate object: `patch` converts in place, so keep
            a copy (`copy.deepcopy(model)`) first.
        eval_data: held-out text (same forms as `train_data`), scored every `eval_steps` as `eval_loss` and
            `eval_perplexity`, and once more at the end.
        callbacks: extra `TrainerCallback`s.

    Returns:
        For `"lora"`, the `peft.PeftModel` (its `save_pretrained` saves the adapter), or with `merge_adapter` the
        merged plain model; for the other methods, `model` itself. The loss log is `output_dir/loss_log.jsonl`.
        Under FSDP (`accelerate launch` with an FSDP config, or `fsdp=` in the `TrainingArguments`) the weights
        are sharded across processes while training; afterwards every process takes part in gathering them
        (`FULL_STATE_DICT`) and the main process gets a plain, unsharded copy of the model (or `PeftModel`) on
        the CPU, while the other processes get the same model with its parameters on the meta device (nothing
        to save or evaluate there). Under DDP every process holds the trained model.
    """
    config = _resolve_config(config, kwargs)
    _check_models(model, teacher, config)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    train_blocks, eval_blocks = train_and_eval_blocks(
        tokenizer,
        train_data,
        eval_data,
        config.block_size,
        config.text_column,
        config.eval_fraction,
        config.max_eval_blocks,
    )
    # The same LoRA initialisation on every process (FSDP does not broadcast weights) and run to run.
    set_seed(config.training_args.get("seed", _DEFAULT_SEED))
    trained, hooks, fused = prepare_for_method(
        model, config.method, config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules
    )
    masks = (
        {name: mask for name, mask in kv_parameter_masks(trained).items() if name in fused} if fused else {}
    )
    try:
        with _output_folder(config.output_dir) as output_dir:
            trainer = build_trainer(
                trained, config, output_dir, train_blocks, eval_blocks, teacher, fused, callbacks, masks
            )
            skeleton = _before_sharding(trainer, trained, masks)
            train_and_evaluate(trainer)
            result = trainer.model if skeleton is None else gather_full_model(trainer.model, skeleton)
    finally:
        for hook in hooks:
            hook.remove()
    return _finished(result, config.merge_adapter)


def _before_sharding(trainer: UptrainTrainer, model: nn.Module, masks: dict) -> nn.Module | None:
    """Under FSDP, `empty_copy(model)` (to gather the trained weights into after training), else `None`."""
    version = fsdp_version(trainer.accelerator) if trainer.is_fsdp_enabled else None
    if version is None:
        return None
    if masks and version == 1:
        raise GQAError(
            f"method='kv' masks the query rows of fused projections ({sorted(masks)[:2]}...), which FSDP1's flat "
            "parameters do not allow: use fsdp_version: 2, DDP, or method='attention' / 'lora'."
        )
    return empty_copy(model)


def _resolve_config(config: UptrainConfig | None, kwargs: dict[str, Any]) -> UptrainConfig:
    """`config`, or the config of `uptrain`'s keywords (with the deprecated `merge=` read as `merge_adapter=`)."""
    if config is None:
        if "merge" in kwargs:
            warnings.warn(
                "uptrain(merge=...) is deprecated: use merge_adapter= (merge= reads like hf_gqa.patch's "
                "head merging).",
                DeprecationWarning,
                stacklevel=3,
            )
            if "merge_adapter" in kwargs:
                raise TypeError("uptrain() got both merge= and merge_adapter=; pass merge_adapter= only.")
            kwargs = {**kwargs, "merge_adapter": kwargs["merge"]}
            del kwargs["merge"]
        return UptrainConfig.from_kwargs(**kwargs)
    if not isinstance(config, UptrainConfig):
        raise TypeError(
            f"uptrain()'s fourth argument is an UptrainConfig, got {type(config).__name__}; pass settings such "
            "as method= and max_steps= as keywords."
        )
    if kwargs:
        raise TypeError(
            f"uptrain() got a config and the settings {sorted(kwargs)}: put them in the UptrainConfig "
            "(TrainingArguments in its training_args), or pass keywords without a config."
        )
    return config


def _check_models(model: nn.Module, teacher: nn.Module | None, config: UptrainConfig) -> None:
    if not is_patched(base_model(model)):
        logger.warning("uptrain: this model was not converted by hf_gqa.patch; training it as it is.")
    if teacher is None:
        return
    if teacher is base_model(model):
        raise ValueError(
            "teacher is the model being trained; pass a copy of the original taken before patching."
        )
    if config.lm_weight == 0 and config.distill_weight == 0 and config.hidden_weight <= 0:
        raise ValueError("lm_weight, distill_weight and hidden_weight are all 0: nothing to train on.")


@contextlib.contextmanager
def _output_folder(output_dir: str | os.PathLike | None) -> Iterator[str | os.PathLike]:
    """`output_dir`, or a temporary folder deleted on exit when it is `None`."""
    if output_dir is not None:
        yield output_dir
        return
    with tempfile.TemporaryDirectory(prefix="hf_gqa_uptrain_") as tmp:
        yield tmp


def _finished(trained: nn.Module, merge_adapter: bool) -> nn.Module:
    """The trained model in eval mode; with `merge_adapter`, its LoRA adapter folded in (`merge_and_unload`)."""
    trained.eval()
    if merge_adapter:
        trained = trained.merge_and_unload()
        trained.eval()
    return trained


__all__ = [
    "DEFAULT_LEARNING_RATES",
    "LOSS_LOG",
    "METHODS",
    "DataLike",
    "LossLogCallback",
    "TIME_AWARE_SCHEDULES",
    "TimeLimitCallback",
    "TokenBlocks",
    "UptrainConfig",
    "UptrainTrainer",
    "attention_parameter_names",
    "attention_projection_names",
    "default_lora_targets",
    "distillation_loss",
    "evaluate_perplexity",
    "hidden_state_distance",
    "kv_parameter_masks",
    "pack_blocks",
    "prepare_for_method",
    "read_texts",
    "time_aware_lr_factor",
    "token_kl",
    "uptrain",
]
