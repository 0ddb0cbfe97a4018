"""Datasets and prompt functions of hf_gqa's offline lm-eval tasks.

The datasets are built from the data shipped in `hf_gqa.data` (see `hf_gqa/data/SOURCES.md`), so these tasks run
without the Hugging Face Hub. The prompt functions are copies of lm-eval's own (`lm_eval/tasks/hellaswag/utils.py`,
`lm_eval/tasks/winogrande/preprocess_winogrande.py`), so the figures compare with published ones; a test checks
that they give the same prompts as the installed lm-eval.
"""

from __future__ import annotations

import re

import datasets

from hf_gqa.data import heldout_documents, mc_rows


# -- datasets (called by lm-eval as `custom_dataset(**metadata, **dataset_kwargs)`) ------------------------------
def passages(document: str, min_chars: int) -> list[str]:
    """Split `document` at paragraph breaks (blank lines) into passages of at least `min_chars` characters (the
    last one of a document may be shorter); no paragraph is cut."""
    out: list[str] = []
    current: list[str] = []
    for paragraph in document.split("\n\n"):
        current.append(paragraph)
        if sum(len(p) for p in current) >= min_chars:
            out.append("\n\n".join(current).strip())
            current = []
    if current:
        out.append("\n\n".join(current).strip())
    return [p for p in out if p]


def wikipedia(min_chars: int = 2000, **kwargs) -> datasets.DatasetDict:
    """The held-out Wikipedia articles as passages of whole paragraphs, `min_chars` characters or more, in article
    order, as the `test` split (`page`: the passage text, `title`: its article)."""
    rows = []
    for document in heldout_documents():
        title = document.splitlines()[0].strip(" =")
        rows.extend({"page": p, "title": title} for p in passages(document, min_chars))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def hellaswag(**kwargs) -> datasets.DatasetDict:
    """The first 1,000 rows of the HellaSwag validation split, as the `validation` split."""
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(mc_rows("hellaswag"))})


def arc_easy(**kwargs) -> datasets.DatasetDict:
    """The ARC-Easy validation split, as the `validation` split."""
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(mc_rows("arc_easy"))})


def winogrande(**kwargs) -> datasets.DatasetDict:
    """The WinoGrande XL validation split, as the `validation` split."""
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(mc_rows("winogrande"))})


# -- hellaswag (lm_eval/tasks/hellaswag/utils.py) ------------------------------------------------------------------
def preprocess(text: str) -> str:
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def _process_doc(doc: dict) -> dict:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


# -- winogrande (lm_eval/tasks/winogrande/preprocess_winogrande.py) ------------------------------------------------
def winogrande_doc_to_text(doc: dict) -> int:
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
