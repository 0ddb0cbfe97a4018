"""The canonical per-head layout every architecture adapter translates to and from.

All projections are stored per head as `[heads, head_dim, hidden]`, so that head `h` of a projection computes
`x @ W[h].T (+ b[h])` from hidden states `x` of size `hidden`. The output projection is stored the same way,
`o[h] = W_o[:, h * head_dim:(h + 1) * head_dim].T`, i.e. `[heads, head_dim, hidden]`, so that the attention
output is `sum_h attn_h @ o[h] (+ o_bias)`.

Merging and grouping functions work only on this layout and never see a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class RotarySpec:
    """Where and how rotary position embeddings act on a head.

    Attributes:
        rotary_dim: number of leading dimensions of each head that are rotated (`head_dim` for full rotary).
        interleaved: `True` for GPT-J style pairs `(0, 1), (2, 3), ...`; `False` for the `rotate_half` layout
            of Llama / GPT-NeoX, whose pairs are `(i, i + rotary_dim // 2)`.
    """

    rotary_dim: int
    interleaved: bool = False

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices `(a, b)` of the rotated pairs, each `[rotary_dim // 2]`: dimension `a[i]` and `b[i]` rotate together."""
        half = self.rotary_dim // 2
        if self.interleaved:
            idx = torch.arange(half)
            return 2 * idx, 2 * idx + 1
        return torch.arange(half), torch.arange(half) + half


@dataclass
class AttentionWeights:
    """Per-head weights of one attention block.

    Shapes (`H` query heads, `K` key/value heads, `d` head_dim, `D` hidden size):
        q: `[H, d, D]`, k: `[K, d, D]`, v: `[K, d, D]`, o: `[H, d, D]`;
        q_bias: `[H, d]`, k_bias: `[K, d]`, v_bias: `[K, d]`, o_bias: `[D]` (each optional).

    Query head `h` attends with key/value head `h // (H // K)`.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    rotary: RotarySpec | None = None
    extras: dict = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return self.q.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[0]

    @property
    def head_dim(self) -> int:
        return self.q.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.q.shape[2]

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> AttentionWeights:
        return replace(self, **changes)

    def permute_kv(self, order: list[int]) -> AttentionWeights:
        """Reorder the key/value heads (and their query and output heads with them); the function is unchanged.

        Args:
            order: a permutation of `range(K)`; new KV head `i` is old KV head `order[i]`.
        """
        r = self.queries_per_kv
        q_order = torch.tensor([u * r + j for u in order for j in range(r)])
        kv_order = torch.tensor(order)

        def take(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return self.replace(
            q=self.q[q_order],
            o=self.o[q_order],
            q_bias=take(self.q_bias, q_order),
            k=self.k[kv_order],
            v=self.v[kv_order],
            k_bias=take(self.k_bias, kv_order),
            v_bias=take(self.v_bias, kv_order),
        )


def split_heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """`nn.Linear` weight `[heads * d, D]` -> `[heads, d, D]`."""
    return weight.reshape(heads, weight.shape[0] // heads, weight.shape[1])


def join_heads(weight: torch.Tensor) -> torch.Tensor:
    """`[heads, d, D]` -> `nn.Linear` weight `[heads * d, D]`."""
    return weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])


def split_out_heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Output projection `nn.Linear` weight `[D, heads * d]` -> `[heads, d, D]`."""
    out_features, in_features = weight.shape
    return weight.t().reshape(heads, in_features // heads, out_features)


def join_out_heads(weight: torch.Tensor) -> torch.Tensor:
    """`[heads, d, D]` -> output projection `nn.Linear` weight `[D, heads * d]`."""
    return join_heads(weight).t()


def split_bias(bias: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """`[heads * d]` -> `[heads, d]`."""
    return None if bias is None else bias.reshape(heads, -1)


def join_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """`[heads, d]` -> `[heads * d]`."""
    return None if bias is None else bias.reshape(-1)
