"""GQA x a quantized KV cache on SmolLM2-135M: what the two together cost in quality, and what they save.

Models: the original SmolLM2-135M-Instruct (3 KV heads per layer; the packaged GGUF de-quantized to fp32, see
`hf_gqa.default_model`) and the same model converted to 1 KV head per layer: by mean pooling
(`hf_gqa.patch(model, groups=1)`, the default: instant), with `--calibrated` by the calibrated default
(`hf_gqa.patch(model, groups=1, calibration=hf_gqa.data.calibration_text(), tokenizer=tok)`, about 10 minutes on
2 cores), or with `--converted PATH` loaded from a checkpoint saved by hf_gqa (`hf_gqa.from_pretrained`).

Caches (`--caches`, default every one the installed backends offer): `float` (hf_gqa's `GQACache`, fp32) and
transformers' `QuantizedCache` (`generate(cache_implementation="quantized", cache_config=...)`): `quanto-int4`,
`quanto-int2` (optimum-quanto stores 2 or 4 bits only), `hqq-int8`, `hqq-int4`, `hqq-int2` (also `hqq-int3`,
`hqq-int1`) and `fp8` (transformers' own float8_e4m3fn with a per-tensor scale). Group-wise backends quantize in
groups of `--q-group-size` values (default 64 = SmolLM2's head_dim) along transformers' default axis 0: for quanto
a group is one token's head vector; for HQQ a group is a strided column of the tensor viewed as
`[q_group_size, n / q_group_size]` (HQQ's own layout for axis 0).

For each model and cache:

- KV bytes per token: `hf_gqa.describe(model, cache_config=...)` (packed codes plus one scale and one
  zero-point per group in the cache's dtype; see `hf_gqa.cache.KVQuantization`), and the bytes the cache really
  held per token at the end of the quality pass (all of it quantized there, as `residual_length` is 0).
- held-out perplexity THROUGH the cache: the first `--windows` x `--max-tokens` tokens of the held-out Wikipedia
  text (`hf_gqa/data/text/wikipedia_heldout.txt`, never used for calibration), each window fed from an empty
  cache in chunks of `--chunk` tokens with `residual_length=--residual-length` (default 0): every chunk attends
  to the keys and values of all earlier chunks as the cache holds them, i.e. after quantization, and to its own
  in float. `--chunk 1` is token-by-token decoding (exact, and `chunk` times slower); a chunk of C with residual
  0 shows each token on average C/2 float neighbours, as a decode with `residual_length` about C would.
- next-token agreement and KL divergence with the original model's float-cache logits on the same tokens.
- decode tokens/s: `generate()` greedy, batch 1, the first `--prompt-tokens` tokens of the held-out text as
  prompt, `--new-tokens` new tokens, the median of `--speed-runs` runs after one warm-up, with the same cache
  at transformers' default `residual_length` (`--speed-residual-length`, 128).

Writes `<out>/quantized_cache.{json,md,png}` (the plot: perplexity against KV bytes per token, every point
labelled) with the command, versions and machine.

    python benchmarks/quantized_cache.py                                   # mean-pooled conversion
    python benchmarks/quantized_cache.py --calibrated --save-converted kv1/ # calibrated conversion (+10 min)
    python benchmarks/quantized_cache.py --converted kv1/                  # the same, converted before
    python benchmarks/quantized_cache.py --max-tokens 128 --speed-runs 1 --new-tokens 16 --out /tmp/qc  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
NAME = "quantized_cache"
#: Every cache the script knows: name -> `cache_config` (None: the float cache).
CACHES = {
    "float": None,
    "fp8": {"backend": "fp8"},
    "quanto-int4": {"backend": "quanto", "nbits": 4},
    "quanto-int2": {"backend": "quanto", "nbits": 2},
    "hqq-int8": {"backend": "hqq", "nbits": 8},
    "hqq-int4": {"backend": "hqq", "nbits": 4},
    "hqq-int3": {"backend": "hqq", "nbits": 3},
    "hqq-int2": {"backend": "hqq", "nbits": 2},
    "hqq-int1": {"backend": "hqq", "nbits": 1},
}
DEFAULT_CACHES = ["float", "fp8", "quanto-int4", "quanto-int2", "hqq-int8", "hqq-int4", "hqq-int2"]
PACKAGES = {"quanto": "optimum.quanto", "hqq": "hqq.core.quantize"}
HELDOUT = "Wikipedia articles (hf_gqa/data/text/wikipedia_heldout.txt, CC BY-SA), never used for calibration"


def available(name: str) -> str | None:
    """Why cache `name` cannot run here (None if it can)."""
    cfg = CACHES[name]
    backend = cfg and cfg["backend"]
    if backend in PACKAGES:
        try:
            __import__(PACKAGES[backend])
        except Exception as err:  # noqa: BLE001  (any import failure: report it as the reason)
            return f"{type(err).__name__}: {err}"
    return None


def cache_config(name: str, args, residual_length: int) -> dict | None:
    cfg = CACHES[name]
    if cfg is None or cfg["backend"] == "fp8":
        return cfg
    return {**cfg, "q_group_size": args.q_group_size, "residual_length": residual_length}


def new_cache(model, cfg: dict | None):
    from hf_gqa.cache import GQACache, quantized_cache

    if cfg is None:
        return GQACache(config=model.config.get_text_config(decoder=True))
    return quantized_cache(model, cfg)


@torch.inference_mode()
def logits_through_cache(model, ids: torch.Tensor, cfg: dict | None, chunk: int):
    """Float32 logits `[n, vocab]` of `ids [n]` fed in chunks into one new cache, and that cache."""
    from hf_gqa import compat

    cache = new_cache(model, cfg)
    out = []
    for start in range(0, ids.shape[0], chunk):
        piece = ids[start : start + chunk].unsqueeze(0)
        logits = model(input_ids=piece, use_cache=True, **compat.cache_kwargs(cache)).logits
        out.append(logits[0].float())
    return torch.cat(out), cache


def score(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token losses, predictions) of logits `[n, vocab]` for `ids [n]`."""
    loss = F.cross_entropy(logits[:-1], ids[1:], reduction="sum")
    return loss.item(), ids.shape[0] - 1


