"""Real text and multiple-choice data shipped with hf_gqa (see SOURCES.md for sources and licences)."""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent

#: Held-out evaluation prose (Wikipedia); never used for calibration or training.
HELDOUT_TEXT = DATA_DIR / "text" / "wikipedia_heldout.txt"
#: Calibration prose (Austen, Pride and Prejudice); `calibration_text("mixed")`, the default, interleaves it with
#: the Wikipedia calibration articles.
CALIBRATION_TEXT = DATA_DIR / "text" / "austen_calibration.txt"
#: Calibration prose (10 Wikipedia articles, disjoint from the held-out and training articles).
WIKIPEDIA_CALIBRATION_TEXT = DATA_DIR / "text" / "wikipedia_calibration.txt"
#: Uptraining prose (Austen, Emma and Sense and Sensibility).
TRAIN_TEXTS = (
    DATA_DIR / "text" / "austen_train_emma.txt",
    DATA_DIR / "text" / "austen_train_sensesensibility.txt",
)
#: Uptraining prose (83 Wikipedia articles, disjoint from the held-out and calibration articles).
WIKIPEDIA_TRAIN_TEXT = DATA_DIR / "text" / "wikipedia_train.txt"
#: Corpora by name, for calibration and for uptraining.
CALIBRATION_CORPORA = ("austen", "wikipedia", "mixed")
TRAIN_CORPORA = ("austen", "wikipedia")


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


def calibration_text(corpus: str = "mixed") -> str:
    """Shipped calibration prose: "austen" (Pride and Prejudice), "wikipedia" (10 articles not used for
    evaluation or training) or "mixed" (the default: the two interleaved in blocks of about 4,000 characters, in
    proportion to their lengths, so that any prefix holds both). Broader calibration converts better: on
    SmolLM2 3 -> 1 KV heads, refine calibrated on "mixed" reaches about half the held-out perplexity of "austen"
    (benchmarks/results/strategies.md)."""
    if corpus == "austen":
        return read_text(CALIBRATION_TEXT)
    if corpus == "wikipedia":
        return read_text(WIKIPEDIA_CALIBRATION_TEXT)
    if corpus == "mixed":
        blocks_a = _blocks(read_text(CALIBRATION_TEXT))
        blocks_w = _blocks(read_text(WIKIPEDIA_CALIBRATION_TEXT))
        return "\n\n".join(_interleave(blocks_a, blocks_w))
    raise ValueError(f"unknown calibration corpus {corpus!r}; choose one of {CALIBRATION_CORPORA}")


def _blocks(text: str, min_chars: int = 4000) -> list[str]:
    """Consecutive paragraphs of `text` joined into blocks of at least `min_chars` (the last may be shorter)."""
    blocks: list[str] = []
    current: list[str] = []
    for paragraph in text.split("\n\n"):
        if paragraph.strip():
            current.append(paragraph.strip("\n"))
        if sum(map(len, current)) >= min_chars:
            blocks.append("\n\n".join(current))
            current = []
    return blocks + (["\n\n".join(current)] if current else [])


def _interleave(a: list[str], b: list[str]) -> list[str]:
    """Blocks of `a` and `b` in proportion to their lengths in characters, each list keeping its order."""
    out: list[str] = []
    i = j = 0
    used_a = used_b = 0
    total_a, total_b = sum(map(len, a)) or 1, sum(map(len, b)) or 1
    while i < len(a) or j < len(b):
        if j >= len(b) or (i < len(a) and used_a / total_a <= used_b / total_b):
            out.append(a[i])
            used_a += len(a[i])
            i += 1
        else:
            out.append(b[j])
            used_b += len(b[j])
            j += 1
    return out


def train_text(corpus: str = "austen") -> str:
    """Shipped uptraining prose: "austen" (Emma and Sense and Sensibility) or "wikipedia" (83 articles)."""
    if corpus == "austen":
        return "\n\n".join(read_text(p) for p in TRAIN_TEXTS)
    if corpus == "wikipedia":
        return read_text(WIKIPEDIA_TRAIN_TEXT)
    raise ValueError(f"unknown training corpus {corpus!r}; choose one of {TRAIN_CORPORA}")


def mc_rows(name: str) -> list[dict]:
    """Rows of a shipped multiple-choice set: "hellaswag", "arc_easy" or "winogrande"."""
    files = {
        "hellaswag": "hellaswag_validation.jsonl",
        "arc_easy": "arc_easy_validation.jsonl",
        "winogrande": "winogrande_xl_validation.jsonl",
    }
    with open(DATA_DIR / "mc" / files[name], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -- text sources by name (one spelling for every command) ------------------------------------------------------
#: Text shipped with hf_gqa, by the name `hf-gqa` commands take (`--calibration`, `--data`, `--eval-data`).
BUILTIN_TEXTS = {
    "builtin:calibration": lambda: [calibration_text("mixed")],
    "builtin:calibration-austen": lambda: [calibration_text("austen")],
    "builtin:calibration-wikipedia": lambda: [calibration_text("wikipedia")],
    "builtin:train-austen": lambda: [train_text("austen")],
    "builtin:train-wikipedia": lambda: [train_text("wikipedia")],
    "builtin:heldout": heldout_documents,
}
#: Older names, which meant different texts in `convert` (calibration) and `uptrain` (training): kept working,
#: each with a one-line note naming the new spelling.
_OLD_NAMES = {
    "calibration": {
        "builtin": "builtin:calibration",
        "builtin:austen": "builtin:calibration-austen",
        "builtin:wikipedia": "builtin:calibration-wikipedia",
    },
    "training": {
        "builtin": "builtin:calibration",
        "builtin:austen": "builtin:train-austen",
        "builtin:wikipedia-train": "builtin:train-wikipedia",
        "builtin:wikipedia": "builtin:heldout",
    },
}


def text_source(name: str, purpose: str = "training") -> list[str]:
    """The documents a command-line source names: a `builtin:...` name (`BUILTIN_TEXTS`), a `.txt` file (one
    document) or a folder of `.txt` files (one document each, in name order).

    Args:
        purpose: `"calibration"` or `"training"`; decides what an older builtin name means (`builtin:austen` was
            the calibration novel in `convert` and the training novels in `uptrain`).

    Raises:
        FileNotFoundError: neither a builtin name nor an existing path (the message lists the builtin names).
    """
    import warnings

    old = _OLD_NAMES.get(purpose, {})
    if name in old:
        if old[name] != name and name != "builtin":
            warnings.warn(f"{name} is now spelled {old[name]}", DeprecationWarning, stacklevel=2)
        name = old[name]
    if name in BUILTIN_TEXTS:
        return BUILTIN_TEXTS[name]()
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no .txt files in the folder {name}")
        return [read_text(f) for f in files]
    if path.is_file():
        return [read_text(path)]
    raise FileNotFoundError(
        f"no such {purpose} file: {name} (nor a folder of .txt files, nor a builtin text: "
        f"{', '.join(BUILTIN_TEXTS)})"
    )
