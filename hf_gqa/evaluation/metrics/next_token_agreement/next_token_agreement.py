"""next_token_agreement: how often a converted model predicts the same next token as the original.

Load offline with `evaluate.load("<path to this folder>/next_token_agreement.py")`, or
`hf_gqa.evaluation.load_metric("next_token_agreement")`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Fraction of positions at which the argmax of the converted model's logits equals the argmax of the original
model's logits. Inputs are token ids (the argmax already taken) or logit rows, one position per example.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the converted model's next-token ids (int), one per position.
    references: the original model's next-token ids (int), one per position.
Returns:
    next_token_agreement: float in [0, 1].
Examples:
    >>> metric = evaluate.load("hf_gqa/evaluation/metrics/next_token_agreement/next_token_agreement.py")
    >>> metric.compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 4])
    {'next_token_agreement': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NextTokenAgreement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("float32")),
                        "references": datasets.Sequence(datasets.Value("float32")),
                    }
                ),
            ],
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.ndim == 2:  # logit rows
            predictions, references = predictions.argmax(-1), references.argmax(-1)
        return {"next_token_agreement": float((predictions == references).mean())}
