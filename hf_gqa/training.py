"""Uptraining converted models: PEFT LoRA, K/V-only or full training on the transformers `Trainer`.

The GQA paper converts a multi-head checkpoint and then "uptrains" it briefly to recover quality. `uptrain` does
that on any model `hf_gqa.patch` converted:

    model = hf_gqa.patch(model, groups=4)
    trained = hf_gqa.uptrain(model, tokenizer, texts, method="lora", max_steps=500, teacher=original_model)
    trained.save_pretrained("out/")   # a PEFT adapter; `merge=True` returns a plain patched model instead

Methods:
    `"lora"`: a PEFT LoRA adapter on the converted attention projections of the family (`default_lora_targets`);
        the result is a `peft.PeftModel`.
    `"kv"`: only the converted key/value projections train. Where a family fuses q, k and v in one weight
        (`c_attn`, `query_key_value`, `qkv_proj`), the whole fused weight has `requires_grad=True` but a gradient
        hook zeroes every entry that does not feed a key or value head, and those weights are kept out of weight
        decay, so the query rows stay bit-identical.
    `"attention"`: every parameter of the converted attention modules trains (q, k, v and output projections and
        their biases); embeddings, MLPs and norms stay frozen. Cheaper per step than `"full"` (no weight
        gradients or optimiser state outside attention) and it leaves the unconverted parts of the model as
        they were.
    `"full"`: every parameter trains.

Training is the stock `Trainer` (so `accelerate launch`, DDP, FSDP and DeepSpeed work through its arguments) with
one change: with `teacher=`, the loss is `lm_weight * LM + distill_weight * T^2 * KL(teacher || student)` on the
logits at temperature `T` (plus, with `hidden_weight`, a distance between every layer's output and the
teacher's), computed in one fused pass (`distillation_loss`). With `max_seconds`, training stops after that much
training time and the "linear" / "cosine" schedules decay over it. Text is tokenised, joined with EOS between
documents and packed into blocks of `block_size` tokens; held-out perplexity (`evaluate_perplexity`) uses the
same packing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from .architectures import AttentionAdapter, get_adapter
from .errors import GQAError
from .patch import is_patched

logger = logging.getLogger("hf_gqa")

METHODS = ("lora", "kv", "attention", "full")

#: Learning rates used when `uptrain` is given none.
DEFAULT_LEARNING_RATES: dict[str, float] = {"lora": 5e-4, "kv": 2e-4, "attention": 5e-5, "full": 5e-5}

#: The attention projections of each family (adapter `family`, or `config.model_type`) that conversion changes or
#: that read the converted heads: the default LoRA targets, resolved inside each attention module only (GPT-2's MLP
#: also has a `c_proj`).
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
    "phi3": ("qkv_proj", "o_proj"),
    "gpt2": ("c_attn", "c_proj"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "gpt_neox": ("query_key_value", "dense"),
    "falcon": ("query_key_value", "dense"),
    "bloom": ("query_key_value", "dense"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj"),
}

LOSS_LOG = "loss_log.jsonl"

DataLike = Any
"""Text for training or evaluation: a path (`str` or `os.PathLike`) to a text file or a folder of `*.txt` files, a
list of `pathlib.Path`, a `datasets.Dataset` / `IterableDataset` with a text column, or any iterable of strings
(each string one document)."""


# -- which parameters train ------------------------------------------------------------------------------------
def _base_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a `PeftModel` (or `model` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _read_dependence(
    adapter: AttentionAdapter, module: nn.Module, fields: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Which entries of `module`'s parameters the canonical `fields` (e.g. `k`, `v`) are read from.

    Differentiates the sum of the adapter's canonical tensors `fields` with respect to the module's parameters:
    an entry has a nonzero gradient exactly when a canonical entry is read from it (adapters read by reshaping
    and slicing). Returns `{parameter name relative to module: bool mask of the parameter's shape}` for every
    parameter with at least one such entry.
    """
    params = dict(module.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            weights = adapter.read(module)
            parts = [getattr(weights, f) for f in fields]
            total = sum(t.float().sum() for t in parts if t is not None)
            if not isinstance(total, torch.Tensor) or total.grad_fn is None:
                raise GQAError(
                    f"The {adapter.family} adapter's read() is not differentiable with respect to the module's "
                    "parameters, so hf_gqa cannot tell which parameters hold the key/value projections. Pass "
                    "target_modules= for LoRA, or use method='full'."
                )
            grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
    return {name: g != 0 for name, g in zip(params, grads) if g is not None and bool((g != 0).any())}


def kv_parameter_masks(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """The key/value projection parameters of every converted attention module.

    Returns `{qualified parameter name: mask}`, where `mask` is `None` when the whole parameter is a key/value
    projection (`k_proj.weight`), or a bool tensor of the parameter's shape marking the key/value rows of a fused
    projection (`c_attn.weight` `[hidden, H*d + 2*K*d]`: the last `2*K*d` columns).
    """
    base = _base_model(model)
    adapter = get_adapter(base)
    masks: dict[str, torch.Tensor | None] = {}
    for name, module in adapter.attention_modules(base):
        for pname, mask in _read_dependence(adapter, module, ("k", "v", "k_bias", "v_bias")).items():
            masks[f"{name}.{pname}"] = None if bool(mask.all()) else mask
    return masks


def attention_projection_names(model: nn.Module) -> list[str]:
    """Short names of the submodules of an attention module that hold its q, k, v or output projections, found
    from the adapter's `read()` (e.g. `["k_proj", "o_proj", "q_proj", "v_proj"]`)."""
    base = _base_model(model)
    adapter = get_adapter(base)
    modules = adapter.attention_modules(base)
    if not modules:
        return []
    fields = ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias")
    names = {pname.rpartition(".")[0] for pname in _read_dependence(adapter, modules[0][1], fields)}
    if "" in names:
        raise GQAError(
            f"{adapter.family} attention holds projection weights directly on the attention module; LoRA needs "
            "them in submodules. Pass target_modules= explicitly."
        )
    return sorted(names)


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def default_lora_targets(model: nn.Module) -> list[str]:
    """Qualified names of the attention projections that `uptrain(method="lora")` adapts by default.

    The short names come from `DEFAULT_LORA_TARGETS` for the model's family (or, for a family not in that table,
    from the adapter's `read()`); they are resolved inside each converted attention module, so that an MLP
    projection of the same short name is not adapted. Raises `GQAError` when none can be found.
    """
    base = _base_model(model)
    adapter = get_adapter(base)
    short = DEFAULT_LORA_TARGETS.get(adapter.family) or DEFAULT_LORA_TARGETS.get(base.config.model_type)
    if short is None:
        short = tuple(attention_projection_names(base))
    targets = []
    for name, module in adapter.attention_modules(base):
        targets.extend(f"{name}.{s}" for s in short if _has_submodule(module, s))
    if not targets:
        raise GQAError(
            f"No default LoRA targets for family {adapter.family!r}; pass target_modules= (names of the attention "
            "projections, e.g. ['q_proj', 'v_proj'])."
        )
    return targets


def _add_lora(
    model: PreTrainedModel,
    lora_r: int,
    lora_alpha: float | None,
    lora_dropout: float,
    target_modules: Sequence[str] | str | None,
) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    if target_modules is None:
        target_modules = default_lora_targets(model)
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_r,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _freeze_for_kv(model: nn.Module) -> tuple[list[torch.utils.hooks.RemovableHandle], list[str]]:
    """Freeze everything but the K/V projections; mask fused projections' gradients to their K/V entries.

    Returns the gradient hooks (to remove after training) and the names of the masked (fused) parameters.
    """
    masks = kv_parameter_masks(model)
    if not masks:
        raise GQAError("Found no key/value projection parameters to train.")
    hooks, fused = [], []
    for name, param in model.named_parameters():
        if name not in masks:
            param.requires_grad_(False)
            continue
        param.requires_grad_(True)
        mask = masks[name]
        if mask is not None:
            keep = mask.to(param.device)
            hooks.append(param.register_hook(lambda grad, keep=keep: grad * keep.to(grad.dtype)))
            fused.append(name)
    return hooks, fused


def attention_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of every parameter inside the converted attention modules (what `method="attention"`
    trains)."""
    base = _base_model(model)
    adapter = get_adapter(base)
    return [
        f"{name}.{pname}"
        for name, module in adapter.attention_modules(base)
        for pname, _ in module.named_parameters()
    ]


def _freeze_outside_attention(model: nn.Module) -> None:
    """Freeze every parameter that is not inside a converted attention module."""
    names = set(attention_parameter_names(model))
    if not names:
        raise GQAError("Found no attention parameters to train.")
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


def prepare_for_method(
    model: nn.Module,
    method: str,
    lora_r: int = 16,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
) -> tuple[nn.Module, list[torch.utils.hooks.RemovableHandle], list[str]]:
    """Set which parameters train for `method`; returns `(model to train, gradient hooks, masked names)`.

    `"lora"` wraps `model` in a `PeftModel` (a `PeftModel` given is used as is); `"kv"` freezes all but the K/V
    projections (see `kv_parameter_masks`); `"attention"` freezes all but the converted attention modules;
    `"full"` makes every parameter trainable.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if method == "lora":
        if hasattr(model, "peft_config"):
            return model, [], []
        return _add_lora(model, lora_r, lora_alpha, lora_dropout, target_modules), [], []
    if hasattr(model, "peft_config"):
        raise ValueError(
            f"method={method!r} trains the model itself; pass the model before wrapping it with PEFT."
        )
    if method == "kv":
        hooks, fused = _freeze_for_kv(model)
        return model, hooks, fused
    if method == "attention":
        _freeze_outside_attention(model)
        return model, [], []
    for param in model.parameters():
        param.requires_grad_(True)
    return model, [], []


# -- data ------------------------------------------------------------------------------------------------------
def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"No *.txt files in {path}.")
        return files
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist (text data is a file, a folder of *.txt, or strings)."
        )
    return [path]


