"""Uptraining: LoRA targets, which parameters train per method, PEFT round trips, distillation, data, CLI.

Every test that concerns a family runs on every case of `tests.cases` (tiny random models), so families added
later are covered without editing this file.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

import hf_gqa
from hf_gqa.training import (
    LOSS_LOG,
    TimeLimitCallback,
    UptrainTrainer,
    attention_projection_names,
    default_lora_targets,
    distillation_loss,
    evaluate_perplexity,
    hidden_state_distance,
    kv_parameter_masks,
    pack_blocks,
    prepare_for_method,
    read_texts,
    time_aware_lr_factor,
    token_kl,
    uptrain,
)
from tests.cases import all_cases

CASES = all_cases()
IDS = [c.name for c in CASES]
REPO = Path(__file__).resolve().parents[1]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level tokenizer with exactly 256 tokens (one per byte), matching the tiny models' vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0], pad_token=alphabet[0])


def patched(case, groups: int | None = None):
    model = case.make()
    hf_gqa.patch(model, groups=case.groups[-1] if groups is None else groups)
    return model


def batch(seed: int = 0, size: tuple[int, int] = (2, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, size, generator=g)


def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    """Give every LoRA matrix random values (B starts at zero, which would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def zero_dropout(model: nn.Module) -> nn.Module:
    """Turn off every dropout (modules, and the float rates families keep on modules and configs)."""
    names = (
        "dropout",
        "attention_dropout",
        "activation_dropout",
        "hidden_dropout",
        "layerdrop",
        "attn_pdrop",
    )
    names += ("resid_pdrop", "embd_pdrop", "attn_dropout", "resid_dropout", "embed_dropout")
    for m in [*model.modules(), model.config]:
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in names:
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model


# -- LoRA targets ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lora_targets_exist_after_patching(case):
    model = patched(case)
    adapter = hf_gqa.get_adapter(model)
    short = adapter.lora_targets
    # The table agrees with what the adapter reads q, k, v and o from.
    assert sorted(short) == attention_projection_names(model)
    targets = default_lora_targets(model)
    attention = adapter.attention_modules(model)
    assert len(targets) == len(short) * len(attention)
    for name in targets:
        module = model.get_submodule(name)
        assert hasattr(module, "weight") and module.weight.ndim == 2, name
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    wrapped = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
    }
    assert wrapped == set(targets)


