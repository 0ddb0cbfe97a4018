"""Peak memory and wall time of a streamed data-free conversion against the in-memory path, by model size.

For each size, a random Llama-shaped multi-head model is written as a sharded bf16 safetensors checkpoint (tensor by
tensor, never the whole model in memory). Each path then runs in a fresh Python process and its peak resident set
size (`ru_maxrss` of the child, which includes the Python, torch and transformers imports) is recorded:

- streamed: `hf_gqa.convert_checkpoint(src, dst, groups, max_shard_size=...)` (mean pooling);
- in-memory: `AutoModelForCausalLM.from_pretrained(src, dtype="auto")`, `hf_gqa.patch`, `save_pretrained`.

The two outputs are compared tensor for tensor. Results go to `<out>/streaming.{json,md,png}` with the command,
versions and machine.

    python benchmarks/streaming.py --sizes 0.1b,0.5b,1b,3b --groups 4 --work /tmp/hf_gqa_streaming
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

#: Llama shapes (vocabulary 32000, multi-head): hidden, intermediate, layers, heads.
SIZES = {
    "tiny": (256, 512, 2, 4),  # a smoke test of the script
    "0.1b": (768, 2048, 12, 12),
    "0.5b": (1536, 4096, 16, 16),
    "1b": (2048, 5632, 22, 32),
    "3b": (3072, 8192, 26, 24),
}

MAKE = """
import sys, torch
from accelerate import init_empty_weights
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig
import json
hidden, inter, layers, heads, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                     tie_word_embeddings=False, dtype="bfloat16")
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
state = model.state_dict()
split = split_torch_state_dict_into_shards(state, max_shard_size="1GB")
g = torch.Generator().manual_seed(0)
for name, keys in split.filename_to_tensors.items():
    tensors = {k: (torch.randn(state[k].shape, generator=g) * 0.02).to(torch.bfloat16) for k in keys}
    save_file(tensors, f"{out}/{name}", metadata={"format": "pt"})
    del tensors
if split.is_sharded:
    json.dump({"metadata": {}, "weight_map": split.tensor_to_filename}, open(f"{out}/model.safetensors.index.json", "w"))
config.save_pretrained(out)
print(sum(t.numel() for t in state.values()))
"""

STREAM = """
import sys, time, hf_gqa
t = time.perf_counter()
report = hf_gqa.convert_checkpoint(sys.argv[1], sys.argv[2], groups=int(sys.argv[3]), max_shard_size=sys.argv[4],
                                   show_progress=False)
print(time.perf_counter() - t)
"""

IN_MEMORY = """
import sys, time, torch, hf_gqa
from transformers import AutoModelForCausalLM
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
hf_gqa.patch(model, groups=int(sys.argv[3]))
model.save_pretrained(sys.argv[2])
print(time.perf_counter() - t)
"""

COMPARE = """
import sys, torch
from safetensors import safe_open
from pathlib import Path
def tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys())[:5])
bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
print(len(bad))
"""


#: Runs one command and prints, last, the peak RSS (KiB) of that command alone (a fresh RUSAGE_CHILDREN).
WRAPPER = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def child(code: str, *args: str, threads: int) -> tuple[str, int]:
    """Run `code` in a fresh interpreter; returns its stdout's last line and its peak RSS in bytes."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", WRAPPER, sys.executable, "-c", code, *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    lines = done.stdout.strip().splitlines()
    return lines[-2], int(lines[-1]) * 1024


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure(size: str, work: Path, groups: int, shard: str, threads: int) -> dict:
    hidden, inter, layers, heads = SIZES[size]
    src = work / f"{size}-src"
    if not (src / "config.json").exists():
        src.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", MAKE, *map(str, SIZES[size]), str(src)], check=True)
    row: dict = {"size": size, "hidden": hidden, "intermediate": inter, "layers": layers, "heads": heads}
    row["checkpoint_bytes"] = folder_bytes(src)
    for path, code in (("streamed", STREAM), ("in_memory", IN_MEMORY)):
        dst = work / f"{size}-{path}"
        subprocess.run(["rm", "-rf", str(dst)], check=True)
        start = time.perf_counter()
        inner, peak = child(code, str(src), str(dst), str(groups), shard, threads=threads)
        row[path] = {
            "wall_s": round(time.perf_counter() - start, 1),
            "convert_s": round(float(inner), 1),
            "peak_rss_bytes": peak,
            "peak_rss_over_checkpoint": round(peak / row["checkpoint_bytes"], 3),
            "output_bytes": folder_bytes(dst),
        }
    mismatched, _ = child(
        COMPARE, str(work / f"{size}-streamed"), str(work / f"{size}-in_memory"), threads=threads
    )
    row["tensors_differing"] = int(mismatched)
    row["streamed_over_in_memory_peak"] = round(
        row["streamed"]["peak_rss_bytes"] / row["in_memory"]["peak_rss_bytes"], 3
    )
    return row