def kl_and_agreement(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, int, int]:
    """(sum over positions of KL(reference || logits), agreeing argmaxes, positions)."""
    log_p, log_q = reference.log_softmax(-1), logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).sum().item()
    agree = int((logits.argmax(-1) == reference.argmax(-1)).sum())
    return kl, agree, logits.shape[0]


@torch.inference_mode()
def decode_speed(model, prompt: torch.Tensor, cfg: dict | None, new_tokens: int, runs: int) -> list[float]:
    """Seconds of `runs` greedy `generate()` calls (after one warm-up) of `new_tokens` tokens from `prompt`."""
    kwargs = {} if cfg is None else {"cache_implementation": "quantized", "cache_config": cfg}
    seconds = []
    for i in range(runs + 1):
        start = time.perf_counter()
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
        if i:
            seconds.append(time.perf_counter() - start)
    return seconds


def measure(
    model, label: str, kv_heads: str, windows: list[torch.Tensor], references, prompt, args
) -> list[dict]:
    import hf_gqa
    from hf_gqa.cache import KVQuantization

    rows = []
    for name in args.caches:
        cfg = cache_config(name, args, args.residual_length)
        started = time.perf_counter()
        loss = kl = 0.0
        predictions = agree = positions = 0
        held_bytes = held_tokens = 0
        for ids, reference in zip(windows, references):
            logits, cache = logits_through_cache(model, ids, cfg, args.chunk)
            s, n = score(logits, ids)
            loss, predictions = loss + s, predictions + n
            k, a, p = kl_and_agreement(logits, reference)
            kl, agree, positions = kl + k, agree + a, positions + p
            held_bytes, held_tokens = held_bytes + cache.nbytes(), held_tokens + ids.shape[0]
            kv = cache.kv_heads()
            del cache
        quality_s = time.perf_counter() - started
        description = hf_gqa.describe(model, cache_config=cfg)
        per_token = (
            description.bytes_per_token_after if cfg is None else description.bytes_per_token_quantized
        )
        speed_cfg = cache_config(name, args, args.speed_residual_length)
        seconds = decode_speed(model, prompt, speed_cfg, args.new_tokens, args.speed_runs)
        row = {
            "model": label,
            "kv_heads": kv_heads,
            "cache": name,
            "cache_config": cfg,
            "cache_label": "float32" if cfg is None else KVQuantization.from_config(cfg).label(),
            "cache_kv_heads": sorted(set(kv)),
            "kv_bytes_per_token": per_token,
            "held_bytes_per_token": held_bytes / held_tokens,
            "perplexity": math.exp(loss / predictions),
            "predictions": predictions,
            "next_token_agreement": agree / positions,
            "kl_divergence": kl / positions,
            "decode_s": seconds,
            "decode_tokens_per_s": args.new_tokens / statistics.median(seconds),
            "quality_seconds": quality_s,
        }
        rows.append(row)
        print(
            f"{label:>28} {name:>12}: {per_token:>9,.0f} B/token (held {row['held_bytes_per_token']:,.0f}), "
            f"ppl {row['perplexity']:.2f}, agreement {row['next_token_agreement']:.3f}, "
            f"KL {row['kl_divergence']:.4f}, decode {row['decode_tokens_per_s']:.1f} tok/s "
            f"({quality_s:.0f} s)",
            flush=True,
        )
    return rows


