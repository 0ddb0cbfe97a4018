"""What refine holds while it fits, and `Refine(train="attention")`.

- Each parameter takes its Adam step as soon as its gradient is complete and drops it: the gradients of a whole
  decoder layer never exist at once (measured at every optimizer step).
- The start kept to undo a bad fit is stored in bfloat16 where that holds a float32 weight exactly, and an undone
  fit restores the start bit for bit.
- `train="attention"`: a layer-scope fit trains the converted attention alone; on every family every tensor outside
  the attention modules equals the original model's, the attention's changed, and the fit lowered its error.
"""

from __future__ import annotations

import copy

import pytest
import torch

import hf_gqa
from hf_gqa.errors import GQAError
from hf_gqa.methods import Refine
from hf_gqa.patch import _adapter_for
from hf_gqa.refine import _compact_copy, refine_module

from .cases import all_cases
from .tiny import calibration_ids, tiny_llama

CASES = all_cases()
IDS = [c.name for c in CASES]


def _attention_prefixes(model) -> list[str]:
    return [name + "." for name, _ in _adapter_for(model).attention_modules(model)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_attention_changes_the_attention_alone(case):
    model = case.make()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prefixes = _attention_prefixes(model)
    groups = case.groups[-1]
    hf_gqa.patch(  # the calibrated default (a mean-pooled start where the family forbids score's folding)
        model, groups=groups, refine_steps=4, refine_train="attention", calibration=calibration_ids(),
        calibration_tokens=128, block_size=32, batch_size=2, show_progress=False,
    )  # fmt: skip
    state = model.state_dict()
    outside = [k for k in original if not any(k.startswith(p) for p in prefixes)]
    assert outside, "the family case has no tensor outside attention"
    for key in outside:
        assert key in state and torch.equal(state[key], original[key]), key
    logs = [log for log in model._hf_gqa_conversion_log if "before" in log]
    assert logs, "no layer was refined"
    assert all(log["after"] <= log["before"] for log in logs)
    fitted = [
        log for log in logs if log["before"] > 1e-10
    ]  # none where the case already has `groups` KV heads
    assert not fitted or any(log["after"] < log["before"] for log in fitted)


def test_train_layer_changes_the_mlp_too():
    """The default trains the whole layer copy: the check above is not vacuous."""
    model = tiny_llama(kv=4)
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    hf_gqa.patch(
        model, groups=2, method=Refine(steps=4), calibration=calibration_ids(), calibration_tokens=128,
        block_size=32, batch_size=2, show_progress=False,
    )  # fmt: skip
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_train_is_validated_and_follows_scope():
    with pytest.raises(GQAError, match="refine train must be one of"):
        Refine(train="mlp")
    assert Refine(scope="attention").train == "attention"
    assert Refine().train == "layer"


def _layer_fit(model, steps=6, lr=3e-4):
    """refine_module on a copy of the first decoder layer of `model` against the layer itself."""
    layer = model.model.layers[0]
    converted = copy.deepcopy(layer)
    with torch.no_grad():
        converted.self_attn.k_proj.weight.add_(0.05 * torch.randn_like(converted.self_attn.k_proj.weight))
    hidden = torch.randn(2, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(16).unsqueeze(0).expand(2, -1)
    embeddings = model.model.rotary_emb(hidden, position_ids)
    inputs = [((hidden,), {"position_embeddings": embeddings, "attention_mask": None})]
    return layer, converted, inputs


def test_gradients_are_dropped_as_each_parameter_steps(monkeypatch):
    model = tiny_llama(kv=4)
    layer, converted, inputs = _layer_fit(model)
    params = list(converted.parameters())
    alive: list[int] = []
    step = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        alive.append(sum(p.grad is not None for p in params))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    fit = refine_module(layer, converted, inputs, steps=3)
    assert "after" in fit
    assert len(alive) == 3 * len(params)  # one step per parameter per refine step
    assert max(alive) == 1  # only the parameter stepping holds a gradient
    assert all(p.grad is None for p in params)


def test_frozen_shared_parameters_get_no_gradient_and_keep_their_flag():
    model = tiny_llama(kv=4)
    layer, _, inputs = _layer_fit(model)
    converted = copy.deepcopy(layer, memo={id(p): p for p in layer.mlp.parameters()})  # MLP shared
    with torch.no_grad():
        converted.self_attn.k_proj.weight.add_(0.05 * torch.randn_like(converted.self_attn.k_proj.weight))
    mlp = list(layer.mlp.parameters())
    assert all(p.requires_grad for p in mlp)
    seen: list[bool] = []
    hook = converted.mlp.register_forward_pre_hook(
        lambda m, a: seen.append(any(p.requires_grad for p in mlp))
    )
    before = [p.clone() for p in mlp]
    refine_module(layer, converted, inputs, steps=3)
    hook.remove()
    assert len(seen) >= 3 and not any(seen)  # frozen in every forward of the fit
    assert all(p.requires_grad for p in mlp) and all(p.grad is None for p in mlp)
    assert all(torch.equal(p, b) for p, b in zip(mlp, before))


def test_compact_copy_is_exact_and_narrow_only_when_lossless():
    exact = torch.randn(64, 64).to(torch.bfloat16).float()
    kept = _compact_copy(exact)
    assert kept.dtype == torch.bfloat16 and torch.equal(kept.float(), exact)
    inexact = torch.randn(64, 64)
    kept = _compact_copy(inexact)
    assert kept.dtype == torch.float32 and torch.equal(kept, inexact)
    assert kept.data_ptr() != inexact.data_ptr()


def test_an_undone_fit_restores_the_start_bit_for_bit():
    model = tiny_llama(kv=4).to(torch.bfloat16).float()  # weights exact in bf16: the start is kept narrow
    layer, converted, inputs = _layer_fit(model)
    start = {k: v.clone() for k, v in converted.state_dict().items()}
    fit = refine_module(layer, converted, inputs, steps=4, lr=10.0)  # a rate that can only make it worse
    assert fit["reverted"] and fit["after"] == fit["before"]
    for key, value in converted.state_dict().items():
        assert torch.equal(value, start[key]), key


@pytest.mark.parametrize("command", ["convert", "eval", "bench"])
def test_every_converting_command_takes_refine_train(command):
    from hf_gqa.cli import build_parser
    from hf_gqa.cli.options import conversion_kwargs

    argv = [
        command,
        "--model",
        "smollm2",
        "--groups",
        "1",
        "--refine-train",
        "attention",
        "--calibration",
        "builtin",
    ]
    if command == "convert":
        argv += ["--out", "unused"]
    args = build_parser().parse_args(argv)
    assert args.refine_train == "attention"
    assert conversion_kwargs(args, tokenizer=None)["refine_train"] == "attention"
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--model", "smollm2", "--groups", "1", "--refine-train", "mlp"])
    args = build_parser().parse_args([*argv, "--refine-warmup", "10", "--refine-lr", "4.5e-4"])
    kwargs = conversion_kwargs(args, tokenizer=None)
    assert kwargs["refine_warmup"] == 10 and kwargs["refine_lr"] == 4.5e-4