def read_texts(data: DataLike, text_column: str = "text") -> list[str]:
    """The documents in `data` (see `DataLike`): one string per file, dataset row or item."""
    if isinstance(data, (str, os.PathLike)):
        return [p.read_text(encoding="utf-8") for p in _text_files(Path(data))]
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        if data.column_names is not None and text_column not in data.column_names:
            raise ValueError(f"The dataset has no {text_column!r} column (columns: {data.column_names}).")
        return [row[text_column] for row in data]
    texts = []
    for item in data:
        if isinstance(item, Path):
            texts.extend(p.read_text(encoding="utf-8") for p in _text_files(item))
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise TypeError(
                f"Text data must hold strings or pathlib.Path objects, got {type(item).__name__}."
            )
    return texts


def pack_blocks(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], block_size: int) -> torch.Tensor:
    """Tokenise `texts`, join them with the EOS token between documents, cut into blocks.

    Returns `[num_blocks, block_size]` token ids (int64); the tail shorter than a block is dropped.
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        if not text:
            continue
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"The text holds {len(ids)} tokens, fewer than one block of {block_size}.")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).reshape(n, block_size)


class TokenBlocks(torch.utils.data.Dataset):
    """Packed blocks for causal LM training: item `i` is `{"input_ids": [block], "labels": [block]}`."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i].clone()}


