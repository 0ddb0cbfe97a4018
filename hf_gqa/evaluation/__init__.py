"""Quality and speed before and after conversion: lm-eval hooks, offline tasks and metrics, `compare`, `bench`.

```python
import hf_gqa
report = hf_gqa.evaluation.compare(model, tokenizer, groups=[4, 1], tasks=["hf_gqa_hellaswag"], limit=200)
print(report); report.save("report/")                     # JSON + markdown + quality-vs-speed PNG
print(hf_gqa.evaluation.bench(model, groups=[4, 1], batch=[1, 8], context=[512, 2048]))
```
`import hf_gqa` does not import this package (nor lm-eval); its first use (`hf_gqa.evaluation...` or
`import hf_gqa.evaluation`) registers the lm-eval model `"hf-gqa"` (`lm_eval.simple_evaluate(model="hf-gqa",
model_args="pretrained=...,groups=4")`). The heavier parts (lm-eval's evaluator, matplotlib) load on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .tasks import BUNDLED_TASKS, TASKS_DIR, task_manager

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
#: The `evaluate` metrics shipped here, loaded offline by path (see `load_metric`).
METRICS = ("next_token_agreement", "kl_divergence")

_LAZY = {
    "compare": ".compare",
    "SpeedSettings": ".compare",
    "UnknownTaskError": ".compare",
    "Report": ".report",
    "VariantResult": ".report",
    "Score": ".report",
    "bench": ".bench",
    "BenchReport": ".bench",
    "native_gqa_model": ".bench",
    "HFGQALM": ".lm_eval_model",
    "ModelLoadError": ".common",
    "load_model": ".common",
}


def register_lm_eval_model() -> None:
    """Register `"hf-gqa"` with lm-eval's model registry, lazily (the class is imported on first use).

    lm-eval fills its registry with its own models only when the registry is empty, so they are loaded first.
    """
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models)
    from lm_eval.api.registry import model_registry

    try:
        model_registry.register("hf-gqa", target="hf_gqa.evaluation.lm_eval_model:HFGQALM")
    except ValueError:  # already registered: the class itself was imported first
        pass


def metric_path(name: str) -> str:
    """Path of a shipped `evaluate` metric script, for `evaluate.load(path)`."""
    if name not in METRICS:
        raise KeyError(f"unknown metric {name!r}; hf_gqa ships {', '.join(METRICS)}")
    return str(METRICS_DIR / name / f"{name}.py")


def load_metric(name: str, **kwargs):
    """`evaluate.load` of a shipped metric ("next_token_agreement" or "kl_divergence"); works offline."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_lm_eval_model()

__all__ = [
    "BUNDLED_TASKS",
    "METRICS",
    "METRICS_DIR",
    "TASKS_DIR",
    "BenchReport",
    "HFGQALM",
    "ModelLoadError",
    "Report",
    "Score",
    "SpeedSettings",
    "UnknownTaskError",
    "VariantResult",
    "bench",
    "compare",
    "load_metric",
    "load_model",
    "metric_path",
    "native_gqa_model",
    "register_lm_eval_model",
    "task_manager",
]
