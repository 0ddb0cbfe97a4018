"""Calibrated conversion of a checkpoint on disk, one decoder layer on the compute device at a time.

    hf_gqa.convert_checkpoint("llama-65b/", "llama-65b-gqa8/", groups=8,
                              calibration=texts, tokenizer=tok, device="cuda")      # refine, layer by layer

The model is built on the meta device (`hf_gqa.io.empty_model`). Only the weights outside the decoder layers that
the forward pass needs before the first layer (embeddings, positional embeddings; rotary buffers are built with
the model) are loaded. One forward pass per calibration batch, with every decoder layer temporarily replaced by a
recorder, captures each layer's keyword arguments (masks, position embeddings, ALiBi) and the hidden states
entering layer 0; the embeddings are then freed again. Then, for each decoder layer in order: its weights are read
from the source shards onto `device` (in `compute_dtype`), the per-layer step of the in-memory pipeline runs on it
(`hf_gqa.pipeline.sequential_step`: statistics, merge, refine with drift-corrected targets from the original
trajectory, next hidden states), its converted tensors are cast back to the checkpoint's dtype and handed to the
shard writer, and the layer goes back to the meta device. Output shards are written as soon as all their tensors
are known (layout planned up front, as in the data-free streamed conversion).

Between layers the calibration hidden states live on the CPU (memory-mapped to a temporary file above
`activations_on_disk_above` bytes); during a layer's step they are on `device`.

Dtypes: the layer computes in `compute_dtype` (float32 by default); every written tensor keeps the checkpoint's
dtype. A bf16 checkpoint is thus converted as the in-memory path converts the model loaded in float32, cast back
to bf16 for saving. `compute_dtype=None` computes in each tensor's own checkpoint dtype (as `patch` on the model
loaded with `dtype="auto"`).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .checks import check_options, check_weights
from .errors import GQAError
from .memory import release_freed_memory
from .methods import ConversionMethod, Refine
from .pipeline import SequentialSettings, capture_all_layer_calls, sequential_step

logger = logging.getLogger("hf_gqa")

#: Above this many bytes per copy, calibration hidden states kept between layers go to a memory-mapped temp file.
ACTIVATIONS_ON_DISK_ABOVE = 8 * 2**30
#: Resident memory of a process that has imported hf_gqa and done nothing else (measured, benchmarks/streaming.md).
IMPORTS_BYTES = int(0.37 * 2**30)
#: What refine holds per trained byte: the trained copy, Adam's two moments and the start kept to undo a bad fit.
REFINE_COPIES = 4


# -- estimates -----------------------------------------------------------------------------------------------------
@dataclass
class OnloadEstimate:
    """What a calibrated onloaded conversion will need, from the config and the shapes alone.

    Every figure is bytes. `activation_bytes` is one copy of the calibration hidden states (`tokens x hidden` in
    the compute dtype); `layer_bytes` the largest decoder layer in the compute dtype.
    """

    layers: int
    tokens: int
    block_size: int
    batch_size: int
    hidden_size: int
    compute_dtype: torch.dtype
    device: str
    method: str
    refine_scope: str | None
    layer_bytes: int
    trained_bytes: int  # parameters refine trains (the layer copy, or the converted attention alone)
    # of the original layer's weights, what is freed once the trained copy exists: all of them, or the attention's
    # when refine trains the converted attention alone
    freed_bytes: int
    embedding_bytes: int  # the weights loaded for the capture pass (embeddings), in the compute dtype
    activation_bytes: int
    device_activation_copies: int
    batch_bytes: int  # one batch's temporaries in a layer (MLP / attention intermediates, their gradients)
    source_layer_bytes: int  # the largest decoder layer as read (checkpoint dtype)
    largest_shard_bytes: int

    @property
    def stored_activation_copies(self) -> int:
        """Copies of the hidden states kept between layers: the converted stream and, with drift-corrected refine
        targets, the original model's own trajectory."""
        return 2 if self.device_activation_copies > 2 else 1

    @property
    def stats_bytes(self) -> int:
        """The merge's input statistics: the `[D + 1, D + 1]` float64 second moment of the attention input."""
        return (self.hidden_size + 1) ** 2 * 8

    @property
    def refine_phase_bytes(self) -> int:
        """The fit: the refine state (the trained copy, Adam's two moments, the start kept to undo a bad fit: 4 x
        trained; each gradient is dropped as its parameter steps), plus what is left of the original decoder
        layer once the copy exists (`freed_bytes` less), the layer's activations on the device and one batch's
        temporaries."""
        return (
            self.layer_bytes
            - self.freed_bytes
            + REFINE_COPIES * self.trained_bytes
            + self.device_activation_copies * self.activation_bytes
            + self.batch_bytes
        )

    @property
    def merge_phase_bytes(self) -> int:
        """Statistics and merge: the whole layer, its activations and 4 x the statistics (the second moment, the
        product that updates it, the merge's float64 temporaries; 3.7 x measured on a 3B-shaped layer)."""
        return self.layer_bytes + self.device_activation_copies * self.activation_bytes + 4 * self.stats_bytes

    @property
    def device_peak_bytes(self) -> int:
        """The largest of the fit (`refine_phase_bytes`), the statistics and merge (`merge_phase_bytes`) and the
        capture pass (the embeddings, the activations and one batch)."""
        capture = self.embedding_bytes + self.activation_bytes + self.batch_bytes
        return max(self.refine_phase_bytes, self.merge_phase_bytes, capture)

    @property
    def host_peak_bytes(self) -> int:
        """Resident host memory: the imports and the hidden states kept between layers (unless memory-mapped),
        plus, on a CPU device, the largest of the device's peak, the layer while it is read or written (the
        computed layer beside the layer in the checkpoint dtype) and the output shard with its serialised copy;
        on another device, one layer as read, one output shard and its serialised copy, and the layer copied
        back to be written. Measured against it: `benchmarks/results/streaming.md` (estimate column)."""
        kept = self.stored_activation_copies * self.activation_bytes
        if kept > self.stored_activation_copies * ACTIVATIONS_ON_DISK_ABOVE:
            kept = 0  # memory-mapped: the page cache holds it, the system reclaims it
        shard = self.source_layer_bytes + 2 * self.largest_shard_bytes
        if self.device.startswith("cpu"):  # the device's peak counts the activations it computes on
            io = self.layer_bytes + self.source_layer_bytes
            return IMPORTS_BYTES + max(self.device_peak_bytes, kept + io, kept + shard)
        return IMPORTS_BYTES + kept + shard + self.layer_bytes

    def __str__(self) -> str:
        dtype = str(self.compute_dtype).removeprefix("torch.")
        refine = f", refine scope {self.refine_scope}" if self.refine_scope else ""
        kept = self.layer_bytes - self.freed_bytes
        layer = f"layer {size(kept)} + " if kept else ""
        return (
            f"calibrated ({self.method}{refine}): {self.layers} decoder layers one at a time on {self.device} in "
            f"{dtype}, {self.tokens:,} calibration tokens ({self.tokens // self.block_size} blocks of "
            f"{self.block_size}, batches of {self.batch_size}); estimated peak device memory "
            f"{size(self.device_peak_bytes)} (fit: {layer}refine state "
            f"{size(REFINE_COPIES * self.trained_bytes)} + {self.device_activation_copies} x activations "
            f"{size(self.activation_bytes)} + one batch {size(self.batch_bytes)}; merge: layer "
            f"{size(self.layer_bytes)} + 4 x statistics {size(self.stats_bytes)}); estimated peak host memory "
            f"{size(self.host_peak_bytes)} (activations kept between layers {self.stored_activation_copies} x "
            f"{size(self.activation_bytes)}, one layer as read {size(self.source_layer_bytes)}, output shard 2 x "
            f"{size(self.largest_shard_bytes)}, imports {size(IMPORTS_BYTES)})"
        )