def _as_blocks(
    data: DataLike | torch.Tensor, tokenizer: PreTrainedTokenizerBase, block_size: int, text_column: str
) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    return pack_blocks(tokenizer, read_texts(data, text_column), block_size)


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: DataLike | torch.Tensor,
    block_size: int = 512,
    batch_size: int = 4,
    max_blocks: int | None = None,
    text_column: str = "text",
) -> float:
    """Perplexity of `model` on `texts`: exp of the mean next-token loss over non-overlapping packed blocks.

    Args:
        texts: text in any `DataLike` form, or already packed `[num_blocks, block_size]` ids.
        block_size: tokens per block (each block is scored independently, from its first token).
        max_blocks: score only the first `max_blocks` blocks.

    Returns:
        `exp(sum of token losses / number of predicted tokens)`, `block_size - 1` predictions per block.
    """
    blocks = _as_blocks(texts, tokenizer, block_size, text_column)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start : start + batch_size].to(device)
            logits = model(input_ids=ids).logits.float()
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)


# -- distillation ----------------------------------------------------------------------------------------------
class _ChunkedDistillLoss(torch.autograd.Function):
    """`kl_weight * T^2 * KL(softmax(t/T) || softmax(s/T)) + lm_weight * CE(s, target)` summed over selected rows,
    computed `chunk` rows at a time in one pass.

    The naive expression keeps several `[tokens, vocab]` fp32 temporaries alive (masked copies, two
    log-softmaxes, the KL terms and their gradients) and the backward pass recomputes both softmaxes. Here the
    forward pass holds one chunk of temporaries at a time and writes the gradient
    `kl_weight * T * (softmax(s/T) - softmax(t/T)) + lm_weight * (softmax(s) - onehot(target))` straight into one
    logits-sized buffer, which the backward pass only scales. Also returns the unweighted KL and next-token loss
    sums (not differentiable; for logging).
    """

    @staticmethod
    def forward(ctx, student, teacher, rows, targets, temperature, kl_weight, lm_weight, chunk):
        # student, teacher: [N, vocab]; rows: [n] indices of scored rows; targets: [n] next-token ids
        dtype = torch.promote_types(student.dtype, torch.float32)  # half precision is widened per chunk
        kl = torch.zeros((), dtype=dtype, device=student.device)
        lm = torch.zeros((), dtype=dtype, device=student.device)
        grad = torch.zeros_like(student)  # [N, vocab]; rows that are not scored keep a zero gradient
        for i in range(0, rows.numel(), chunk):
            idx, tgt = rows[i : i + chunk], targets[i : i + chunk, None]
            s = student.index_select(0, idx).to(dtype)
            t = teacher.index_select(0, idx).to(dtype)
            log_s = F.log_softmax(s if temperature == 1.0 else s / temperature, dim=-1)
            log_t = F.log_softmax(t if temperature == 1.0 else t / temperature, dim=-1)
            p_t = log_t.exp()
            kl += (p_t * (log_t - log_s)).sum()
            log_p = log_s if temperature == 1.0 else F.log_softmax(s, dim=-1)
            lm -= log_p.gather(-1, tgt).sum()
            p_s = log_s.exp_()  # reuses log_s's storage (log_p, read above, may be the same tensor)
            if lm_weight:
                lm_grad = (p_s if temperature == 1.0 else log_p.exp()) * lm_weight
                lm_grad.scatter_add_(-1, tgt, lm_grad.new_full(tgt.shape, -lm_weight))
            g = p_s.sub_(p_t).mul_(kl_weight * temperature)
            if lm_weight:
                g.add_(lm_grad)
            grad.index_copy_(0, idx, g.to(grad.dtype))
        ctx.save_for_backward(grad)
        kl = kl * temperature**2
        loss = kl * kl_weight + lm * lm_weight
        ctx.mark_non_differentiable(kl, lm)
        return loss, kl, lm

    @staticmethod
    def backward(ctx, grad_loss, grad_kl, grad_lm):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None, None, None