def environment() -> dict:
    from hf_gqa.evaluation.common import environment as env

    return env()


def write(rows: list[dict], out: Path, command: str, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / "streaming.json").write_text(
        json.dumps({"command": command, "settings": settings, "environment": env, "rows": rows}, indent=2)
    )
    gib = 2**30
    lines = [
        "# Streamed data-free conversion against the in-memory path",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {env['machine']['cpu']}, {env['machine']['cpu_cores']} cores, {env['machine']['platform']}; "
        f"{settings['threads']} threads; load average before: {env['machine']['load_average']}; date {env['date']}; "
        "versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v),
        "",
        f"Random Llama-shaped multi-head models (vocabulary 32000) saved as sharded bf16 safetensors, converted to "
        f"{settings['groups']} KV heads by mean pooling; streamed with max_shard_size={settings['max_shard_size']}. "
        "Peak RSS of a fresh process per path (Python, torch and transformers imports included: a process that "
        "imports hf_gqa and does nothing else peaks at about 0.37 GiB). In-memory: from_pretrained(dtype='auto'), "
        "patch, save_pretrained. Both outputs compared tensor for tensor (last column).",
        "",
        "| size | parameters (layers x hidden) | checkpoint | streamed peak RSS | streamed / checkpoint | in-memory peak RSS "
        "| streamed / in-memory | streamed s | in-memory s | tensors differing |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, m = r["streamed"], r["in_memory"]
        lines.append(
            f"| {r['size']} | {r['layers']} x {r['hidden']} | {r['checkpoint_bytes'] / gib:.2f} GiB | "
            f"{s['peak_rss_bytes'] / gib:.2f} GiB | {s['peak_rss_over_checkpoint']:.1%} | "
            f"{m['peak_rss_bytes'] / gib:.2f} GiB | {r['streamed_over_in_memory_peak']:.1%} | {s['convert_s']} | "
            f"{m['convert_s']} | {r['tensors_differing']} |"
        )
    (out / "streaming.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    sizes = [r["checkpoint_bytes"] / gib for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        sizes,
        [r["in_memory"]["peak_rss_bytes"] / gib for r in rows],
        "o-",
        label="in memory (load, patch, save)",
    )
    ax.plot(
        sizes,
        [r["streamed"]["peak_rss_bytes"] / gib for r in rows],
        "o-",
        label="streamed (convert_checkpoint)",
    )
    ax.plot(sizes, sizes, ":", color="grey", label="checkpoint size")
    ax.set_xlabel("bf16 checkpoint (GiB)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("Data-free conversion: peak memory against model size")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "streaming.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="0.1b,0.5b,1b,3b")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--max-shard-size", default="200MB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/hf_gqa_streaming", help="where checkpoints are written")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/streaming.py", *sys.argv[1:]])
    rows = []
    for size in args.sizes.split(","):
        row = measure(size, Path(args.work), args.groups, args.max_shard_size, args.threads)
        print(json.dumps(row), flush=True)
        rows.append(row)
    write(
        rows,
        Path(args.out),
        command,
        {"groups": args.groups, "max_shard_size": args.max_shard_size, "threads": args.threads},
    )


if __name__ == "__main__":
    main()
