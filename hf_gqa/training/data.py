"""Text for uptraining: reading documents, packing them into token blocks, held-out perplexity on those blocks.

Text is tokenised without special tokens, joined with the EOS token between documents and cut into blocks of
`block_size` tokens (the tail shorter than a block is dropped). Training, evaluation during training and
`evaluate_perplexity` all use this packing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..perplexity import perplexity

DataLike = Any
"""Text for training or evaluation: a path (`str` or `os.PathLike`) to a text file or a folder of `*.txt` files, a
list of `pathlib.Path`, a `datasets.Dataset` / `IterableDataset` with a text column, or any iterable of strings
(each string one document)."""


# -- reading ---------------------------------------------------------------------------------------------------
def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"No *.txt files in {path}.")
        return files
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist (text data is a file, a folder of *.txt, or strings)."
        )
    return [path]


def _dataset_types() -> tuple[type, ...]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return ()
    return (datasets.Dataset, datasets.IterableDataset)


def read_texts(data: DataLike, text_column: str = "text") -> list[str]:
    """The documents in `data` (see `DataLike`): one string per file, dataset row or item."""
    if isinstance(data, (str, os.PathLike)):
        return [p.read_text(encoding="utf-8") for p in _text_files(Path(data))]
    if isinstance(data, _dataset_types()):
        if data.column_names is not None and text_column not in data.column_names:
            raise ValueError(f"The dataset has no {text_column!r} column (columns: {data.column_names}).")
        return [row[text_column] for row in data]
    texts = []
    for item in data:
        if isinstance(item, Path):
            texts.extend(p.read_text(encoding="utf-8") for p in _text_files(item))
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise TypeError(
                f"Text data must hold strings or pathlib.Path objects, got {type(item).__name__}."
            )
    return texts


# -- packing ---------------------------------------------------------------------------------------------------
def pack_blocks(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], block_size: int) -> torch.Tensor:
    """Tokenise `texts`, join them with the EOS token between documents, cut into blocks.

    Returns `[num_blocks, block_size]` token ids (int64); the tail shorter than a block is dropped.
    """
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        if not text:
            continue
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"The text holds {len(ids)} tokens, fewer than one block of {block_size}.")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).reshape(n, block_size)


def as_blocks(
    data: DataLike | torch.Tensor, tokenizer: PreTrainedTokenizerBase, block_size: int, text_column: str
) -> torch.Tensor:
    """`[num_blocks, block_size]` token ids: `data` itself when it is already a tensor of blocks, else
    `pack_blocks` of its documents."""
    if isinstance(data, torch.Tensor):
        return data
    return pack_blocks(tokenizer, read_texts(data, text_column), block_size)


def train_and_eval_blocks(
    tokenizer: PreTrainedTokenizerBase,
    train_data: DataLike | torch.Tensor,
    eval_data: DataLike | torch.Tensor | None,
    block_size: int,
    text_column: str,
    eval_fraction: float = 0.0,
    max_eval_blocks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(train blocks [n_train, block_size], eval blocks [n_eval, block_size] or None)`.

    The evaluation blocks are `eval_data` packed, or without it the last `eval_fraction` of the training blocks
    (taken out of training), or none; at most `max_eval_blocks` of them.
    """
    train_blocks = as_blocks(train_data, tokenizer, block_size, text_column)
    eval_blocks = None
    if eval_data is not None:
        eval_blocks = as_blocks(eval_data, tokenizer, block_size, text_column)
    elif eval_fraction > 0:
        n_eval = max(1, int(round(train_blocks.shape[0] * eval_fraction)))
        if n_eval >= train_blocks.shape[0]:
            raise ValueError(f"eval_fraction={eval_fraction} leaves no training blocks.")
        train_blocks, eval_blocks = train_blocks[:-n_eval], train_blocks[-n_eval:]
    if eval_blocks is not None and max_eval_blocks is not None:
        eval_blocks = eval_blocks[:max_eval_blocks]
    return train_blocks, eval_blocks


class TokenBlocks(torch.utils.data.Dataset):
    """Packed blocks for causal LM training: item `i` is `{"input_ids": [block], "labels": [block]}`."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i].clone()}


# -- held-out perplexity ---------------------------------------------------------------------------------------
def evaluate_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: DataLike | torch.Tensor,
    block_size: int = 512,
    batch_size: int = 4,
    max_blocks: int | None = None,
    text_column: str = "text",
) -> float:
    """Perplexity of `model` on `texts`: exp of the mean next-token loss over non-overlapping packed blocks.

    Args:
        texts: text in any `DataLike` form, or already packed `[num_blocks, block_size]` ids.
        block_size: tokens per block (each block is scored independently, from its first token).
        max_blocks: score only the first `max_blocks` blocks.

    Returns:
        `exp(sum of token losses / number of predicted tokens)`, `block_size - 1` predictions per block
        (`hf_gqa.perplexity.perplexity` of the blocks).
    """
    blocks = as_blocks(texts, tokenizer, block_size, text_column)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    return perplexity(model, blocks, batch_size=batch_size)


__all__ = [
    "DataLike",
    "TokenBlocks",
    "as_blocks",
    "evaluate_perplexity",
    "pack_blocks",
    "read_texts",
    "train_and_eval_blocks",
]
