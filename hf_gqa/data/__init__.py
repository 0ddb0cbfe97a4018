"""Real text and multiple-choice data shipped with hf_gqa (see SOURCES.md for sources and licences)."""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent

#: Held-out evaluation prose (Wikipedia); never used for calibration or training.
HELDOUT_TEXT = DATA_DIR / "text" / "wikipedia_heldout.txt"
#: Calibration prose (Austen, Pride and Prejudice).
CALIBRATION_TEXT = DATA_DIR / "text" / "austen_calibration.txt"
#: Uptraining prose (Austen, Emma and Sense and Sensibility).
TRAIN_TEXTS = (
    DATA_DIR / "text" / "austen_train_emma.txt",
    DATA_DIR / "text" / "austen_train_sensesensibility.txt",
)


def read_text(path: Path = HELDOUT_TEXT) -> str:
    return Path(path).read_text(encoding="utf-8")


def heldout_paragraph(min_chars: int = 1500) -> str:
    """The first paragraphs of the held-out Wikipedia text, at least `min_chars` long (the README's demo text)."""
    out: list[str] = []
    for para in read_text(HELDOUT_TEXT).split("\n\n"):
        out.append(para.strip())
        if sum(map(len, out)) >= min_chars:
            break
    return "\n\n".join(out)


def heldout_documents() -> list[str]:
    """The held-out Wikipedia articles, one string each."""
    text = read_text(HELDOUT_TEXT)
    docs, current = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith("= ") and line.rstrip().endswith(" =") and current:
            docs.append("".join(current).strip())
            current = []
        current.append(line)
    docs.append("".join(current).strip())
    return docs


def calibration_text() -> str:
    return read_text(CALIBRATION_TEXT)


def train_text() -> str:
    return "\n\n".join(read_text(p) for p in TRAIN_TEXTS)


def mc_rows(name: str) -> list[dict]:
    """Rows of a shipped multiple-choice set: "hellaswag", "arc_easy" or "winogrande"."""
    files = {
        "hellaswag": "hellaswag_validation.jsonl",
        "arc_easy": "arc_easy_validation.jsonl",
        "winogrande": "winogrande_xl_validation.jsonl",
    }
    with open(DATA_DIR / "mc" / files[name], encoding="utf-8") as f:
        return [json.loads(line) for line in f]