def size(nbytes: int) -> str:
    """`nbytes` in GiB, MiB or KiB, whichever reads best."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{nbytes / 2**10:,.1f} KiB"


def estimate_onload(
    plan,
    method: ConversionMethod,
    tokens: int,
    block_size: int,
    batch_size: int,
    sequential: bool,
    device: str,
    compute_dtype: torch.dtype | None,
) -> OnloadEstimate:
    """Size a calibrated onloaded conversion of the planned checkpoint (`hf_gqa.streaming.CheckpointPlan`)."""
    model = plan.model
    refine = method if isinstance(method, Refine) and method.steps > 0 else None
    settings = SequentialSettings(sequential, refine)
    dtypes = plan.source_dtypes
    itemsize = (compute_dtype or max(dtypes.values(), key=lambda d: d.itemsize)).itemsize
    layer_names = decoder_layer_names(plan.layers)
    state = model.state_dict()
    source_nbytes = {key: state[key].numel() * dtypes[plan.to_source[key]].itemsize for key in plan.to_source}
    per_layer, per_layer_source, widths = [], [], []
    for name in layer_names:
        keys = [k for k in plan.to_source if k.startswith(name + ".")]
        per_layer.append(sum(state[k].numel() for k in keys) * itemsize)
        per_layer_source.append(sum(source_nbytes[k] for k in keys))
        widths.append(max((max(state[k].shape) for k in keys if state[k].dim() == 2), default=0))
    attention = max(sum(p.numel() for p in lp.module.parameters()) for lp in plan.layers) * itemsize
    embedding_keys = capture_keys(model, plan.to_source, layer_names)
    hidden = _hidden_size(model)
    heads = max(lp.num_heads for lp in plan.layers)
    width = max(widths, default=hidden)
    # one batch: q/k/v/o and MLP intermediates, the attention scores, x 2 for what backward keeps in refine
    batch_bytes = 2 * batch_size * block_size * (4 * hidden + 2 * width + heads * block_size) * itemsize
    copies = 2  # the layer's input and its output
    if settings.tracks_original:
        copies += 3  # the original trajectory, its next step and the original attention outputs
    if settings.refine_steps > 0 and settings.refine_scope == "attention":
        copies += 2  # the attention inputs kept for the fit and its targets
    scope = settings.refine_scope if settings.refine_steps > 0 else None
    trained = max(per_layer) if settings.trains_layer_copy else (attention if scope is not None else 0)
    return OnloadEstimate(
        layers=len(plan.layers),
        tokens=tokens,
        block_size=block_size,
        batch_size=batch_size,
        hidden_size=hidden,
        compute_dtype=compute_dtype or max(dtypes.values(), key=lambda d: d.itemsize),
        device=str(device),
        method=method.label,
        refine_scope=scope,
        layer_bytes=max(per_layer),
        trained_bytes=trained,
        freed_bytes=(
            max(per_layer)
            if settings.frees_original_layer
            else (attention if settings.frees_original_attention else 0)
        ),
        embedding_bytes=sum(state[k].numel() for k in embedding_keys) * itemsize,
        activation_bytes=tokens * hidden * itemsize,
        device_activation_copies=copies,
        batch_bytes=batch_bytes,
        source_layer_bytes=max(per_layer_source),
        largest_shard_bytes=plan.largest_shard_bytes,
    )


def _hidden_size(model: nn.Module) -> int:
    embeddings = model.get_input_embeddings()
    return int(embeddings.weight.shape[-1])


# -- which tensor is where -----------------------------------------------------------------------------------------
def decoder_layer_names(plans: Sequence) -> list[str]:
    """The decoder layer holding each planned attention module (its parent), in order."""
    return [p.name.rpartition(".")[0] for p in plans]


def layer_keys(to_source: dict[str, str], layer_names: list[str]) -> list[list[str]]:
    """Per decoder layer, the model tensor names of the checkpoint under it."""
    by_layer: list[list[str]] = [[] for _ in layer_names]
    index = {name: i for i, name in enumerate(layer_names)}
    for key in to_source:
        prefix = key.rpartition(".")[0]
        while prefix and prefix not in index:
            prefix = prefix.rpartition(".")[0]
        if prefix:
            by_layer[index[prefix]].append(key)
    return by_layer


def capture_keys(model: nn.Module, to_source: dict[str, str], layer_names: list[str]) -> list[str]:
    """The checkpoint tensors the capture pass needs: everything outside the decoder layers except the output
    embeddings (the pass stops at the last decoder layer; an lm_head is the largest tensor of many models)."""
    inside = {k for keys in layer_keys(to_source, layer_names) for k in keys}
    output = model.get_output_embeddings()
    skip = set()
    if output is not None and output is not model.get_input_embeddings():
        prefix = next(name for name, m in model.named_modules() if m is output)
        skip = {f"{prefix}.{name}" for name, _ in output.named_parameters()}
    return [k for k in to_source if k not in inside and k not in skip]


# -- loading and freeing weights -----------------------------------------------------------------------------------
def load_tensors(
    model: nn.Module,
    keys: list[str],
    reader,
    device: str | torch.device,
    compute_dtype: torch.dtype | None,
) -> None:
    """Read each model tensor `keys` from the source and place it in `model` on `device` (in `compute_dtype`, or
    its checkpoint dtype when None)."""
    for key in keys:
        tensor = reader.read(key)
        dtype = compute_dtype if tensor.is_floating_point() and compute_dtype is not None else tensor.dtype
        set_module_tensor_to_device(model, key, device, value=tensor, dtype=dtype)


def free_tensors(model: nn.Module, keys: list[str]) -> None:
    """Put the tensors `keys` of `model` back on the meta device."""
    for key in keys:
        set_module_tensor_to_device(model, key, "meta")


def free_tensors_under(model: nn.Module, keys: list[str], name: str) -> None:
    """Put those of the tensors `keys` of `model` that belong to submodule `name` back on the meta device, and
    hand the heap pages freed so far back to the system. Called just before a layer's fit, after the merge: its
    many small float64 temporaries leave freed pages in glibc's heap (measured on a 3B-shaped layer: 0.2 GiB of
    the fit's peak resident set, gone with this trim)."""
    free_tensors(model, [key for key in keys if key.startswith(name + ".")])
    release_freed_memory()


