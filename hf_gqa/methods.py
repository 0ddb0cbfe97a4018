"""Conversion methods: registered objects that say how a group's K/V heads become one and what they need.

A method is a small frozen dataclass. Its class attributes declare what it needs, its fields are its settings:

    hf_gqa.patch(model, groups=1, method="mean")                                     # data-free
    hf_gqa.patch(model, groups=1, method=Refine(steps=300), calibration=texts, tokenizer=tok)
    hf_gqa.patch(model, groups=1, merge="refine", refine_steps=300, ...)             # the same, older spelling

`patch` picks the pipeline from the declaration: the data-free pipeline converts every layer from its weights
alone; the sequential pipeline (`hf_gqa.pipeline`) runs calibration data through the model one decoder layer at a
time and gives each layer's method its statistics (and, for `Refine`, the layer's captured inputs and targets).

Closed-form merges are `Merge` objects wrapping a merge function of canonical weights (`hf_gqa.merging`);
`register_merge(name, fn, needs_calibration=...)` adds one. `Refine` starts from a closed-form merge (`init`) and
fits each converted layer to the original on calibration data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

from .canonical import AttentionWeights
from .errors import GQAError
from .merging import merge_first, merge_mean, merge_pca, merge_procrustes, merge_score

MergeFn = Callable[[AttentionWeights, int, "object | None"], AttentionWeights]

#: What `Refine` fits the converted block to, with sequential calibration:
#: "local": the original block's output on the same (converted-stream) inputs;
#: "original": the original block's output on the original model's own inputs;
#: "residual": that, plus the drift of the residual stream (original minus converted hidden states), so the block
#: also corrects the error the converted layers before it left (pre-norm families add attention to the stream).
REFINE_TARGETS = ("local", "original", "residual")

#: What `Refine` trains: "attention": the converted attention block alone (its new q/k/v/o), fitted to the
#: targets above; "layer": a copy of the whole decoder layer around it (the converted attention plus the layer's
#: MLP and norms), fitted to the original decoder layer's output, so the MLP also compensates what fewer KV heads
#: cannot carry. With "residual" / "original" targets the fit is to the original model's own trajectory.
REFINE_SCOPES = ("attention", "layer")

#: Which parameters a `scope="layer"` refine trains: "layer": all of the layer copy's (Adam keeps two moments of
#: every one: about 4 copies of the layer in float32 while it fits); "attention": the converted attention's alone,
#: the MLP and norms frozen and shared with the original layer (no copy of them, no optimizer state, cheaper
#: backward), still fitted to the whole layer's output.
REFINE_TRAINS = ("layer", "attention")


class ConversionMethod:
    """Base of every conversion method.

    Class attributes (the declaration the pipelines read):
        needs_calibration: the method needs calibration statistics (`sigma` per layer), so `patch` runs the
            sequential calibrated pipeline and refuses to run without `calibration=`.
        folds_maps: the method folds maps into the query / output projections, which a per-head key norm or
            clipped q/k/v forbid (the adapter's `fold_blocker` says so).
    """

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    folds_maps: ClassVar[bool] = False

    def merge(self, weights: AttentionWeights, groups: int, stats: object | None) -> AttentionWeights:
        """Canonical weights with `groups` KV heads from `weights`, whose groups are already contiguous."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """What the converted config records as `hf_gqa.merge`."""
        return self.name


@dataclass(frozen=True)
class Merge(ConversionMethod):
    """A closed-form merge: one call of `fn(weights, groups, stats)` per layer (see `hf_gqa.merging`)."""

    name: str
    fn: MergeFn
    needs_calibration: bool = False
    folds_maps: bool = False

    def merge(self, weights: AttentionWeights, groups: int, stats: object | None) -> AttentionWeights:
        return self.fn(weights, groups, stats)


@dataclass(frozen=True)
class Refine(ConversionMethod):
    """`init`'s closed form, then per layer `steps` Adam steps (rate `lr`, cosine decay) fitting the converted
    block (`scope="attention"`) or a copy of its whole decoder layer (`scope="layer"`) to the original's output
    on the calibration data (`target`, see `REFINE_TARGETS`). A fit that ends worse than it started is undone.
    `train="attention"` trains only the converted attention inside the layer copy (see `REFINE_TRAINS`).
    Each step fits one calibration sequence scored on `positions` of its token positions (all of them with
    `positions=None`): the first, where decoder models keep an attention sink, and the others drawn at random,
    weighted so that the step's error estimates the whole sequence's; the layer then computes only those
    positions, keys and values excepted (`hf_gqa.refine.PositionSubset`), so a step costs about
    `positions / block_size` of a full one. `warmup` steps raise the rate linearly to `lr` first (Adam's first
    steps move every weight by about the rate at once): with it, fewer steps at a higher rate converge (the main
    job: 70 steps at 4e-4 with 10 of warmup, 20% fewer CPU-seconds than 100 at 3e-4, 2.33x instead of 2.22x the
    original's held-out paragraph perplexity on SmolLM2).

    With `steps=0` it is `init` alone.
    """

    steps: int = 100
    lr: float = 3e-4
    target: str = "residual"
    scope: str = "layer"
    init: str | Merge = "score"
    positions: int | None = None
    train: str = "layer"
    warmup: int = 0
    name: ClassVar[str] = "refine"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise GQAError(f"refine steps must be an int >= 0, got {self.steps!r}.")
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise GQAError(f"refine lr must be a positive number, got {self.lr!r}.")
        if (
            isinstance(self.warmup, bool)
            or not isinstance(self.warmup, int)
            or not 0 <= self.warmup <= self.steps
        ):
            raise GQAError(
                f"refine warmup must be an int from 0 to steps ({self.steps}), got {self.warmup!r}."
            )
        if self.target not in REFINE_TARGETS:
            raise GQAError(f"refine target must be one of {REFINE_TARGETS}, got {self.target!r}.")
        if self.scope not in REFINE_SCOPES:
            raise GQAError(f"refine scope must be one of {REFINE_SCOPES}, got {self.scope!r}.")
        if self.train not in REFINE_TRAINS:
            raise GQAError(f"refine train must be one of {REFINE_TRAINS}, got {self.train!r}.")
        if self.scope == "attention" and self.positions is not None:
            raise GQAError(
                "refine positions apply to scope='layer' (the layer computes only the scored positions); "
                "an attention-scope refine fits every position: drop positions= or use scope='layer'."
            )
        if self.scope == "attention" and self.train != "attention":
            object.__setattr__(self, "train", "attention")  # an attention-scope fit has nothing else to train
        if self.positions is not None and (
            isinstance(self.positions, bool) or not isinstance(self.positions, int) or self.positions < 1
        ):
            raise GQAError(f"refine positions must be an int >= 1 or None (all), got {self.positions!r}.")
        start = get_method(self.init) if isinstance(self.init, str) else self.init
        if not isinstance(start, Merge):
            raise GQAError(f"refine starts from a closed-form merge, not {self.init!r}.")
        object.__setattr__(self, "init", start)

    @property
    def start(self) -> Merge:
        return self.init  # a Merge after __post_init__

    @property
    def folds_maps(self) -> bool:  # type: ignore[override]
        return self.start.folds_maps

    def merge(self, weights: AttentionWeights, groups: int, stats: object | None) -> AttentionWeights:
        return self.start.merge(weights, groups, stats)

    @property
    def label(self) -> str:
        return f"{self.start.name}+refine" if self.steps else self.start.name


# -- the registry ---------------------------------------------------------------------------------------------------
METHODS: dict[str, ConversionMethod | type[ConversionMethod]] = {}


def register_method(name: str, method: ConversionMethod | type[ConversionMethod]) -> None:
    """Make `patch(..., method=name)` (and `merge=name`) use `method`: an instance, or a class whose instances
    take their settings as keyword arguments (`get_method(name, steps=300)`)."""
    METHODS[name] = method


def register_merge(name: str, fn: MergeFn, needs_calibration: bool = False, folds_maps: bool = False) -> None:
    """Make `patch(..., merge=name)` use the closed-form merge function `fn(weights, groups, stats)`.

    Args:
        needs_calibration: `fn` reads calibration statistics (`stats.sigma`); `patch` then requires data.
        folds_maps: `fn` changes the query or output projections too (refused where a key norm forbids it).
    """
    register_method(name, Merge(name, fn, needs_calibration, folds_maps))


def method_label(spec: str | ConversionMethod | MergeFn | None, calibrated: bool) -> str:
    """What a report records for `patch(merge=spec)`: the method's label, the default spelled out for None."""
    if spec is None:
        return (
            "refine (the default with calibration)"
            if calibrated
            else "mean (the default without calibration)"
        )
    return get_method(spec).label


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(spec: str | ConversionMethod | MergeFn, **settings) -> ConversionMethod:
    """The method `spec` names (with `settings` for a method class such as `Refine`), a method object as it is,
    or a custom merge function wrapped as a data-free `Merge`."""
    if isinstance(spec, ConversionMethod):
        return replace(spec, **settings) if settings else spec
    if callable(spec):
        return Merge(getattr(spec, "__name__", "custom"), spec)
    if spec not in METHODS:
        raise GQAError(
            f"Unknown method {spec!r}; choose one of {', '.join(method_names())} or pass a function."
        )
    entry = METHODS[spec]
    if isinstance(entry, type):
        return entry(**settings)
    return replace(entry, **settings) if settings else entry


register_merge("mean", merge_mean)
register_merge("first", merge_first)
register_merge("pca", merge_pca, needs_calibration=True, folds_maps=True)
register_merge("score", merge_score, needs_calibration=True, folds_maps=True)
register_merge("procrustes", merge_procrustes, needs_calibration=True, folds_maps=True)
register_method("refine", Refine)


__all__ = [
    "METHODS",
    "REFINE_SCOPES",
    "REFINE_TARGETS",
    "REFINE_TRAINS",
    "ConversionMethod",
    "Merge",
    "Refine",
    "get_method",
    "method_names",
    "register_merge",
    "register_method",
]