# -- which parameters receive gradients ------------------------------------------------------------------------
def _backward(model: nn.Module) -> None:
    ids = batch(1)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lora_gradients_only_on_adapters(case):
    model, _, _ = prepare_for_method(patched(case), "lora", lora_r=4)
    _backward(model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None, name
            if "lora_B" in name:  # A's gradient is zero while B is zero (PEFT's init)
                assert p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kv_gradients_only_on_kv_entries(case):
    model = patched(case)
    masks = kv_parameter_masks(model)
    trained, hooks, fused = prepare_for_method(model, "kv")
    assert trained is model
    _backward(model)
    for name, p in model.named_parameters():
        if name not in masks:
            assert not p.requires_grad and p.grad is None, name
            continue
        assert p.grad is not None, name
        mask = masks[name]
        if mask is None:
            mask = torch.ones_like(p, dtype=torch.bool)
        else:
            assert name in fused
        assert torch.count_nonzero(p.grad[~mask]) == 0, f"{name}: gradient outside the K/V entries"
        if p.ndim == 2:
            assert p.grad[mask].abs().sum() > 0, name
    # Independently of layout: exactly 2 * K * d * D weights (+ 2 * K * d biases) train per attention module.
    adapter = hf_gqa.get_adapter(model)
    hidden = model.config.get_text_config(decoder=True).hidden_size
    for name, module in adapter.attention_modules(model):
        k_heads, d = adapter.num_kv_heads(module), adapter.head_dim(module)
        has_bias = adapter.read(module).k_bias is not None
        expected = 2 * k_heads * d * hidden + (2 * k_heads * d if has_bias else 0)
        own = {n: m for n, m in masks.items() if n.startswith(name + ".")}
        count = sum(int(m.sum()) if m is not None else model.get_parameter(n).numel() for n, m in own.items())
        assert count == expected, name
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_full_gradients_everywhere(case):
    model, _, _ = prepare_for_method(patched(case), "full")
    _backward(model)
    for name, p in model.named_parameters():
        assert p.requires_grad and p.grad is not None, name
        if p.ndim == 2:
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_attention_gradients_only_inside_attention_modules(case):
    model, hooks, fused = prepare_for_method(patched(case), "attention")
    assert hooks == [] and fused == []
    adapter = hf_gqa.get_adapter(model)
    prefixes = tuple(f"{name}." for name, _ in adapter.attention_modules(model))
    assert prefixes
    _backward(model)
    trained = 0
    for name, p in model.named_parameters():
        inside = name.startswith(prefixes)
        assert p.requires_grad == inside, name
        if inside:
            trained += 1
            assert p.grad is not None and (p.ndim != 2 or p.grad.abs().sum() > 0), name
        else:
            assert p.grad is None, name
    assert trained >= 2 * len(prefixes)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kv_trainer_steps_change_only_kv_entries(case, tmp_path):
    """Two real Trainer steps with weight decay: every entry outside the K/V projections stays bit-identical."""
    model = patched(case)
    masks = kv_parameter_masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    blocks = batch(2, (8, 16))
    uptrain(
        model,
        byte_tokenizer(),
        blocks,
        method="kv",
        max_steps=2,
        block_size=16,
        learning_rate=1e-2,
        weight_decay=0.1,
        per_device_train_batch_size=4,
        output_dir=tmp_path,
        disable_tqdm=True,
    )
    changed = 0
    for name, p in model.named_parameters():
        mask = masks.get(name, False)
        if mask is False:
            assert torch.equal(p, before[name]), name
        elif mask is not None:
            assert torch.equal(p[~mask], before[name][~mask]), f"{name}: non-K/V entries moved"
            changed += int(not torch.equal(p[mask], before[name][mask]))
        else:
            changed += int(not torch.equal(p, before[name]))
    assert changed > 0
    assert all(not p._backward_hooks for p in model.parameters()), "uptrain left gradient hooks behind"


# -- PEFT round trips ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lora_merge_agrees_and_merged_model_saves(case, tmp_path):
    model, _, _ = prepare_for_method(patched(case), "lora", lora_r=4)
    randomize_lora(model)
    model.eval()
    ids = batch(3)
    unmerged = logits(model, ids)
    merged = model.merge_and_unload()
    assert not hasattr(merged, "peft_config") or not merged.peft_config
    torch.testing.assert_close(logits(merged, ids), unmerged, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = hf_gqa.from_pretrained(tmp_path)
    assert torch.equal(logits(reloaded, ids), logits(merged, ids))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapter_reloads_onto_freshly_patched_model(case, tmp_path):
    from peft import PeftModel

    model, _, _ = prepare_for_method(patched(case), "lora", lora_r=4)
    randomize_lora(model)
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and not (tmp_path / "model.safetensors").exists()
    fresh = PeftModel.from_pretrained(patched(case), tmp_path).eval()
    ids = batch(4)
    assert torch.equal(logits(fresh, ids), logits(model, ids))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_users_own_peft_code_trains(case):
    """`get_peft_model(patched, LoraConfig(target_modules=[usual names], task_type="CAUSAL_LM"))` trains a step."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model = patched(case)
    usual = list(hf_gqa.get_adapter(model).lora_targets)
    if model.config.model_type in PEFT_DEFAULTS:
        usual = PEFT_DEFAULTS[model.config.model_type]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=usual, task_type="CAUSAL_LM"))
    lora_b = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert lora_b
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch(5)
    peft_model.train()
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, lora_b[n]) for n, p in peft_model.named_parameters() if n in lora_b)
    out = peft_model.eval().generate(input_ids=ids[:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 7)


# -- distillation ----------------------------------------------------------------------------------------------
def _distill_terms(
    student: nn.Module, teacher: nn.Module, tmp_path: Path
) -> tuple[float, float, torch.Tensor]:
    """`(KL per token, LM loss per token, total loss)` of one training forward through `UptrainTrainer`."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = UptrainTrainer(model=student, args=args, teacher=teacher, distill_weight=0.5)
    ids = batch(6)
    student.train()
    loss = trainer.compute_loss(student, {"input_ids": ids, "labels": ids})
    return trainer._kl_sum / trainer._count, trainer._lm_sum / trainer._count, loss


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_teacher_kl_zero_for_itself_positive_for_original(case, tmp_path):
    student = zero_dropout(patched(case))
    kl, lm, loss = _distill_terms(student, copy.deepcopy(student), tmp_path)
    assert kl == 0.0
    torch.testing.assert_close(loss.item(), lm, rtol=1e-5, atol=1e-5)

    original = zero_dropout(case.make())
    kl, lm, loss = _distill_terms(student, original, tmp_path)
    if (
        case.groups[-1] == case.kv_heads
    ):  # nothing to merge (an MQA model kept at 1 KV head): the same function
        assert abs(kl) < 1e-6
    else:
        assert kl > 1e-6
    assert original.training is False
    assert loss.requires_grad
    # Total = LM loss + distill_weight * KL (same normalisation for both terms here: one batch, one process).
    ids = batch(6)
    lm_model = student(input_ids=ids, labels=ids).loss.item()
    torch.testing.assert_close(loss.item(), lm_model + 0.5 * kl, rtol=1e-4, atol=1e-4)


def _direct_terms(student, teacher, labels, temperature):
    """`(T^2 * KL summed, next-token loss summed, count)` by the textbook expressions on the scored positions."""
    valid = labels[:, 1:] != -100
    s, t = student[:, :-1][valid], teacher[:, :-1][valid]
    log_s = torch.log_softmax(s / temperature, -1)
    log_t = torch.log_softmax(t / temperature, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum() * temperature**2
    lm = -torch.log_softmax(s, -1).gather(-1, labels[:, 1:][valid][:, None]).sum()
    return kl, lm, int(valid.sum())


def _logits_and_labels(seed: int = 0):
    torch.manual_seed(seed)
    student = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, 3] = labels[2, 1:4] = -100
    return student, teacher, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_token_kl_equals_the_direct_formula_in_value_and_gradient(temperature):
    """The chunked KL (chunks smaller than the scored rows, masked labels) equals the textbook expression."""
    student, teacher, labels = _logits_and_labels()
    kl, lm, count = token_kl(student, teacher, labels, temperature, chunk_size=4)
    kl.backward()
    chunked_grad = student.grad.clone()

    student.grad = None
    ref, ref_lm, ref_count = _direct_terms(student, teacher, labels, temperature)
    ref.backward()
    assert count == ref_count == 3 * 6 - 4
    torch.testing.assert_close(kl, ref)
    torch.testing.assert_close(lm, ref_lm.detach())
    torch.testing.assert_close(chunked_grad, student.grad)
    assert chunked_grad[:, -1].abs().sum() == 0 and chunked_grad[0, 2].abs().sum() == 0  # unscored rows


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kl_weight,lm_weight", [(1.0, 1.0), (0.7, 0.0), (0.0, 0.3), (0.5, 2.0)])
def test_fused_distillation_loss_equals_weighted_direct_terms(temperature, kl_weight, lm_weight):
    """One pass gives `kl_weight * KL + lm_weight * LM` and its exact gradient, also under an outer scale."""
    student, teacher, labels = _logits_and_labels(1)
    loss, kl, lm, count = distillation_loss(
        student, teacher, labels, temperature, kl_weight, lm_weight, chunk_size=3
    )
    (1.7 * loss).backward()
    fused_grad = student.grad.clone()

    student.grad = None
    ref_kl, ref_lm, ref_count = _direct_terms(student, teacher, labels, temperature)
    ref = kl_weight * ref_kl + lm_weight * ref_lm
    (1.7 * ref).backward()
    assert count == ref_count
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(kl, ref_kl.detach())
    torch.testing.assert_close(lm, ref_lm.detach())
    torch.testing.assert_close(fused_grad, student.grad)
    assert not kl.requires_grad and not lm.requires_grad


def test_hidden_state_distance_closed_form():
    """Per position `||h_s - h_t||^2 / ||h_t||^2`, averaged over layers (embeddings skipped), masked rows out."""
    h_t = [torch.randn(1, 3, 2) * 100, torch.tensor([[[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]]])]
    h_t.append(2 * h_t[1])
    h_s = [
        torch.zeros(1, 3, 2),
        h_t[1] + torch.tensor([[[0.0, 5.0], [1.0, 0.0], [9.0, 9.0]]]),
        h_t[2].clone(),
    ]
    labels = torch.tensor([[7, 7, -100]])  # position 1 is not scored (its next label is masked), nor is 2
    # layer 1: position 0: 25 / 25 = 1; layer 2: identical: 0; mean over the two layers: 0.5.
    assert hidden_state_distance(h_s, h_t, labels).item() == pytest.approx(0.5)
    assert hidden_state_distance(h_t, h_t, torch.tensor([[7, 7, 7]])).item() == 0.0


def test_hidden_weight_adds_the_layer_distance_to_the_trainer_loss(tmp_path):
    case = next(c for c in CASES if c.name == "llama-mha")
    student = zero_dropout(patched(case))
    original = zero_dropout(case.make())
    ids = batch(6)
    with torch.no_grad():
        h_t = original(input_ids=ids, output_hidden_states=True).hidden_states
        h_s = student(input_ids=ids, output_hidden_states=True).hidden_states
    distance = hidden_state_distance(h_s, h_t, ids).item()
    assert distance > 0

    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    losses = []
    for weight in (0.0, 2.0):
        trainer = UptrainTrainer(
            model=student,
            args=args,
            teacher=original,
            distill_weight=0.5,
            lm_weight=0.0,
            hidden_weight=weight,
        )
        student.train()
        losses.append(trainer.compute_loss(student, {"input_ids": ids, "labels": ids}).item())
        kl = trainer._kl_sum / trainer._count
    torch.testing.assert_close(losses[0], 0.5 * kl, rtol=1e-5, atol=1e-6)  # lm_weight=0: the KL term only
    torch.testing.assert_close(losses[1] - losses[0], 2.0 * distance / (2 * 15), rtol=1e-4, atol=1e-6)


# -- learning-rate schedule over a time budget -----------------------------------------------------------------
def test_time_aware_lr_factor_closed_forms():
    assert time_aware_lr_factor(5, 10, 100, 0.0, "cosine") == pytest.approx(0.5)  # warmup
    assert time_aware_lr_factor(10, 10, 100, 0.0, "cosine") == pytest.approx(1.0)
    assert time_aware_lr_factor(55, 10, 100, 0.0, "cosine") == pytest.approx(0.5)  # half the steps
    assert time_aware_lr_factor(20, 10, 10_000, 0.5, "cosine") == pytest.approx(0.5)  # half the time
    assert time_aware_lr_factor(20, 10, 10_000, 0.75, "linear") == pytest.approx(0.25)
    assert time_aware_lr_factor(20, 10, 10_000, 1.0, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert time_aware_lr_factor(82, 10, 100, 0.5, "linear") == pytest.approx(0.2)  # steps run out first


def test_time_limit_drives_the_trainer_lr_schedule(tmp_path):
    """With a time budget, the Trainer's cosine schedule follows the fraction of the budget spent."""
    from transformers import TrainingArguments

    model = patched(CASES[0])
    limit = TimeLimitCallback(max_seconds=100.0)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_steps=10_000,
    )
    trainer = UptrainTrainer(model=model, args=args, time_limit=limit)
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    limit.elapsed = 50.0
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(5e-4, rel=1e-3)
    limit.elapsed = 100.0
    trainer.lr_scheduler.step()
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)


def test_uptrain_stops_at_the_time_limit(tmp_path):
    from transformers import TrainerCallback

    seen: dict[str, int] = {}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["warmup_steps"] = args.warmup_steps

    case = CASES[0]
    rows_dir = tmp_path / "run"
    uptrain(
        patched(case),
        byte_tokenizer(),
        TEXTS * 4,
        method="kv",
        max_steps=1000,
        block_size=32,
        max_seconds=1e-6,
        callbacks=[Record()],
        output_dir=rows_dir,
        logging_steps=1,
        disable_tqdm=True,
    )
    rows = [json.loads(line) for line in (rows_dir / LOSS_LOG).read_text().splitlines()]
    assert max(r["step"] for r in rows) == 1
    assert seen["warmup_steps"] == 10  # under a time budget, not max_steps // 20 = 50


# -- data ------------------------------------------------------------------------------------------------------
TEXTS = ["It is a truth universally acknowledged. " * 8, "Emma Woodhouse, handsome, clever, and rich. " * 8]


def test_data_forms_pack_to_the_same_blocks(tmp_path):
    import datasets

    tok = byte_tokenizer()
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        (folder / f"{i}.txt").write_text(text)
    forms = [
        TEXTS,
        iter(TEXTS),
        datasets.Dataset.from_dict({"text": TEXTS}),
        folder,
        str(folder),
        [folder / "0.txt", folder / "1.txt"],
    ]
    expected = pack_blocks(tok, TEXTS, 32)
    n_tokens = sum(len(t.encode()) + 1 for t in TEXTS)  # bytes plus one EOS each
    assert expected.shape == (n_tokens // 32, 32)
    assert expected.reshape(-1)[len(TEXTS[0].encode())] == tok.eos_token_id
    for form in forms:
        assert torch.equal(pack_blocks(tok, read_texts(form), 32), expected)
    with pytest.raises(TypeError):
        read_texts([1, 2])
    with pytest.raises(FileNotFoundError):
        read_texts(tmp_path / "missing.txt")


def test_evaluate_perplexity_is_exp_mean_token_loss():
    model = CASES[0].make()
    tok = byte_tokenizer()
    blocks = pack_blocks(tok, TEXTS, 32)
    losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks]
    expected = torch.tensor(losses).double().mean().exp().item()
    assert evaluate_perplexity(model, tok, TEXTS, block_size=32, batch_size=3) == pytest.approx(
        expected, rel=1e-5
    )
    assert evaluate_perplexity(model, tok, blocks, block_size=32) == pytest.approx(expected, rel=1e-5)


def test_uptrain_lora_logs_evaluates_and_merges(tmp_path):
    case = CASES[0]
    tok = byte_tokenizer()
    teacher = case.make()
    trained = uptrain(
        patched(case),
        tok,
        TEXTS * 4,
        method="lora",
        max_steps=3,
        teacher=teacher,
        block_size=32,
        eval_fraction=0.25,
        output_dir=tmp_path,
        logging_steps=1,
        eval_steps=3,
        disable_tqdm=True,
    )
    assert hasattr(trained, "peft_config") and not trained.training
    rows = [json.loads(line) for line in (tmp_path / LOSS_LOG).read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(r["distill_kl"] >= 0 and "lm_loss" in r for r in train_rows)
    assert train_rows[-1]["train_tokens"] == 3 * 4 * 32
    assert any("eval_perplexity" in r for r in rows)
    merged = uptrain(
        patched(case),
        tok,
        TEXTS * 4,
        method="lora",
        max_steps=1,
        block_size=32,
        merge=True,
        disable_tqdm=True,
    )
    assert not hasattr(merged, "peft_config") and hf_gqa.is_patched(merged)


def test_uptrain_rejects_bad_arguments():
    case = CASES[0]
    with pytest.raises(ValueError, match="method"):
        uptrain(patched(case), byte_tokenizer(), TEXTS, method="qlora")
    with pytest.raises(ValueError, match="merge"):
        uptrain(patched(case), byte_tokenizer(), TEXTS, method="kv", merge=True)


# -- command line ----------------------------------------------------------------------------------------------
def _save_tiny(tmp_path: Path) -> tuple[Path, Path]:
    case = next((c for c in CASES if c.name == "llama-mha"), CASES[0])
    model_dir, text = tmp_path / "model", tmp_path / "corpus.txt"
    case.make().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text.write_text("\n\n".join(TEXTS * 8))
    return model_dir, text


def test_cli_uptrain_in_process_full_saves_a_loadable_model(tmp_path):
    from hf_gqa.cli import main

    model_dir, text = _save_tiny(tmp_path)
    out = tmp_path / "out"
    argv = f"uptrain --model {model_dir} --groups 2 --data {text} --method full --steps 2 --block-size 32"
    argv += f" --batch-size 2 --out {out} --no-progress --teacher --eval-fraction 0.2"
    assert main(argv.split()) == 0
    reloaded = hf_gqa.from_pretrained(out)
    assert hf_gqa.is_patched(reloaded)
    assert json.loads((out / "uptrain_summary.json").read_text())["eval_perplexity"] > 0
    assert (out / LOSS_LOG).read_text()


@pytest.mark.skipif(not (Path(sys.executable).parent / "accelerate").exists(), reason="no accelerate CLI")
def test_two_process_cpu_run_finishes_and_saves(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: two gloo processes train one model together."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, text = _save_tiny(tmp_path)
    out = tmp_path / "out"
    launch = (
        f"{Path(sys.executable).parent / 'accelerate'} launch --multi_gpu --num_processes 2 --num_machines 1"
    )
    launch += " --mixed_precision no --dynamo_backend no"
    command = f"-m hf_gqa.cli uptrain --model {model_dir} --groups 2 --data {text} --method lora --steps 3"
    command += (
        f" --block-size 32 --batch-size 2 --eval-fraction 0.1 --out {out} --no-progress --logging-steps 1"
    )
    command += " --teacher --max-minutes 60"  # distillation and the time budget's all-reduce across processes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(
        f"{launch} {command}".split(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in result.stderr
    assert (out / "adapter_config.json").exists()
    rows = [json.loads(line) for line in (out / LOSS_LOG).read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]  # written once, by the main process
    assert train_rows[-1]["train_tokens"] == 3 * 2 * 2 * 32  # steps * batch * processes * block
    assert all(r["distill_kl"] >= 0 for r in train_rows)
    assert json.loads((out / "uptrain_summary.json").read_text())["eval_step"] == 3
    base = hf_gqa.patch(AutoModelForCausalLM.from_pretrained(model_dir), groups=2)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    assert torch.isfinite(logits(reloaded, batch(7))).all()


def test_uptrain_config_validates_and_equals_keywords():
    from hf_gqa.training import UptrainConfig

    config = UptrainConfig(method="kv", max_steps=3, block_size=32)
    assert config.learning_rate is None and config.merge_adapter is False
    for bad, match in [
        (dict(method="nope"), "lora"),
        (dict(max_steps=0), "max_steps"),
        (dict(block_size=1), "block_size"),
        (dict(method="kv", merge_adapter=True), "merge_adapter"),
        (dict(training_args={"max_steps": 3}), "max_steps"),
    ]:
        with pytest.raises(hf_gqa.GQAError, match=match):
            UptrainConfig(**bad)


def test_uptrain_config_and_keywords_train_alike(tmp_path):
    from hf_gqa.training import UptrainConfig, uptrain

    case = next(c for c in CASES if c.name == "llama-gqa")
    texts = TEXTS * 4
    settings = dict(method="kv", max_steps=2, block_size=16, learning_rate=1e-3, training_args={"seed": 3})
    by_keywords = uptrain(
        hf_gqa.patch(case.make(), groups=1),
        byte_tokenizer(),
        texts,
        output_dir=str(tmp_path / "a"),
        **{k: v for k, v in settings.items() if k != "training_args"},
        seed=3,
        disable_tqdm=True,
    )
    config = UptrainConfig(
        output_dir=str(tmp_path / "b"), **{**settings, "training_args": {"seed": 3, "disable_tqdm": True}}
    )
    by_config = uptrain(hf_gqa.patch(case.make(), groups=1), byte_tokenizer(), texts, config)
    for (name, a), (_, b) in zip(by_keywords.named_parameters(), by_config.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    with pytest.raises(TypeError):
        uptrain(by_config, byte_tokenizer(), texts, config, max_steps=3)
    with pytest.warns(DeprecationWarning, match="merge_adapter"):
        uptrain(
            hf_gqa.patch(case.make(), groups=1),
            byte_tokenizer(),
            texts,
            method="lora",
            max_steps=1,
            block_size=16,
            output_dir=str(tmp_path / "c"),
            merge=True,
            disable_tqdm=True,
        )
