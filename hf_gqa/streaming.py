"""Converting a checkpoint on disk without building the model: one attention module in memory at a time.

    hf_gqa.convert_checkpoint("llama-65b/", "llama-65b-gqa8/", groups=8)        # mean pooling, shard by shard

The model is built on the meta device (accelerate's `init_empty_weights`), so its structure, the family adapter
and the conversion plan are known without a single weight in memory. The output layout (which tensor goes in
which shard) is planned up front from a meta copy converted to the target layout (huggingface_hub's
`split_torch_state_dict_into_shards`). Each output shard is then filled in turn: tensors the conversion does not
touch are read lazily from the source shards (safetensors' `safe_open`) and written unchanged (same dtype); the
tensors of an attention module are loaded into its meta module (accelerate's `set_module_tensor_to_device`),
converted by the same adapter and method as `patch`, written, and dropped. Peak memory is about one output shard
(`max_shard_size`) plus one attention module, whatever the model's size.

Data-free methods (`mean`, `first`, registered closed forms that need no calibration) stream shard by shard.
With `calibration=` the calibrated methods (by default `refine`, as `patch` chooses) bring one decoder layer at a
time onto `device` instead (`hf_gqa.onload`): same entry point, same output layout.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate.utils import set_module_tensor_to_device
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from .architectures import get_adapter
from .checks import check_weights
from .errors import GQAError
from .grouping import CALIBRATED_GROUPINGS, get_grouping
from .io import empty_model, rebuild_layout, to_model_keys
from .memory import release_freed_memory
from .methods import ConversionMethod
from .patch import converted_config
from .planning import LayerPlan, convert_weights, plan_layers
from .remote import add_remote_code

if TYPE_CHECKING:
    from .onload import OnloadEstimate

SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
#: Files of a model folder that are weights (not copied as they are).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


@dataclass
class StreamReport:
    """What `convert_checkpoint` did: layers converted, bytes read and written, seconds."""

    out: Path
    layers: int
    shards: int
    bytes_read: int
    bytes_written: int
    seconds: float
    kv_heads_before: list[int]
    kv_heads_after: list[int]
    method: str = ""
    device: str = "cpu"
    calibration_tokens: int = 0  # 0: data-free
    seconds_per_layer: list[float] = field(default_factory=list)  # calibrated: each decoder layer's seconds
    logs: list[dict] = field(default_factory=list)  # calibrated: per layer, tokens and the refine fit

    def __str__(self) -> str:
        before, after = sorted(set(self.kv_heads_before)), sorted(set(self.kv_heads_after))
        if self.calibration_tokens:
            per_layer = sum(self.seconds_per_layer) / max(len(self.seconds_per_layer), 1)
            return (
                f"converted {self.layers} decoder layers one at a time on {self.device} ({self.method}, "
                f"{self.calibration_tokens:,} calibration tokens), KV heads {before} -> {after} per layer; "
                f"{per_layer:.1f} s per layer; read {self.bytes_read / 2**20:,.1f} MiB, wrote "
                f"{self.bytes_written / 2**20:,.1f} MiB in {self.shards} shard(s) to {self.out} in "
                f"{self.seconds:.1f} s"
            )
        return (
            f"streamed {self.layers} attention layers, KV heads {before} -> {after} per layer; read "
            f"{self.bytes_read / 2**20:,.1f} MiB, wrote {self.bytes_written / 2**20:,.1f} MiB in {self.shards} "
            f"shard(s) to {self.out} in {self.seconds:.1f} s"
        )


@dataclass
class CheckpointPlan:
    """What a streamed conversion will do, known before any weight is read (`hf-gqa convert --dry-run`)."""

    src: Path
    model: PreTrainedModel  # on the meta device
    adapter: object
    method: ConversionMethod
    layers: list[LayerPlan]
    weight_map: dict[str, str]  # source tensor name -> source file
    to_source: dict[str, str]  # model tensor name -> source tensor name
    owners: dict[str, LayerPlan | None]  # model tensor name -> the attention module it belongs to, or None
    layout: object  # huggingface_hub StateDictSplit of the output
    source_bytes: int
    output_bytes: int
    largest_shard_bytes: int
    largest_module_bytes: int
    source_dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # source tensor name -> dtype
    method_spec: object = None  # what the caller asked for (a name, a method object, None: the default)
    grouping: str = "consecutive"
    calibrated: OnloadEstimate | None = None  # a calibrated (onloaded) conversion's estimate, or None

    @property
    def peak_bytes_estimate(self) -> int:
        """Weights in memory at the worst moment: one output shard and its serialised copy (safetensors writes a
        file from one buffer), plus one attention module read and rebuilt."""
        return 2 * self.largest_shard_bytes + 2 * self.largest_module_bytes

    def __str__(self) -> str:
        mib = 2**20
        before = sorted({p.kv_heads_before for p in self.layers})
        after = sorted({p.kv_heads_after for p in self.layers})
        head = (
            f"{len(self.layers)} {self.adapter.family} attention layers, KV heads {before} -> {after} "
            f"({self.method.label}); checkpoint {self.source_bytes / mib:,.1f} MiB -> {self.output_bytes / mib:,.1f} "
            f"MiB in {len(self.layout.filename_to_tensors)} shard(s)"
        )
        if self.calibrated is not None:
            return f"{head}; {self.calibrated}"
        return (
            f"{head}; weights in memory at most about "
            f"{self.peak_bytes_estimate / mib:,.1f} MiB (largest shard {self.largest_shard_bytes / mib:,.1f} MiB, "
            f"attention module {self.largest_module_bytes / mib:,.1f} MiB), plus the Python, torch and "
            "transformers imports"
        )


def _refine_keywords(refine: dict) -> dict:
    """`{"steps": 10, ...}` (the `Refine` settings `convert_checkpoint` holds) as `plan_checkpoint`'s keywords
    (`{"refine_steps": 10, ...}`)."""
    return {f"refine_{name}": value for name, value in refine.items()}


def plan_checkpoint(
    src: str | Path,
    groups: int | Sequence[int],
    method: str | ConversionMethod | None = None,
    grouping: str = "consecutive",
    *,
    max_shard_size: int | str = "1GB",
    calibrated: bool = False,
    calibration_tokens: int = 8192,
    block_size: int = 512,
    batch_size: int = 4,
    sequential: bool = True,
    refine_steps: int | None = None,
    refine_lr: float | None = None,
    refine_target: str | None = None,
    refine_scope: str | None = None,
    refine_positions: int | None = None,
    refine_train: str | None = None,
    refine_warmup: int | None = None,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = torch.float32,
) -> CheckpointPlan:
    """Plan a conversion of the checkpoint in `src`: validate everything and size the output and the peak memory,
    reading only the config and the safetensors headers.

    `method=None` is what `patch` would choose: mean pooling, or with `calibrated=True` (calibration data will be
    given) `refine`. A calibrated plan also sizes the onloaded run (`plan.calibrated`, `hf_gqa.onload.
    OnloadEstimate`: layers, calibration tokens, peak device and host memory) from the other keywords, which
    are `convert_checkpoint`'s.
    """
    refine = dict(
        steps=refine_steps,
        lr=refine_lr,
        target=refine_target,
        scope=refine_scope,
        positions=refine_positions,
        train=refine_train,
        warmup=refine_warmup,
    )
    from .onload import estimate_onload, planned_tokens
    from .patch import resolve_method

    src = Path(src)
    get_grouping(grouping)
    weight_map = _source_weight_map(src)
    model = empty_model(AutoConfig.from_pretrained(src))
    adapter = get_adapter(model)
    method_spec = method
    method = resolve_method(method, refine, calibrated, adapter, model)
    if not calibrated and (method.needs_calibration or grouping in CALIBRATED_GROUPINGS):
        raise GQAError(
            f"method {method.label!r} / grouping={grouping!r} need calibration data: pass calibration=texts, "
            "tokenizer=tokenizer (each decoder layer is then brought to the device in turn), or use a data-free "
            "method (mean, first)."
        )
    plans = plan_layers(model, adapter, groups, check=False)
    to_source = {model_key: source_key for source_key, model_key in _model_keys(model, weight_map).items()}
    dtypes = _source_dtypes(src, weight_map)
    target = empty_model(AutoConfig.from_pretrained(src))
    rebuild_layout(target, [p.kv_heads_after for p in plans], {})
    target_state = target.state_dict()
    planned = {
        key: torch.empty(target_state[key].shape, dtype=dtypes[source], device="meta")
        for key, source in to_source.items()
    }
    layout = split_torch_state_dict_into_shards(
        planned, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    nbytes = {key: t.numel() * t.element_size() for key, t in planned.items()}
    source_state = model.state_dict()
    source_nbytes = {
        key: source_state[key].numel() * dtypes[source].itemsize for key, source in to_source.items()
    }
    by_name = {p.name: p for p in plans}
    owners = {key: _owning_module(key, by_name) for key in to_source}
    by_module: dict[str, int] = {}
    for key, owner in owners.items():
        if owner is not None:
            by_module[owner.name] = by_module.get(owner.name, 0) + source_nbytes[key]
    plan = CheckpointPlan(
        src,
        model,
        adapter,
        method,
        plans,
        weight_map,
        to_source,
        owners,
        layout,
        sum(source_nbytes.values()),
        sum(nbytes.values()),
        max(sum(nbytes[k] for k in keys) for keys in layout.filename_to_tensors.values()),
        max(by_module.values(), default=0),
        dtypes,
        method_spec,
        grouping,
    )
    if calibrated:
        tokens = planned_tokens(calibration_tokens, block_size)
        plan.calibrated = estimate_onload(
            plan, method, tokens, block_size, batch_size, sequential, str(device), compute_dtype
        )
    return plan


def _source_dtypes(src: Path, weight_map: dict[str, str]) -> dict[str, torch.dtype]:
    """The dtype of every source tensor, from the safetensors headers (no tensor is read)."""
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    dtypes = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(str(src / file), framework="pt") as f:
            for key in f.keys():
                code = f.get_slice(key).get_dtype()
                if code not in names:
                    raise GQAError(
                        f"{key} in {file} is {code}; a streamed conversion converts float tensors."
                    )
                dtypes[key] = names[code]
    return dtypes


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    groups: int | Sequence[int],
    method: str | ConversionMethod | None = None,
    grouping: str = "consecutive",
    *,
    max_shard_size: int | str = "1GB",
    show_progress: bool = True,
    calibration: object | None = None,
    tokenizer=None,
    calibration_tokens: int = 8192,
    block_size: int = 512,
    batch_size: int = 4,
    sequential: bool = True,
    seed: int = 0,
    refine_steps: int | None = None,
    refine_lr: float | None = None,
    refine_target: str | None = None,
    refine_scope: str | None = None,
    refine_positions: int | None = None,
    refine_train: str | None = None,
    refine_warmup: int | None = None,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | None = torch.float32,
    activations_on_disk_above: int | None = None,
    low_memory: bool = True,
) -> StreamReport:
    """Convert the safetensors checkpoint in folder `src` to `groups` KV heads and write it to `dst`, never
    holding more than one decoder layer's weights.

    Without `calibration`: a data-free method (default mean pooling) streamed shard by shard. The result equals
    `hf_gqa.patch(model, groups, method)` of the loaded model tensor for tensor; every tensor keeps its dtype.

    With `calibration` (and `tokenizer` for text): the calibrated method `patch` would run (default `refine`),
    onloaded one decoder layer at a time on `device` (`hf_gqa.onload`); calibration activations stay on the CPU
    between layers. The result equals `patch(model loaded in compute_dtype, groups, calibration=..., same
    settings)` within float tolerance; every written tensor keeps the checkpoint's dtype (a bf16 checkpoint is
    computed in float32 and cast back; `compute_dtype=None` computes in the checkpoint's dtype).

    Either way the result loads as `patch`'s would: with plain transformers for natively-GQA families converted
    uniformly, with `hf_gqa.from_pretrained` (or `trust_remote_code=True`) otherwise.

    Args:
        src: a folder with `config.json` and `model.safetensors` or a sharded `model.safetensors.index.json`.
        dst: the output folder (created); tokenizer and other non-weight files of `src` are copied.
        groups, method, grouping: as for `hf_gqa.patch` (`groups="auto"` is not supported here).
        max_shard_size: the largest output shard.
        calibration, tokenizer, calibration_tokens, block_size, batch_size, sequential, seed, refine_*: as for
            `hf_gqa.patch`.
        device: where each decoder layer computes (`"cpu"`, `"cuda"`, `"cuda:1"`).
        compute_dtype: the dtype layers compute in (float32; None: the checkpoint's).
        activations_on_disk_above: bytes of one copy of the calibration hidden states above which they are kept
            in a memory-mapped temporary file between layers (default 8 GiB).
        low_memory: with calibration, keep the host's resident set low at some cost in time: glibc maps every
            allocation above 1 MiB directly, so what a layer frees leaves at once (page faults on every new
            one); False lets allocations up to 32 MiB come from the heap. Measured on a 3B checkpoint training
            the attention alone (`benchmarks/streaming.py`, 2-core CPU): 1.20 GiB peak RSS at 7.4 s a layer,
            against 1.34 GiB at 7.1 s with `low_memory=False` (1B: 0.83 GiB at 3.8 s against 0.93 GiB at 3.0 s).
            No effect without glibc or without calibration.

    Raises:
        GQAError: a calibrated method without calibration data, text without a tokenizer, a folder without
            safetensors weights, or bad `groups` (before anything is written).
    """
    refine = dict(
        steps=refine_steps,
        lr=refine_lr,
        target=refine_target,
        scope=refine_scope,
        positions=refine_positions,
        train=refine_train,
        warmup=refine_warmup,
    )
    if calibration is not None:
        from . import memory
        from .onload import MMAP_THRESHOLD

        # the whole run, planning included: see `hf_gqa.onload.MMAP_THRESHOLD`
        with memory.large_allocations_mapped(during=MMAP_THRESHOLD[low_memory]):
            return _convert_calibrated(
                src,
                dst,
                groups,
                method,
                grouping,
                max_shard_size=max_shard_size,
                show_progress=show_progress,
                calibration=calibration,
                tokenizer=tokenizer,
                calibration_tokens=calibration_tokens,
                block_size=block_size,
                batch_size=batch_size,
                sequential=sequential,
                seed=seed,
                refine=refine,
                device=device,
                compute_dtype=compute_dtype,
                activations_on_disk_above=activations_on_disk_above,
            )
    start = time.perf_counter()
    dst = Path(dst)
    plan = plan_checkpoint(
        src, groups, method, grouping, max_shard_size=max_shard_size, **_refine_keywords(refine)
    )
    src, model, adapter, plans, weight_map = plan.src, plan.model, plan.adapter, plan.layers, plan.weight_map
    method, grouping_fn = plan.method, get_grouping(grouping)
    layout, owner = plan.layout, plan.owners

    dst.mkdir(parents=True, exist_ok=True)
    converted: dict[str, dict[str, torch.Tensor]] = {}
    written = 0
    reader = SourceReader(src, weight_map, plan.to_source)
    files = tqdm(layout.filename_to_tensors.items(), desc="hf_gqa: streaming", disable=not show_progress)
    for filename, model_keys in files:
        tensors: dict[str, torch.Tensor] = {}
        for key in model_keys:
            layer = owner[key]
            if layer is None:
                tensors[key] = reader.read(key)
                continue
            if layer.name not in converted:
                converted[layer.name] = _convert_module(model, adapter, layer, method, grouping_fn, reader)
            tensors[key] = converted[layer.name].pop(key)
            if not converted[layer.name]:
                del converted[layer.name]
        written += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(
            {k: t.contiguous() for k, t in tensors.items()}, str(dst / filename), metadata={"format": "pt"}
        )
        del tensors  # the last references to this shard's source pages: their mappings go with them
        release_freed_memory()
    if layout.is_sharded:
        index = {"metadata": {"total_size": written}, "weight_map": layout.tensor_to_filename}
        (dst / SAFE_WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_config(AutoConfig.from_pretrained(src), adapter, plans, method, grouping, dst)
    _copy_other_files(src, dst)
    add_remote_code(dst)  # multi-head-only families: the modeling code that loads them without hf_gqa
    return StreamReport(
        dst,
        len(plans),
        len(layout.filename_to_tensors),
        reader.bytes_read,
        written,
        time.perf_counter() - start,
        [p.kv_heads_before for p in plans],
        [p.kv_heads_after for p in plans],
    )


def _convert_calibrated(
    src: str | Path,
    dst: str | Path,
    groups: int | Sequence[int],
    method: str | ConversionMethod | None,
    grouping: str,
    *,
    max_shard_size: int | str,
    show_progress: bool,
    calibration: object,
    tokenizer,
    calibration_tokens: int,
    block_size: int,
    batch_size: int,
    sequential: bool,
    seed: int,
    refine: dict[str, object],
    device: str | torch.device,
    compute_dtype: torch.dtype | None,
    activations_on_disk_above: int | None,
) -> StreamReport:
    """`convert_checkpoint` with calibration data: plan, resolve and tokenize (every check before `dst` is
    created), state the estimate, then the layer loop of `hf_gqa.onload.run_onloaded`. The caller fixes glibc's
    mmap threshold around it (`hf_gqa.memory.large_allocations_mapped`)."""
    from .methods import Refine
    from .onload import ACTIVATIONS_ON_DISK_ABOVE, ShardWriter, announce, resolve_conversion, run_onloaded
    from .pipeline import SequentialSettings

    start = time.perf_counter()
    dst = Path(dst)
    if isinstance(groups, str):
        raise GQAError(
            f"groups={groups!r}: a checkpoint converted layer by layer takes an int or a per-layer list; "
            "groups='auto' measures every layer first: load the model and use hf_gqa.patch."
        )
    plan = plan_checkpoint(
        src,
        groups,
        method,
        grouping,
        max_shard_size=max_shard_size,
        calibrated=True,
        calibration_tokens=calibration_tokens,
        block_size=block_size,
        batch_size=batch_size,
        sequential=sequential,
        device=device,
        compute_dtype=compute_dtype,
        **_refine_keywords(refine),
    )
    conversion = resolve_conversion(
        plan,
        calibration,
        tokenizer,
        calibration_tokens,
        block_size,
        batch_size,
        sequential,
        seed,
        refine,
        show_progress,
    )
    tokens = int(conversion.blocks.numel())
    plan.calibrated.tokens = tokens
    plan.calibrated.activation_bytes = (
        tokens * plan.calibrated.hidden_size * plan.calibrated.compute_dtype.itemsize
    )
    announce(str(plan), show_progress)
    method_obj = conversion.method
    settings = SequentialSettings(
        sequential,
        method_obj if isinstance(method_obj, Refine) else None,
        conversion.adapter.key_value_inputs,
    )
    dst.mkdir(parents=True, exist_ok=True)
    reader = SourceReader(plan.src, plan.weight_map, plan.to_source)
    converted = {key for key, owner in plan.owners.items() if owner is not None}
    converted |= {key for keys in _layer_keys(plan) for key in keys}
    writer = ShardWriter(plan.layout, reader, dst, converted)
    writer.flush()  # shards holding no decoder layer tensor (e.g. the embeddings) go first
    result = run_onloaded(
        plan,
        conversion,
        settings,
        writer,
        device,
        compute_dtype,
        plan.calibrated,
        ACTIVATIONS_ON_DISK_ABOVE if activations_on_disk_above is None else activations_on_disk_above,
        show_progress,
    )
    if plan.layout.is_sharded:
        index = {
            "metadata": {"total_size": result.bytes_written},
            "weight_map": plan.layout.tensor_to_filename,
        }
        (dst / SAFE_WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_config(AutoConfig.from_pretrained(plan.src), plan.adapter, plan.layers, method_obj, grouping, dst)
    _copy_other_files(plan.src, dst)
    add_remote_code(dst)
    return StreamReport(
        dst,
        len(plan.layers),
        len(plan.layout.filename_to_tensors),
        reader.bytes_read,
        result.bytes_written,
        time.perf_counter() - start,
        [p.kv_heads_before for p in plan.layers],
        [p.kv_heads_after for p in plan.layers],
        method=method_obj.label,
        device=str(device),
        calibration_tokens=result.tokens,
        seconds_per_layer=result.seconds_per_layer,
        logs=result.logs,
    )


def _layer_keys(plan: CheckpointPlan) -> list[list[str]]:
    from .onload import decoder_layer_names, layer_keys

    return layer_keys(plan.to_source, decoder_layer_names(plan.layers))


# -- the source checkpoint ---------------------------------------------------------------------------------------
def _source_weight_map(src: Path) -> dict[str, str]:
    """`{tensor name: file name}` of the safetensors checkpoint in `src`."""
    if not src.is_dir():
        raise GQAError(f"{src} is not a folder: give the folder of a checkpoint saved with save_pretrained.")
    index = src / SAFE_WEIGHTS_INDEX
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = src / "model.safetensors"
    if not single.exists():
        raise GQAError(
            f"{src} holds no safetensors checkpoint (model.safetensors or {SAFE_WEIGHTS_INDEX}); a streamed "
            "conversion reads safetensors only. Load the model and save it with save_pretrained first."
        )
    with safe_open(str(single), framework="pt") as f:
        return {key: single.name for key in f.keys()}


def _model_keys(model: PreTrainedModel, weight_map: dict[str, str]) -> dict[str, str]:
    """`{source tensor name: model state_dict name}` for every source tensor the model has (the names a checkpoint
    saved by transformers uses, legacy renamings and a missing base-model prefix included)."""
    expected = set(model.state_dict())
    renamed = to_model_keys(model, dict.fromkeys(weight_map))
    mapping = {}
    for source, candidate in zip(weight_map, renamed):
        for name in (source, candidate, f"{model.base_model_prefix}.{source}"):
            if name in expected:
                mapping[source] = name
                break
        else:
            raise GQAError(f"{source} in the checkpoint is not a tensor of {type(model).__name__}.")
    return mapping


def _owning_module(key: str, plans: dict[str, LayerPlan]) -> LayerPlan | None:
    """The planned attention module `key` belongs to, or None."""
    prefix = key.rpartition(".")[0]
    while prefix:
        if prefix in plans:
            return plans[prefix]
        prefix = prefix.rpartition(".")[0]
    return None


# -- reading the source ------------------------------------------------------------------------------------------
class SourceReader:
    """Reads source tensors one at a time, by model tensor name.

    safetensors maps a file and hands out tensors that are views of the mapping; every page read stays in this
    process's resident set while the file is open. So each read opens the file, takes the one tensor and closes
    it: the mapping lives only as long as the tensors taken from it (until their output shard is written),
    and resident memory stays about one output shard instead of growing to the whole checkpoint.
    """

    def __init__(self, src: Path, weight_map: dict[str, str], to_source: dict[str, str]) -> None:
        self.src, self.weight_map, self.to_source = src, weight_map, to_source
        self.bytes_read = 0

    def has(self, key: str) -> bool:
        return key in self.to_source

    def read(self, key: str) -> torch.Tensor:
        source = self.to_source[key]
        with safe_open(str(self.src / self.weight_map[source]), framework="pt") as f:
            tensor = f.get_tensor(source)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


# -- one attention module -----------------------------------------------------------------------------------------
def _convert_module(
    model: PreTrainedModel,
    adapter,
    plan: LayerPlan,
    method: ConversionMethod,
    grouping_fn,
    reader: SourceReader,
) -> dict[str, torch.Tensor]:
    """Load one attention module's tensors into its meta module, convert it as `patch` does, and return the
    converted module's tensors by model key. The meta module is emptied again."""
    module: nn.Module = plan.module
    names = [name for name, _ in module.named_parameters()] + [name for name, _ in module.named_buffers()]
    for name in names:
        key = f"{plan.name}.{name}"
        if reader.has(key):
            tensor = reader.read(key)
            set_module_tensor_to_device(module, name, "cpu", value=tensor, dtype=tensor.dtype)
    check_weights(model, [(plan.name, module)])
    weights = convert_weights(adapter.read(module), plan.kv_heads_after, method, grouping_fn, None)
    new = adapter.build(module, weights)
    state = {f"{plan.name}.{name}": t.detach().clone() for name, t in new.state_dict().items()}
    for name in names:
        set_module_tensor_to_device(module, name, "meta")
    return {k: v for k, v in state.items() if reader.has(k)}


# -- config and the other files ----------------------------------------------------------------------------------
def _write_config(
    config: PretrainedConfig,
    adapter,
    plans: list[LayerPlan],
    method: ConversionMethod,
    grouping: str,
    dst: Path,
) -> None:
    """The source config with the converted KV head counts and hf_gqa's metadata, as `patch` records them."""
    text = config.get_text_config(decoder=True)
    for key, value in converted_config(text, adapter, plans, method.label, grouping).items():
        setattr(text, key, value)
    config.save_pretrained(dst)


def _copy_other_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and the like: every file of `src` that is not a weight, index or config."""
    for path in src.iterdir():
        if (
            path.is_file()
            and not path.name.endswith(_WEIGHT_SUFFIXES)
            and path.name
            not in (
                "config.json",
                SAFE_WEIGHTS_INDEX,
            )
        ):
            shutil.copy2(path, dst / path.name)


__all__ = ["CheckpointPlan", "SourceReader", "StreamReport", "convert_checkpoint", "plan_checkpoint"]
