"""Held-out perplexity of saved models, measured exactly as `benchmarks/strategies.py` measures its rows.

The first `--windows` windows of `--window` tokens of the held-out Wikipedia articles
(`hf_gqa/data/text/wikipedia_heldout.txt`, never used for calibration or training), perplexity =
exp(mean token loss). For a model converted by `hf-gqa convert` and saved, to compare it with the rows of
`benchmarks/results/strategies.md` without converting again.

    python benchmarks/heldout_perplexity.py /tmp/smollm2 converted/ --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from strategies import windowed_perplexity  # noqa: E402  (the same measurement as the strategies table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "models", nargs="+", help="saved model folders (plain transformers or hf_gqa checkpoints)"
    )
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    import hf_gqa
    from hf_gqa import data

    torch.set_num_threads(args.threads)
    print("| model | KV heads per layer | perplexity |\n|---|---|---|")
    for path in args.models:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = hf_gqa.from_pretrained(path, dtype=torch.float32).eval()
        ids = tokenizer(data.read_text(data.HELDOUT_TEXT), return_tensors="pt").input_ids[0]
        heads = sorted({layer.kv_heads_after for layer in hf_gqa.describe(model).layers})
        ppl = windowed_perplexity(model, ids, args.windows, args.window)
        print(f"| {path} | {','.join(map(str, heads))} | {ppl:.2f} |")


if __name__ == "__main__":
    main()