def _scored_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rows, targets)`: flat indices of the positions `t` with `labels[:, t + 1] != -100`, and those labels."""
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100
    rows = valid.reshape(-1).nonzero().squeeze(-1)
    targets = torch.zeros_like(labels)
    targets[:, :-1] = labels[:, 1:].clamp_min(0)
    return rows, targets.reshape(-1)[rows]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    lm_weight: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """`kl_weight * T^2 * KL(teacher || student) + lm_weight * next-token loss`, summed over the predicted positions.

    One pass over the logits, `chunk_size` positions at a time: memory is a few `[chunk_size, vocab]` fp32
    buffers plus one logits-sized gradient buffer, and the backward pass recomputes nothing. The default chunk is
    16 positions on CPU (the temporaries stay in cache: 3x faster than 256 for a 49k vocabulary) and 1024
    elsewhere.

    Args:
        student_logits, teacher_logits: `[batch, seq, vocab]`.
        labels: `[batch, seq]`; position `t` is scored when `labels[:, t + 1] != -100` (as for the LM loss).
        temperature: softmax temperature `T` of the KL term (the next-token loss is always at `T = 1`).
        kl_weight, lm_weight: weights of the two sums in the returned loss (fold any normalisation in here).

    Returns:
        `(loss, kl_sum, lm_sum, count)`: the weighted loss (differentiable in the student), the `T^2`-scaled KL
        and the next-token loss summed over the scored positions (detached, for logging), and their number.
    """
    vocab = student_logits.shape[-1]
    if chunk_size is None:
        chunk_size = 16 if student_logits.device.type == "cpu" else 1024
    rows, targets = _scored_rows(labels)
    loss, kl, lm = _ChunkedDistillLoss.apply(
        student_logits.reshape(-1, vocab),
        teacher_logits.detach().reshape(-1, vocab),
        rows,
        targets,
        temperature,
        kl_weight,
        lm_weight,
        chunk_size,
    )
    return loss, kl, lm, int(rows.numel())


def token_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-token `T^2 * KL(teacher || student)` at temperature `T`, summed over the predicted positions.

    `distillation_loss` with `lm_weight=0`. Returns `(kl_sum, lm_sum, count)`: the KL (differentiable in the
    student), the student's next-token loss summed over the same positions (detached) and their number.
    """
    kl, _, lm, count = distillation_loss(
        student_logits, teacher_logits, labels, temperature, 1.0, 0.0, chunk_size
    )
    return kl, lm, count


def hidden_state_distance(
    student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """Relative squared distance of the student's residual stream to the teacher's, summed over scored positions.

    For each layer output `l` (the tuples' entries after the embeddings) and position `t`:
    `||h_s[l, t] - h_t[l, t]||^2 / ||h_t[l, t]||^2`, averaged over layers. Dividing by the teacher's norm per
    position keeps the few positions with very large activations (attention sinks) from dominating.

    Args:
        student_hidden, teacher_hidden: `num_layers + 1` tensors `[batch, seq, hidden]` (`output_hidden_states`).
        labels: `[batch, seq]`; the positions scored are those of the next-token loss.
    """
    rows, _ = _scored_rows(labels)
    total = student_hidden[1].new_zeros(())
    layers = list(zip(student_hidden[1:], teacher_hidden[1:], strict=True))
    for h_s, h_t in layers:
        h_s = h_s.reshape(-1, h_s.shape[-1]).index_select(0, rows).float()
        h_t = h_t.detach().reshape(-1, h_t.shape[-1]).index_select(0, rows).float()
        total = total + ((h_s - h_t).pow(2).sum(-1) / h_t.pow(2).sum(-1).clamp_min(1e-6)).sum()
    return total / len(layers)


class UptrainTrainer(Trainer):
    """A `Trainer` that distils from `teacher` when one is given.

    With a teacher, the training loss is `lm_weight * LM + distill_weight * T^2 * KL(teacher || student)` on the
    logits (one fused pass, `distillation_loss`), plus `hidden_weight * hidden_state_distance` on every layer's
    output when `hidden_weight > 0`. Every term is normalised like the LM loss (per token over the accumulated,
    device-averaged batch when the Trainer passes `num_items_in_batch`), so gradient accumulation and data
    parallelism scale them alike. Evaluation losses are the LM loss alone. Parameters named in `no_decay` are
    kept out of weight decay. Logs add `lm_loss`, `distill_kl` and, with `hidden_weight`, `hidden_distance`
    (token means since the last log), `eval_perplexity` and `train_tokens`.
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
        **kwargs: Any,
    ) -> None:
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
        rows, _ = _scored_rows(labels)
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


# -- the entry point -------------------------------------------------------------------------------------------
def uptrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_data: DataLike,
    method: str = "lora",
    max_steps: int = 100,
    teacher: nn.Module | None = None,
    distill_weight: float = 1.0,
    temperature: float = 1.0,
    lm_weight: float = 1.0,
    hidden_weight: float = 0.0,
    lora_r: int = 16,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
    eval_data: DataLike | None = None,
    eval_fraction: float = 0.0,
    max_eval_blocks: int | None = None,
    block_size: int = 512,
    learning_rate: float | None = None,
    output_dir: str | os.PathLike | None = None,
    merge: bool = False,
    text_column: str = "text",
    max_seconds: float | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    **training_args: Any,
) -> nn.Module:
    """Uptrain a converted model on text with the transformers `Trainer`; returns the trained model.

    Args:
        model: a model converted by `hf_gqa.patch` (any transformers causal LM of a supported family works).
        tokenizer: its tokenizer.
        train_data: training text: a file or folder path, a list of `pathlib.Path`, a `datasets.Dataset` with a
            `text_column`, or an iterable of strings. Packed into `[block_size]` blocks with EOS between documents.
        method: `"lora"`, `"kv"`, `"attention"` or `"full"` (see the module docstring).
        max_steps: optimiser steps.
        teacher: optional model (typically the original, unconverted one) whose logits the student matches with a
            KL term beside the LM loss. Put in eval mode and run without gradients, on the student's device. It
            must be a separate object: `patch` converts in place, so keep a copy (`copy.deepcopy(model)`) first.
        distill_weight: weight of the KL term: `loss = lm_weight * lm_loss + distill_weight * T^2 * KL(teacher ||
            student)`.
        temperature: softmax temperature `T` of the KL term.
        lm_weight: weight of the next-token loss when a teacher is given (`0`: distil only). Without a teacher the
            loss is the next-token loss.
        hidden_weight: with a teacher, also match every layer's output to the teacher's:
            `+ hidden_weight * hidden_state_distance` (relative squared distance, averaged over layers, per token).
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale (default `2 * lora_r`) and dropout.
        target_modules: LoRA targets; default `default_lora_targets(model)` (the family's attention projections).
        eval_data: held-out text (same forms as `train_data`), scored every `eval_steps` as `eval_loss` and
            `eval_perplexity`.
        eval_fraction: without `eval_data`, hold out this fraction of the training blocks (the last ones).
        max_eval_blocks: evaluate on at most this many blocks.
        block_size: tokens per training block.
        learning_rate: default `DEFAULT_LEARNING_RATES[method]`.
        output_dir: where the Trainer writes and the loss log (`loss_log.jsonl`, one JSON object per log, ending
            with an evaluation of the final model when there is an evaluation set) goes; a temporary folder
            (deleted afterwards) by default. The trained model is not saved there: call `save_pretrained` on the
            result.
        merge: for LoRA, return `merge_and_unload()`: a plain converted model with the adapter folded in.
        text_column: the text column of a `datasets.Dataset`.
        max_seconds: stop after this much training time (evaluation excluded; at a step boundary, on every
            process together). The "linear" and "cosine" learning-rate schedules (cosine is the default) then decay
            to 0 at whichever comes first, `max_steps` or `max_seconds`, so a time-limited run still ends at a low
            learning rate; warmup is then `min(10, max_steps // 20)` steps unless `warmup_steps` is given.
        callbacks: extra `TrainerCallback`s.
        training_args: any other `TrainingArguments` (`per_device_train_batch_size` (default 4),
            `gradient_accumulation_steps`, `weight_decay`, `lr_scheduler_type`, `warmup_steps`, `eval_steps`,
            `logging_steps`, `bf16`, `seed`, `fsdp`, `deepspeed`, ...). Launched as several processes on a
            machine without an accelerator (`torchrun`, `accelerate launch --multi_gpu`), `use_cpu` defaults to
            True so that data parallelism runs on gloo.

    Returns:
        For `"lora"`, the `peft.PeftModel` (its `save_pretrained` saves the adapter), or with `merge=True` the
        merged plain model; for `"kv"` and `"full"`, `model` itself. In eval mode.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if merge and method != "lora":
        raise ValueError("merge=True applies to method='lora' only.")
    if not is_patched(_base_model(model)):
        logger.warning("uptrain: this model was not converted by hf_gqa.patch; training it as it is.")
    if teacher is not None and teacher is _base_model(model):
        raise ValueError(
            "teacher is the model being trained; pass a copy of the original taken before patching."
        )
    if teacher is not None and lm_weight == 0 and distill_weight == 0 and hidden_weight <= 0:
        raise ValueError("lm_weight, distill_weight and hidden_weight are all 0: nothing to train on.")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token

    train_blocks = _as_blocks(train_data, tokenizer, block_size, text_column)
    eval_blocks = None
    if eval_data is not None:
        eval_blocks = _as_blocks(eval_data, tokenizer, block_size, text_column)
    elif eval_fraction > 0:
        n_eval = max(1, int(round(train_blocks.shape[0] * eval_fraction)))
        if n_eval >= train_blocks.shape[0]:
            raise ValueError(f"eval_fraction={eval_fraction} leaves no training blocks.")
        train_blocks, eval_blocks = train_blocks[:-n_eval], train_blocks[-n_eval:]
    if eval_blocks is not None and max_eval_blocks is not None:
        eval_blocks = eval_blocks[:max_eval_blocks]

    if max_seconds is not None:
        # With a time budget, max_steps is a cap rather than a plan: warm up over a few steps, not max_steps // 20.
        training_args.setdefault("warmup_steps", min(10, max(0, max_steps // 20)))
    trained, hooks, fused = prepare_for_method(
        model, method, lora_r, lora_alpha, lora_dropout, target_modules
    )
    tmp = None
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hf_gqa_uptrain_")
        output_dir = tmp.name
    try:
        args = _training_arguments(
            output_dir, max_steps, learning_rate or DEFAULT_LEARNING_RATES[method], eval_blocks, training_args
        )
        time_limit = TimeLimitCallback(max_seconds) if max_seconds is not None else None
        all_callbacks = [LossLogCallback(Path(output_dir) / LOSS_LOG), *callbacks]
        if time_limit is not None:
            all_callbacks.insert(0, time_limit)  # first: the others' on_step_end work is not training time
        trainer = UptrainTrainer(
            model=trained,
            args=args,
            train_dataset=TokenBlocks(train_blocks),
            eval_dataset=TokenBlocks(eval_blocks) if eval_blocks is not None else None,
            callbacks=all_callbacks,
            teacher=teacher,
            distill_weight=distill_weight,
            temperature=temperature,
            lm_weight=lm_weight,
            hidden_weight=hidden_weight,
            no_decay=fused,
            block_size=block_size,
            time_limit=time_limit,
        )
        trainer.train()
        if eval_blocks is not None and not _evaluated_at(
            trainer.state.log_history, trainer.state.global_step
        ):
            trainer.evaluate()
    finally:
        for hook in hooks:
            hook.remove()
        if tmp is not None:
            tmp.cleanup()
    trained = trainer.model
    trained.eval()
    if merge:
        trained = trained.merge_and_unload()
        trained.eval()
    return trained


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
    output_dir: str | os.PathLike,
    max_steps: int,
    learning_rate: float,
    eval_blocks: torch.Tensor | None,
    overrides: dict[str, Any],
) -> TrainingArguments:
    """`TrainingArguments` for uptraining: no checkpoints, no reporting, loss-only evaluation; `overrides` win."""
    values: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        learning_rate=learning_rate,
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
    if eval_blocks is not None:
        values.update(eval_strategy="steps", eval_steps=max(1, max_steps // 10))
    if _distributed_cpu_launch():
        values["use_cpu"] = (
            True  # data parallel on CPU: gloo (accelerate otherwise starts a group it does not use)
        )
    values.update(overrides)
    return TrainingArguments(**values)


__all__ = [
    "DEFAULT_LEARNING_RATES",
    "DEFAULT_LORA_TARGETS",
    "LOSS_LOG",
    "LossLogCallback",
    "TIME_AWARE_SCHEDULES",
    "TimeLimitCallback",
    "TokenBlocks",
    "UptrainTrainer",
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
