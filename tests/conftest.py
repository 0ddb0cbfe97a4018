from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 200, (2, 12), generator=g)


@pytest.fixture
def padded() -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch: row 0 has 4 pad tokens (id 0)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 200, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :4] = 0
    mask[0, :4] = 0
    return ids, mask
