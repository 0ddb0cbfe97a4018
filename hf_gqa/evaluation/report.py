"""The report `compare()` returns: a terminal table, markdown, JSON, and a quality-vs-speed plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..groups import Groups
from .formatting import fmt_bytes, fmt_delta, fmt_rate, fmt_ratio, fmt_value, format_table

#: The metric plotted for a task, in order of preference (the first one the task reports).
PRIMARY_METRICS = ("acc_norm", "acc", "word_perplexity", "byte_perplexity", "bits_per_byte", "exact_match")


@dataclass
class Score:
    """One metric of one task: its value and the stderr lm-eval gives (None where it gives "N/A")."""

    value: float | None
    stderr: float | None = None


@dataclass
class VariantResult:
    """Everything measured for one variant (the original, or a conversion to `groups` KV heads)."""

    name: str
    groups: Groups | None
    kv_heads: list[int]
    kv_bytes_per_token: int
    scores: dict[str, dict[str, Score]]  # task -> metric -> Score
    speed: dict[str, float] | None = None  # prefill_tokens_per_s, decode_tokens_per_s, kv_cache_bytes, ...
    fidelity: dict[str, float] | None = None  # next_token_agreement, kl_divergence (vs the original)
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, data: dict) -> VariantResult:
        scores = {t: {m: Score(**s) for m, s in ms.items()} for t, ms in data["scores"].items()}
        return cls(**{**data, "scores": scores})


@dataclass
class Report:
    """Quality (per task and metric), speed and KV-cache size of the original (`variants[0]`) and each conversion.

    Attributes:
        variants: the original first, then one entry per `groups` value.
        higher_is_better: task -> metric -> direction, as lm-eval reports it.
        n_samples: documents evaluated per task.
        settings: the arguments of the run (tasks, limit, seeds, groups, merge, dtype, speed settings, ...).
        environment: versions, machine, device and date.
    """

    variants: list[VariantResult]
    higher_is_better: dict[str, dict[str, bool]] = field(default_factory=dict)
    n_samples: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)

    @property
    def original(self) -> VariantResult:
        return self.variants[0]

    # -- derived figures -----------------------------------------------------------------------------------------
    def quality_rows(self) -> list[dict]:
        """One row per task, metric and converted variant: before, after, delta and both stderrs."""
        rows = []
        base = self.original
        for variant in self.variants[1:]:
            for task, metrics in base.scores.items():
                for metric, before in metrics.items():
                    after = variant.scores.get(task, {}).get(metric, Score(None))
                    delta = (
                        after.value - before.value
                        if after.value is not None and before.value is not None
                        else None
                    )
                    rows.append(
                        {
                            "task": task,
                            "metric": metric,
                            "variant": variant.name,
                            "before": before.value,
                            "after": after.value,
                            "delta": delta,
                            "stderr_before": before.stderr,
                            "stderr_after": after.stderr,
                            "higher_is_better": self._higher_is_better(task, metric),
                        }
                    )
        return rows

    def speed_rows(self) -> list[dict]:
        """One row per variant: speed, KV bytes per token, fidelity, and their ratios to the original."""
        base = self.original
        rows = []
        for v in self.variants:
            row = {
                "variant": v.name,
                "kv_heads": v.kv_heads,
                "kv_bytes_per_token": v.kv_bytes_per_token,
                "kv_bytes_ratio": v.kv_bytes_per_token / base.kv_bytes_per_token,
                "prefill_tokens_per_s": None,
                "decode_tokens_per_s": None,
                "prefill_ratio": None,
                "decode_ratio": None,
            }
            if v.speed and base.speed:
                for kind in ("prefill", "decode"):
                    value = v.speed[f"{kind}_tokens_per_s"]
                    row[f"{kind}_tokens_per_s"] = value
                    # the ratio from timing this variant interleaved with the original, where measured
                    paired = v.speed.get(f"{kind}_ratio")
                    row[f"{kind}_ratio"] = (
                        paired if paired is not None else value / base.speed[f"{kind}_tokens_per_s"]
                    )
            row.update(v.fidelity or {})
            rows.append(row)
        return rows

    def primary_metric(self, task: str) -> str | None:
        metrics = self.original.scores.get(task, {})
        for name in PRIMARY_METRICS:
            if name in metrics:
                return name
        return next(iter(metrics), None)

    # -- text -----------------------------------------------------------------------------------------------------
    def _higher_is_better(self, task: str, metric: str) -> bool | None:
        return self.higher_is_better.get(task, {}).get(metric.split(" ")[0])

    @staticmethod
    def _arrow(higher_is_better: bool | None) -> str:
        return "" if higher_is_better is None else (" ↑" if higher_is_better else " ↓")

    def _quality_table(self, markdown: bool) -> str:
        if len(self.variants) == 1:  # the original alone (e.g. scoring a saved conversion): its scores
            headers = ["task", "metric", self.original.name]
            rows = [
                [
                    task,
                    metric + self._arrow(self._higher_is_better(task, metric)),
                    fmt_value(score.value, score.stderr),
                ]
                for task, metrics in self.original.scores.items()
                for metric, score in metrics.items()
            ]
            return format_table(headers, rows, markdown)
        headers = ["task", "metric", "variant", "before", "after", "delta"]
        rows = [
            [
                r["task"],
                r["metric"] + self._arrow(r["higher_is_better"]),
                r["variant"],
                fmt_value(r["before"], r["stderr_before"]),
                fmt_value(r["after"], r["stderr_after"]),
                fmt_delta(r["delta"]),
            ]
            for r in self.quality_rows()
        ]
        return format_table(headers, rows, markdown)

    def _speed_table(self, markdown: bool) -> str:
        headers = ["variant", "KV heads", "KV bytes/token", "prefill tok/s", "decode tok/s", "vs original"]
        has_fidelity = any(v.fidelity for v in self.variants)
        if has_fidelity:
            headers += ["next-token agreement", "KL (nats)"]
        rows = []
        for r in self.speed_rows():
            heads = sorted(set(r["kv_heads"]))
            ratio = (
                f"decode x{r['decode_ratio']:.2f}, prefill x{r['prefill_ratio']:.2f}, KV x{r['kv_bytes_ratio']:.2f}"
                if r["decode_ratio"] is not None
                else f"KV x{r['kv_bytes_ratio']:.2f}"
            )
            row = [
                r["variant"],
                "/".join(str(h) for h in heads),
                fmt_bytes(r["kv_bytes_per_token"]),
                fmt_rate(r["prefill_tokens_per_s"]),
                fmt_rate(r["decode_tokens_per_s"]),
                ratio,
            ]
            if has_fidelity:
                row += [fmt_ratio(r.get("next_token_agreement")), fmt_value(r.get("kl_divergence"))]
            rows.append(row)
        return format_table(headers, rows, markdown)

    def table(self) -> str:
        """The terminal table: quality per task and metric, then speed and memory per variant."""
        return self._quality_table(False) + "\n\n" + self._speed_table(False)

    def __str__(self) -> str:
        return self.table()

    def _settings_lines(self) -> list[str]:
        s, env = self.settings, self.environment
        machine = env.get("machine", {})
        speed = s.get("speed") or {}
        lines = [
            f"- model: {s.get('model')} ({s.get('model_type')}, {s.get('dtype')}), original KV heads "
            f"{sorted(set(s.get('original_kv_heads', [])))}, merge: {s.get('merge')}",
            f"- tasks: {', '.join(s.get('tasks', []))}; limit: {s.get('limit')}; documents: "
            + ", ".join(f"{t} {n}" for t, n in self.n_samples.items())
            + f"; seed {s.get('seed')}",
            f"- device: {env.get('device')} ({machine.get('gpu') or machine.get('cpu')}, "
            f"{machine.get('torch_threads')} torch threads); date: {env.get('date')}",
        ]
        if speed:
            lines.append(
                f"- speed: batch {speed.get('batch')}, context {speed.get('context')}, "
                f"{speed.get('new_tokens')} new tokens, median of {speed.get('repeats')} after "
                f"{speed.get('warmup')} warm-up"
            )
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()))
        if s.get("command"):
            lines.append(f"- command: `{s['command']}`")
        return lines

    def to_markdown(self) -> str:
        lines = ["# hf-gqa: quality and speed before and after conversion", ""]
        lines += self._settings_lines()
        lines += ["", "## Quality", "", self._quality_table(True)]
        lines += ["", "## Speed and memory", "", self._speed_table(True), ""]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "settings": self.settings,
            "environment": self.environment,
            "higher_is_better": self.higher_is_better,
            "n_samples": self.n_samples,
            "variants": [asdict(v) for v in self.variants],
            "quality": self.quality_rows(),
            "speed": self.speed_rows(),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        return cls(
            variants=[VariantResult.from_dict(v) for v in data["variants"]],
            higher_is_better=data.get("higher_is_better", {}),
            n_samples=data.get("n_samples", {}),
            settings=data.get("settings", {}),
            environment=data.get("environment", {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Read a report written by `save` (its `report.json`, or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        return cls.from_dict(json.loads(path.read_text()))

    # -- plot and files -------------------------------------------------------------------------------------------
    def plot_panels(self) -> list[tuple[str, str]]:
        """The `(task, metric)` pairs the plot draws: every metric of every task with a value for the original."""
        return [
            (task, metric)
            for task, metrics in self.original.scores.items()
            for metric, score in metrics.items()
            if score.value is not None
        ]

    def plot(self, path: str | Path) -> Path:
        """A PNG of what is traded: one panel per task and metric, the metric against KV-cache bytes per token (one
        point per variant, with its stderr, labelled with its name and, where speed was measured, its decode speed
        relative to the original), and a last panel of that decode speed ratio against KV-cache bytes per token,
        from zero."""
        from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg rendering

        panels = self.plot_panels()
        speeds = {row["variant"]: row["decode_ratio"] for row in self.speed_rows()}
        has_speed = all(value is not None for value in speeds.values())
        count = len(panels) + int(has_speed)
        columns = min(3, max(1, count))
        rows = -(-max(1, count) // columns)
        fig = Figure(figsize=(4.6 * columns, 3.8 * rows))
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        for ax in axes[count:]:
            ax.set_visible(False)
        for ax, (task, metric) in zip(axes, panels):
            values = []
            for v in self.variants:
                score = v.scores.get(task, {}).get(metric)
                if score is None or score.value is None:
                    continue
                marker = "s" if v is self.original else "o"
                ax.errorbar(v.kv_bytes_per_token, score.value, yerr=score.stderr, fmt=marker, capsize=3)
                label = v.name + (f" (decode x{speeds[v.name]:.2f})" if has_speed else "")
                ax.annotate(
                    label,
                    (v.kv_bytes_per_token, score.value),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
                values.append(score.value)
            if "perplexity" in metric and values and min(values) > 0 and max(values) > 10 * min(values):
                ax.set_yscale("log")
            direction = self._higher_is_better(task, metric)
            arrow = (
                "" if direction is None else (" (higher is better)" if direction else " (lower is better)")
            )
            ax.set_ylabel(f"{metric}{arrow}")
            ax.set_title(task, fontsize=10)
        if has_speed:
            ax = axes[len(panels)]
            for v in self.variants:
                ax.plot(v.kv_bytes_per_token, speeds[v.name], "s" if v is self.original else "o")
                ax.annotate(
                    v.name,
                    (v.kv_bytes_per_token, speeds[v.name]),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
            ax.set_ylim(0, max(speeds.values()) * 1.25)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_ylabel("decode tokens/s relative to the original")
            ax.set_title("speed", fontsize=10)
        for ax in axes[:count]:
            ax.set_xlabel("KV-cache bytes per token")
            ax.set_xlim(0, self.original.kv_bytes_per_token * 1.2)
            ax.grid(True, alpha=0.3)
        fig.suptitle(f"{self.settings.get('model', '')}: quality, speed and KV-cache size", fontsize=10)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        return path

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write `report.json`, `report.md` and `quality_vs_speed.png` into `directory`; returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": directory / "report.json",
            "markdown": directory / "report.md",
            "plot": directory / "quality_vs_speed.png",
        }
        paths["json"].write_text(self.to_json() + "\n")
        paths["markdown"].write_text(self.to_markdown())
        self.plot(paths["plot"])
        return paths


__all__ = ["PRIMARY_METRICS", "Report", "Score", "VariantResult"]
