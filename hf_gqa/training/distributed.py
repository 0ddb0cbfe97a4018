"""Uptraining on several processes: FSDP (FSDP2 or FSDP1) and DDP under `accelerate launch`, on GPUs or on CPU.

`UptrainTrainer` is the stock transformers `Trainer`, so `accelerate launch --config_file fsdp.yaml` (or `ddp.yaml`)
shards or replicates the model through accelerate. This module adds what uptraining needs on top:

    `fsdp_requested`, `enable_fsdp_on_cpu`: accelerate turns FSDP on only for accelerator devices (its
        `AcceleratorState` sets `DistributedType.FSDP` for `MULTI_GPU`-like runs, never for `MULTI_CPU`); on a
        machine without one (gloo) `UptrainTrainer` switches the state to FSDP itself, so an FSDP config runs
        unchanged on CPU processes (for tests and small runs) and on GPUs.
    `empty_copy`, `gather_full_model`: FSDP leaves every process with a shard of the weights. Before training
        `uptrain` keeps a copy of the model's structure with no weights (parameters on the meta device); after it
        the full state dict is gathered (`FULL_STATE_DICT`, every process taking part) onto the CPU of the main
        process and loaded into that copy, so that the main process gets back a plain, unsharded model (or
        `PeftModel`) that saves, merges and evaluates as after a single-process run.
    `mask_sharded_gradients`: `method="kv"` keeps the query rows of a fused q/k/v projection fixed with gradient
        hooks on the parameters; FSDP2 replaces those parameters with sharded ones, so the masks are applied to
        the sharded gradients after each backward pass instead.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import GQAError


def fsdp_requested(fsdp_plugin_args: Mapping | None = None) -> bool:
    """Whether this run asks for FSDP: `accelerate launch` with an FSDP config (`ACCELERATE_USE_FSDP=true`) or the
    Trainer's own `fsdp=` argument (`fsdp_plugin_args`)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or fsdp_plugin_args is not None


def enable_fsdp_on_cpu(accelerator, fsdp_plugin_args: Mapping | None = None) -> bool:
    """Turn on FSDP for a multi-process CPU run that asked for it; returns whether it did.

    accelerate sets `DistributedType.FSDP` only when the processes run on an accelerator; with gloo on CPU the
    state says `MULTI_CPU` and `prepare` would wrap the model in DDP instead. This builds the FSDP plugin the way
    accelerate does (from the launcher's `FSDP_*` environment variables, or the Trainer's `fsdp_plugin_args`) and
    sets it on the state, so that `prepare` shards the model (`fully_shard` for FSDP2, `FullyShardedDataParallel`
    for FSDP1) on the CPU device mesh. A no-op anywhere else. (FSDP1 on CPU also needs
    `fsdp_sync_module_states: false`: accelerate's plugin looks for a GPU to broadcast module states from.)
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not fsdp_requested(fsdp_plugin_args) or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**dict(fsdp_plugin_args or {}))
    state.fsdp_plugin = plugin
    # As `AcceleratorState` does on GPUs: the process-wide `PartialState` says FSDP too (a later
    # `AcceleratorState()` copies the `PartialState` values over its own).
    for shared in (state, PartialState()):
        shared.distributed_type = DistributedType.FSDP
        if plugin.fsdp_version == 1:
            # FSDP1 computes on `torch.device("cpu")` and rejects a `device_id` of accelerate's "cpu:0".
            shared.device = torch.device("cpu")
    return True


def fsdp_version(accelerator) -> int | None:
    """1 or 2 when `accelerator` shards with FSDP, else `None`."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return None if plugin is None else int(plugin.fsdp_version)


def parallel_mode() -> str:
    """How the last `uptrain` in this process ran: `"FSDP2"`, `"FSDP1"`, `"DDP"` (several processes, each with
    the whole model) or `"none"` (one process), from accelerate's shared state."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState()
    if state.distributed_type == DistributedType.FSDP:
        return f"FSDP{state.fsdp_plugin.fsdp_version}"
    return "DDP" if state.num_processes > 1 else "none"


def empty_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory); buffers, configs, hooks and
    `requires_grad` flags are copied. Tied parameters stay tied."""
    memo: dict[int, object] = {}
    for param in model.parameters():  # each shared parameter once
        memo[id(param)] = nn.Parameter(
            torch.empty_like(param, device="meta"), requires_grad=param.requires_grad
        )
    return copy.deepcopy(model, memo)


def _is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def gather_full_model(sharded: nn.Module, skeleton: nn.Module) -> nn.Module:
    """The trained weights of the FSDP-wrapped `sharded` model, gathered into `skeleton` (`empty_copy` of the model
    before wrapping). Every process must call it.

    On the main process: `skeleton` holding the full weights on the CPU (the full state dict, `FULL_STATE_DICT`
    offloaded to the CPU of rank 0 only), tied weights tied again. On the other processes: `skeleton` as it is,
    its parameters on the meta device, so that nothing is saved or evaluated there by mistake.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    # Offloaded to the CPU of rank 0 only; except for FSDP1 on CPU, whose offload path (`FlatParamHandle.to_cpu`
    # on parameters already there) crashes: there every process gathers the full weights in place.
    on_cpu = next(sharded.parameters()).device.type == "cpu"
    offload = not (isinstance(sharded, FullyShardedDataParallel) and on_cpu)
    state = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
    if not _is_main_process():
        return skeleton
    expected = set(skeleton.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise GQAError(
            f"The gathered FSDP state dict lacks {missing[:5]}{'...' if len(missing) > 5 else ''}."
        )
    skeleton.load_state_dict(state, strict=True, assign=True)
    base = skeleton.get_base_model() if hasattr(skeleton, "get_base_model") else skeleton
    if getattr(base.config.get_text_config(decoder=True), "tie_word_embeddings", False) and hasattr(
        base, "tie_weights"
    ):
        base.tie_weights()
    left = [n for n, p in skeleton.named_parameters() if p.device.type == "meta"]
    if left:
        raise GQAError(f"Parameters left on the meta device after gathering: {left[:5]}.")
    return skeleton


def mask_sharded_gradients(model: nn.Module, masks: Mapping[str, torch.Tensor], cache: dict) -> None:
    """Multiply the gradient of every parameter named in `masks` by its mask, in place.

    For FSDP2's sharded parameters the gradient is a `DTensor`; its local shard is multiplied by the matching
    shard of the mask (laid out like the gradient, without communication, and kept in `cache`).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, param in model.named_parameters():
        mask = masks.get(name)
        if mask is None or param.grad is None:
            continue
        grad = param.grad
        if isinstance(grad, DTensor):
            local = cache.get(name)
            if local is None:
                full = mask.to(device=grad.device, dtype=grad.dtype)
                local = distribute_tensor(
                    full, grad.device_mesh, grad.placements, src_data_rank=None
                ).to_local()
                cache[name] = local
            grad.to_local().mul_(local)
        else:
            grad.mul_(mask.to(device=grad.device, dtype=grad.dtype))


__all__ = [
    "empty_copy",
    "enable_fsdp_on_cpu",
    "fsdp_requested",
    "fsdp_version",
    "gather_full_model",
    "mask_sharded_gradients",
    "parallel_mode",
]