def buffers_to(module: nn.Module, device: str | torch.device, skip: tuple[str, ...] = ()) -> None:
    """Move the materialised buffers of `module` (rotary frequencies and the like, built with the model) to
    `device`, leaving those under the prefixes `skip` alone."""
    for name, buffer in list(module.named_buffers()):
        if (
            buffer.device.type != "meta"
            and buffer.device != torch.device(device)
            and not name.startswith(skip)
        ):
            set_module_tensor_to_device(module, name, device)


# -- the calibration activations between layers --------------------------------------------------------------------
class ActivationStore:
    """One copy of the calibration hidden states between layers, per batch `[batch, seq, hidden]`, on the CPU:
    in memory, or in a memory-mapped temporary file when larger than `on_disk_above` bytes."""

    def __init__(self, on_disk_above: int, folder: str | None = None) -> None:
        self.on_disk_above, self.folder = on_disk_above, folder
        self.tensors: list[torch.Tensor] | None = None
        self.file = None

    @property
    def on_disk(self) -> bool:
        return self.file is not None

    def put(self, tensors: list[torch.Tensor]) -> None:
        """Keep `tensors` (on any device), replacing what was kept."""
        total = sum(t.numel() * t.element_size() for t in tensors)
        if total <= self.on_disk_above:
            self.tensors = [t.to("cpu") for t in tensors]
            return
        if self.file is None or sum(t.numel() for t in self.tensors) != sum(t.numel() for t in tensors):
            self._map(tensors)
        for view, t in zip(self.tensors, tensors):
            view.copy_(t)

    def _map(self, like: list[torch.Tensor]) -> None:
        self.close()
        self.file = tempfile.NamedTemporaryFile(prefix="hf_gqa_activations_", dir=self.folder)
        numel = sum(t.numel() for t in like)
        flat = torch.from_file(self.file.name, shared=True, size=numel, dtype=like[0].dtype)
        views, offset = [], 0
        for t in like:
            views.append(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        self.tensors = views

    def get(self, device: str | torch.device) -> list[torch.Tensor]:
        """The kept tensors on `device` (the kept ones themselves on the CPU)."""
        return [t.to(device) for t in self.tensors]

    def close(self) -> None:
        self.tensors = None
        if self.file is not None:
            self.file.close()
            self.file = None


# -- writing the output --------------------------------------------------------------------------------------------
class ShardWriter:
    """Writes the planned output shards as soon as every converted tensor of a shard is known; the tensors the
    conversion does not touch are read from the source then (as they are, same dtype)."""

    def __init__(self, layout, reader, dst: Path, converted_keys: set[str]) -> None:
        self.layout, self.reader, self.dst = layout, reader, dst
        self.converted_keys = converted_keys
        self.pending: dict[str, torch.Tensor] = {}
        self.written: set[str] = set()
        self.bytes_written = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self.pending.update(tensors)
        self.flush()

    def flush(self) -> None:
        for filename, keys in self.layout.filename_to_tensors.items():
            if filename in self.written or any(
                k in self.converted_keys and k not in self.pending for k in keys
            ):
                continue
            tensors = {k: self.pending.pop(k) if k in self.pending else self.reader.read(k) for k in keys}
            self.bytes_written += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(
                {k: t.contiguous() for k, t in tensors.items()},
                str(self.dst / filename),
                metadata={"format": "pt"},
            )
            self.written.add(filename)
            del tensors
            release_freed_memory()

    @property
    def done(self) -> bool:
        return len(self.written) == len(self.layout.filename_to_tensors)


# -- the conversion ------------------------------------------------------------------------------------------------
@dataclass
class OnloadResult:
    """What the layer loop produced: per-layer logs and seconds, the bytes written, the calibration tokens."""

    logs: list[dict]
    seconds_per_layer: list[float]
    bytes_written: int
    tokens: int
    activations_on_disk: bool


def converted_layer_state(
    model: nn.Module, layer_name: str, replacement, keys: list[str], dtypes: dict[str, torch.dtype]
) -> dict[str, torch.Tensor]:
    """The converted decoder layer's checkpoint tensors `{model key: tensor}` on the CPU, each in its checkpoint
    dtype `dtypes[key]`. The replacement is swapped in to read them and the model left as it was found."""
    parent, attr, old, new = replacement
    setattr(parent, attr, new)
    try:
        layer = model.get_submodule(layer_name)
        state = layer.state_dict()
    finally:
        setattr(parent, attr, old)
    wanted = set(keys)
    out = {}
    for name, tensor in state.items():
        key = f"{layer_name}.{name}"
        if key in wanted:
            out[key] = tensor.detach().to(device="cpu", dtype=dtypes[key]).clone()
    return out


#: glibc's mmap threshold during an onloaded run (planning included): `low_memory` (what is freed leaves the
#: resident set at once) or not (allocations up to 32 MiB come from the heap, without a page fault each; see
#: `convert_checkpoint`). Building a meta model maps its (untouched) parameter blocks whatever this says
#: (`hf_gqa.io.empty_model`).
MMAP_THRESHOLD = {True: 1 << 20, False: 32 << 20}


def run_onloaded(
    plan,
    conversion,
    settings: SequentialSettings,
    writer: ShardWriter,
    device: str | torch.device,
    compute_dtype: torch.dtype | None,
    estimate: OnloadEstimate,
    activations_on_disk_above: int = ACTIVATIONS_ON_DISK_ABOVE,
    show_progress: bool = True,
) -> OnloadResult:
    """Capture the layers' calls on the embeddings alone, then convert decoder layer after decoder layer, each
    loaded on `device`, converted by `sequential_step`, handed to `writer` and freed. `convert_checkpoint` runs
    it, and the planning before it, with glibc's mmap threshold fixed (`MMAP_THRESHOLD`)."""
    model, reader, plans = plan.model, writer.reader, plan.layers
    layer_names = decoder_layer_names(plans)
    keys_by_layer = layer_keys(plan.to_source, layer_names)
    dtypes = {key: plan.source_dtypes[plan.to_source[key]] for key in plan.to_source}
    layers = [model.get_submodule(name) for name in layer_names]
    model.eval()  # no dropout in calibration or refinement
    embedding_keys = capture_keys(model, plan.to_source, layer_names)
    load_tensors(model, embedding_keys, reader, device, compute_dtype)
    buffers_to(model, device)
    blocks = conversion.blocks
    hidden, calls = capture_all_layer_calls(model, layers, blocks, conversion.batch_size, device)
    free_tensors(model, embedding_keys)
    stored, original = (
        ActivationStore(activations_on_disk_above),
        ActivationStore(activations_on_disk_above),
    )
    stored.put(hidden)
    if settings.tracks_original:
        original.put(hidden)
    del hidden
    logs, seconds = [], []
    tokens = int(blocks.numel())
    bar = tqdm(total=len(plans), desc="hf_gqa: converting layers", disable=not show_progress, unit="layer")
    try:
        for i, (lp, layer) in enumerate(zip(plans, layers)):
            start = time.perf_counter()
            load_tensors(model, keys_by_layer[i], reader, device, compute_dtype)
            check_weights(model, [(lp.name, lp.module)])
            step = sequential_step(
                model,
                i,
                lp,
                layer,
                calls[i],
                stored.get(device),
                original.get(device) if settings.tracks_original else None,
                conversion.convert_layer,
                settings,
                release_original=partial(free_tensors_under, model, keys_by_layer[i]),
            )
            # the model keeps the original (meta) modules; the converted one is not bound to a name here, which
            # would keep it (and the MLP it may share with the original layer) alive through the next layer
            parent, attr, old = step.replacement[:3]
            setattr(parent, attr, old)
            stored.put(step.hidden)
            if settings.tracks_original:
                original.put(step.original_hidden)
            state = converted_layer_state(model, layer_names[i], step.replacement, keys_by_layer[i], dtypes)
            logs.append(step.log)
            del step
            free_tensors(model, keys_by_layer[i])
            calls[i] = []
            writer.add(state)
            del state
            release_freed_memory()
            seconds.append(time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix_str(_progress_note(seconds, len(plans), tokens))
            logger.debug("layer %d: %s (%.1f s)", i, logs[-1], seconds[-1])
    finally:
        bar.close()
        on_disk = stored.on_disk
        stored.close()
        original.close()
    writer.flush()
    if not writer.done:
        raise GQAError("internal error: some output shards were not written")  # pragma: no cover
    return OnloadResult(logs, seconds, writer.bytes_written, tokens, on_disk)


def _progress_note(seconds: list[float], total: int, tokens: int) -> str:
    """`tokens, s/layer, projected total` for the progress bar (the first layer pays for warm-up: projected from
    the mean of the later ones once there are some)."""
    recent = seconds[1:] or seconds
    per_layer = sum(recent) / len(recent)
    projected = seconds[0] + per_layer * (total - 1) if len(seconds) > 1 else per_layer * total
    return f"{tokens:,} tokens, {per_layer:.1f} s/layer, projected total {_duration(projected)}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def announce(line: str, show_progress: bool) -> None:
    """The one line a run states before its heavy work: logged, and on standard error with a progress bar."""
    logger.info("hf_gqa: %s", line)
    if show_progress:
        tqdm.write(f"hf_gqa: {line}", file=sys.stderr)


def resolve_conversion(
    plan,
    calibration,
    tokenizer,
    calibration_tokens: int,
    block_size: int,
    batch_size: int,
    sequential: bool,
    seed: int,
    refine: dict[str, object],
    show_progress: bool,
):
    """`hf_gqa.patch`'s resolution (method, grouping, calibration blocks) on the meta model, with the same checks
    and messages; returns its `Conversion`."""
    from .patch import _resolve

    check_options(calibration_tokens, block_size, batch_size, refine.get("steps"), None, 1)
    return _resolve(
        plan.model,
        False,
        plan.method_spec,
        False,
        plan.grouping,
        calibration,
        tokenizer,
        refine,
        dict(tokens=calibration_tokens, block_size=block_size, seed=seed),
        batch_size,
        sequential,
        None,
        show_progress,
    )


def planned_tokens(calibration_tokens: int, block_size: int) -> int:
    """Calibration tokens a run will use at most: whole blocks."""
    return max(1, calibration_tokens // block_size) * block_size


__all__ = [
    "ACTIVATIONS_ON_DISK_ABOVE",
    "ActivationStore",
    "OnloadEstimate",
    "estimate_onload",
    "run_onloaded",
]
