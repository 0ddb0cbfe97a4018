"""`hf-gqa`: an lm-eval model that loads (or takes) a transformers causal LM and converts it to GQA.

```python
import hf_gqa, lm_eval
lm_eval.simple_evaluate(model="hf-gqa", model_args="pretrained=path/or/id,groups=4,merge=mean", tasks=[...])
```
(`import hf_gqa` registers the name; lm-eval's own command line does not import plugins, so from a shell use
`hf-gqa eval`).

Everything else is lm-eval's `HFLM`: batching, rolling windows, multiple choice, generation. Model arguments:
    pretrained: a folder, Hub id, or an in-memory `PreTrainedModel` (patched in place; pass a copy to keep the
        original, and pass `tokenizer=` too, as for `HFLM`).
    groups: KV heads after conversion: an int (`groups=4`) or a per-layer list written `4:4:2:2`; none (or the
        model's current KV head count) leaves the attention as it is.
    merge, grouping: as for `hf_gqa.patch`.
A checkpoint saved by hf_gqa that plain transformers cannot load is loaded with `hf_gqa.from_pretrained`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import PreTrainedModel

from ..attention import set_attention
from ..cache import install_cache
from ..groups import parse_groups
from ..io import from_pretrained, needs_hf_gqa_to_load
from ..patch import is_patched, patch
from .common import kv_layout, resolve_dtype

MODEL_NAME = "hf-gqa"


@register_model(MODEL_NAME)
class HFGQALM(HFLM):
    """lm-eval's `HFLM` on a model converted to `groups` key/value heads by `hf_gqa.patch`."""

    def __init__(
        self,
        pretrained: str | PreTrainedModel,
        groups: int | str | Sequence[int] | None = None,
        merge: str = "mean",
        grouping: str = "consecutive",
        **kwargs,
    ) -> None:
        self.groups = parse_groups(groups)
        self.merge = merge
        self.grouping = grouping
        super().__init__(pretrained=pretrained, **kwargs)
        if self.groups is not None:
            self._convert()

    def _convert(self) -> None:
        model = self._model
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"hf-gqa converts a transformers PreTrainedModel, got {type(model).__name__}; "
                "with peft=..., convert and merge the adapter first."
            )
        if kv_layout(model).is_unchanged_by(self.groups):
            return
        patch(model, groups=self.groups, merge=self.merge, grouping=self.grouping)
        model.eval()

    def _create_model(
        self,
        pretrained: str,
        revision: str | None = "main",
        dtype: str | torch.dtype | None = "auto",
        trust_remote_code: bool | None = False,
        **kwargs,
    ) -> None:
        """Load as `HFLM` does, except hf_gqa checkpoints that need `hf_gqa.from_pretrained`."""
        if needs_hf_gqa_to_load(self._config):
            torch_dtype = None if dtype in (None, "auto") else resolve_dtype(dtype)
            self._model = from_pretrained(
                pretrained, dtype=torch_dtype, revision=revision, trust_remote_code=trust_remote_code
            )
            return
        super()._create_model(
            pretrained, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
        if isinstance(self._model, PreTrainedModel) and is_patched(self._model):
            install_cache(self._model)
            set_attention(self._model)


__all__ = ["MODEL_NAME", "HFGQALM"]
