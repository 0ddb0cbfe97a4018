"""kl_divergence: KL(original || converted) of next-token distributions, from logits.

Load offline with `evaluate.load("<path to this folder>/kl_divergence.py")`, or
`hf_gqa.evaluation.load_metric("kl_divergence")`.
"""

import datasets
import evaluate
import torch

from hf_gqa.evaluation.fidelity import kl_divergence

_DESCRIPTION = """
Mean over positions of KL(P_original || P_converted) in nats, where each P is the softmax of a row of logits. Zero
when the converted model's distributions equal the original's.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the converted model's logits, one row of `vocab` floats per position.
    references: the original model's logits, same shape.
Returns:
    kl_divergence: float >= 0 (nats).
Examples:
    >>> metric = evaluate.load("hf_gqa/evaluation/metrics/kl_divergence/kl_divergence.py")
    >>> metric.compute(predictions=[[0.0, 0.0]], references=[[0.0, 0.0]])
    {'kl_divergence': 0.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KLDivergence(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("float32")),
                }
            ),
        )

    def _compute(self, predictions, references):
        pred = torch.tensor(predictions, dtype=torch.float32)
        ref = torch.tensor(references, dtype=torch.float32)
        return {"kl_divergence": kl_divergence(pred, ref)}