# -- report ----------------------------------------------------------------------------------------------------
def frontier(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both KV bytes per token and perplexity, by bytes."""
    ordered = sorted(rows, key=lambda r: (r["kv_bytes_per_token"], r["perplexity"]))
    out, best = [], math.inf
    for r in ordered:
        if r["perplexity"] < best:
            out.append(r)
            best = r["perplexity"]
    return out


def to_markdown(result: dict) -> str:
    s, env = result["settings"], result["environment"]
    machine = env["machine"]
    rows = result["rows"]
    base = next(r for r in rows if r["kv_heads"] == "3" and r["cache"] == "float")
    on_frontier = {(r["model"], r["cache"]) for r in frontier(rows)}
    lines = [
        "# GQA x a quantized KV cache: SmolLM2-135M-Instruct",
        "",
        f"- command: `{s['command']}`",
        f"- date: {env['date']}; machine: {machine['cpu']}, {machine['cpu_cores']} cores, "
        f"{machine['torch_threads']} torch threads; load average at the end {machine.get('load_average')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        f"- models: {'; '.join(s['models'])}",
        f"- quality: held-out perplexity through the cache on {s['windows']} x {s['max_tokens']} tokens of "
        f"{HELDOUT} ({rows[0]['predictions']} predictions), each window fed from an empty cache in chunks of "
        f"{s['chunk']} token(s) with `residual_length={s['residual_length']}`: every chunk reads the K/V of the "
        "earlier chunks as the cache stores them (quantized) and its own in float. Next-token agreement and KL "
        "divergence are against the original model's float-cache logits on the same tokens.",
        f"- group-wise backends: groups of {s['q_group_size']} values, transformers' default axis 0; scales and "
        "zero-points in the cache's dtype (fp32 here)",
        f"- decode: `generate()` greedy, batch 1, {s['prompt_tokens']}-token prompt (the held-out text), "
        f"{s['new_tokens']} new tokens, median of {s['speed_runs']} runs after a warm-up, the same cache with "
        f"`residual_length={s['speed_residual_length']}` (transformers' default)",
        "- KV bytes/token: `hf_gqa.describe(model, cache_config=...)` (packed codes + one scale and one zero-point "
        "per group); `held`: the bytes the cache really held at the end of the quality pass, per token.",
        "",
        "| model | KV heads | cache | KV bytes/token | vs original float | held bytes/token | perplexity "
        "| next-token agreement | KL (nats) | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = "**" if (r["model"], r["cache"]) in on_frontier else ""
        lines.append(
            f"| {r['model']} | {r['kv_heads']} | {r['cache']} | {r['kv_bytes_per_token']:,.0f} "
            f"| {base['kv_bytes_per_token'] / r['kv_bytes_per_token']:.1f}x smaller "
            f"| {r['held_bytes_per_token']:,.0f} | {mark}{r['perplexity']:.2f}{mark} "
            f"| {r['next_token_agreement']:.3f} | {r['kl_divergence']:.4f} | {r['decode_tokens_per_s']:.1f} |"
        )
    lines += [
        "",
        "Bold: on the frontier (no other row has both fewer KV bytes per token and a lower perplexity).",
        "",
        f"![perplexity against KV bytes per token]({NAME}.png)",
    ]
    if any("mean" in r["model"] for r in rows):
        lines += [
            "",
            "Mean pooling without calibration leaves SmolLM2 3 -> 1 far from working (see the README's strategies "
            "table), so its rows measure quantization on a broken model; `--calibrated` or `--converted PATH` "
            "gives the conversion worth combining with a quantized cache.",
        ]
    if result.get("skipped"):
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items())]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(9, 6))
    markers, colors, placed = {}, {}, []
    for r in rows:
        marker = markers.setdefault(r["model"], "os^D"[len(markers) % 4])
        color = colors.setdefault(r["cache"], f"C{len(colors) % 10}")
        x, y = r["kv_bytes_per_token"], r["perplexity"]
        ax.scatter(x, y, marker=marker, color=color, s=40, zorder=3)
        # labels of points close together (same bytes, similar perplexity) are stacked upwards
        near = sum(abs(math.log(x / px)) < 0.15 and abs(math.log(y / py)) < 0.15 for px, py in placed)
        placed.append((x, y))
        ax.annotate(
            f"{r['kv_heads']} KV, {r['cache']}",
            (x, y),
            textcoords="offset points",
            xytext=(5, 4 + 10 * near),
            fontsize=8,
        )
    front = frontier(rows)
    ax.plot(
        [r["kv_bytes_per_token"] for r in front],
        [r["perplexity"] for r in front],
        "k--",
        lw=0.8,
        label="frontier",
        zorder=2,
    )
    for model, marker in markers.items():
        ax.scatter([], [], marker=marker, color="gray", label=model)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("KV-cache bytes per token (log)")
    ax.set_ylabel("held-out perplexity through the cache (log)")
    s = result["settings"]
    ax.set_title(
        f"SmolLM2-135M: GQA x KV quantization ({s['windows']} x {s['max_tokens']} tokens, chunk {s['chunk']}, "
        f"residual {s['residual_length']})",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--caches", nargs="+", default=DEFAULT_CACHES, choices=list(CACHES))
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens per held-out window")
    parser.add_argument("--windows", type=int, default=1, help="consecutive held-out windows")
    parser.add_argument(
        "--chunk", type=int, default=16, help="tokens per forward through the cache (1: decode)"
    )
    parser.add_argument("--residual-length", type=int, default=0, help="float window of the quality pass")
    parser.add_argument("--q-group-size", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--speed-runs", type=int, default=3)
    parser.add_argument("--speed-residual-length", type=int, default=128)
    conversion = parser.add_mutually_exclusive_group()
    conversion.add_argument("--calibrated", action="store_true", help="convert with the calibrated default")
    conversion.add_argument("--converted", metavar="PATH", help="a 1-KV-head checkpoint saved by hf_gqa")
    parser.add_argument("--save-converted", metavar="PATH", help="save the converted model (for --converted)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    import hf_gqa
    from hf_gqa import data, default_model

    skipped = {name: why for name in args.caches if (why := available(name))}
    args.caches = [name for name in args.caches if name not in skipped]
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)

    model, tok = default_model.load()
    text_ids = tok(data.read_text(data.HELDOUT_TEXT)[: 8 * args.max_tokens * args.windows + 10_000]).input_ids
    ids = torch.tensor(text_ids, dtype=torch.long)
    windows = [ids[i * args.max_tokens : (i + 1) * args.max_tokens] for i in range(args.windows)]
    prompt = ids[: args.prompt_tokens].unsqueeze(0)
    references = [logits_through_cache(model, w, None, args.max_tokens)[0] for w in windows]

    command = "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    settings = {
        "command": command,
        "models": ["original: SmolLM2-135M-Instruct, 3 KV heads per layer"],
        "caches": args.caches,
        "max_tokens": args.max_tokens,
        "windows": args.windows,
        "chunk": args.chunk,
        "residual_length": args.residual_length,
        "q_group_size": args.q_group_size,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "speed_runs": args.speed_runs,
        "speed_residual_length": args.speed_residual_length,
        "dtype": "float32",
    }
    out = Path(args.out)
    rows = measure(model, "original", "3", windows, references, prompt, args)
    save(out, settings, skipped, rows)  # the original's rows first, in case the conversion is stopped

    if args.converted:
        converted = hf_gqa.from_pretrained(args.converted, dtype=torch.float32).eval()
        how, label = f"loaded from {args.converted}", "converted (loaded)"
    elif args.calibrated:
        start = time.perf_counter()
        converted = hf_gqa.patch(
            copy.deepcopy(model), groups=1, calibration=data.calibration_text(), tokenizer=tok
        ).eval()
        how = f"the calibrated default, `calibration=hf_gqa.data.calibration_text()` ({time.perf_counter() - start:.0f} s)"
        label = "converted (calibrated)"
    else:
        converted = hf_gqa.patch(copy.deepcopy(model), groups=1).eval()
        how, label = "mean pooling, `hf_gqa.patch(model, groups=1)`", "converted (mean)"
    if args.save_converted:
        converted.save_pretrained(args.save_converted)
        tok.save_pretrained(args.save_converted)
    settings["models"].append(f"{label}: 1 KV head per layer, {how}")
    rows += measure(converted, label, "1", windows, references, prompt, args)
    print(save(out, settings, skipped, rows))


def save(out: Path, settings: dict, skipped: dict, rows: list[dict]) -> str:
    """Write `<out>/quantized_cache.{json,md,png}`; returns the markdown."""
    from hf_gqa.evaluation.common import environment

    result = {"settings": settings, "environment": environment("cpu"), "skipped": skipped, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    markdown = to_markdown(result)
    (out / f"{NAME}.md").write_text(markdown)
    plot(result, out / f"{NAME}.png")
    return markdown


if __name__ == "__main__":
    main()
