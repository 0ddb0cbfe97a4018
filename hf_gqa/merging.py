"""How the key/value heads of a group become one head.

Merge functions are pure functions of canonical weights; `hf_gqa.methods` registers them as conversion methods.
A merge function receives canonical weights whose KV heads are already ordered so that the groups are
contiguous (`K // G` consecutive KV heads a group, and the query heads with them) and returns canonical weights
with `G` KV heads. It may also change the query and output projections (to fold in maps), which is why it
returns whole `AttentionWeights`: adapters never see how a merge works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .canonical import AttentionWeights

MergeFn = Callable[[AttentionWeights, int, "object | None"], AttentionWeights]


def _group_view(t: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """`[K, ...]` -> `[G, K // G, ...]`."""
    return None if t is None else t.reshape(groups, t.shape[0] // groups, *t.shape[1:])


def merge_mean(weights: AttentionWeights, groups: int, stats: object | None = None) -> AttentionWeights:
    """Ainslie et al. (2023): each merged K/V head (and bias) is the mean of its group's heads.

    `k: [K, d, D] -> [G, d, D]`, `k_bias: [K, d] -> [G, d]`, likewise for values; queries and outputs unchanged.
    """

    def mean(t: torch.Tensor | None) -> torch.Tensor | None:
        grouped = _group_view(t, groups)
        return None if grouped is None else grouped.float().mean(dim=1).to(t.dtype)

    return weights.replace(
        k=mean(weights.k), v=mean(weights.v), k_bias=mean(weights.k_bias), v_bias=mean(weights.v_bias)
    )


def merge_first(weights: AttentionWeights, groups: int, stats: object | None = None) -> AttentionWeights:
    """The paper's baseline: keep the first K/V head of each group."""

    def first(t: torch.Tensor | None) -> torch.Tensor | None:
        grouped = _group_view(t, groups)
        return None if grouped is None else grouped[:, 0].clone()

    return weights.replace(
        k=first(weights.k), v=first(weights.v), k_bias=first(weights.k_bias), v_bias=first(weights.v_bias)
    )


# -- activation-aware merges ----------------------------------------------------------------------------------
# Notation (one layer): x~ = [x, 1] is the augmented attention input, sigma = E[x~ x~^T] ([D+1, D+1]).
# A projection head with weight W [d, D] and bias b [d] is the augmented matrix B = [W | b] ([d, D+1]), so its
# activations are B x~ and their second moments are B sigma B'^T. Every merge below needs only `sigma`.


def calibration_sigma(stats: object | None, method: str) -> torch.Tensor:
    """The `[D + 1, D + 1]` float64 input second moment of `stats` (see `hf_gqa.calibration.LayerStats`)."""
    sigma = getattr(stats, "sigma", None)
    if sigma is None:
        raise ValueError(
            f"merge={method!r} needs calibration statistics: call hf_gqa.patch(model, groups, merge={method!r}, "
            "calibration=texts, tokenizer=tokenizer) (or use merge='mean', which needs no data)."
        )
    return sigma.to(torch.float64)


def augment(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`[n, d, D]` weights and `[n, d]` bias -> `[n, d, D + 1]` float64."""
    w = w.detach().to(torch.float64)
    bias = (
        torch.zeros(w.shape[:2], dtype=w.dtype, device=w.device)
        if b is None
        else b.detach().to(torch.float64)
    )
    return torch.cat([w, bias.unsqueeze(-1)], dim=-1)


def _split_augmented(aug: torch.Tensor, like_w: torch.Tensor, like_b: torch.Tensor | None):
    w = aug[..., :-1].to(like_w.dtype)
    b = None if like_b is None else aug[..., -1].to(like_b.dtype)
    return w, b


def _sqrtm(c: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root of `[n, n]`."""
    vals, vecs = torch.linalg.eigh((c + c.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """`gram^-1 rhs` with a small ridge for rank-deficient `gram`."""
    ridge = 1e-9 * gram.diagonal().abs().mean().clamp(min=1e-30)
    return torch.linalg.solve(
        gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), rhs
    )


def _weighted_pca(units: list[torch.Tensor], sigma: torch.Tensor, weights: list[torch.Tensor] | None):
    """Merge `m` augmented heads `B_u [n, D+1]` into one head `B' [n, D+1]` and maps `M_u [n, n]`.

    Minimises `sum_u E || C_u^(1/2) (B_u x~ - M_u^T B' x~) ||^2` over `B'` (the leading `n` principal directions
    of the concatenated, `C_u`-weighted activations) and, given `B'`, each `M_u` by least squares, so that
    `B_u x~ ~= M_u^T B' x~`. `weights` are the `C_u` (`[n, n]` PSD; identity when None).
    """
    n = units[0].shape[0]
    eye = torch.eye(n, dtype=sigma.dtype, device=sigma.device)
    roots = [eye] * len(units) if weights is None else [_sqrtm(c) for c in weights]
    stacked = torch.cat([r @ b for r, b in zip(roots, units)], dim=0)  # [m n, D+1]
    cov = stacked @ sigma @ stacked.T
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    top = vecs[:, vals.argsort(descending=True)[:n]]  # [m n, n]
    merged = top.T @ stacked  # [n, D+1]
    merged_sigma = merged @ sigma  # [n, D+1], once: each product below reads it
    gram = merged_sigma @ merged.T
    maps = [_solve(gram, merged_sigma @ b.T) for b in units]  # M_u: B_u x~ ~= M_u^T B' x~
    return merged, maps


def _complex_pairs(aug: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rotary pairs of augmented heads `[..., d, D+1]` as complex rows `[..., pairs, D+1]`."""
    return torch.complex(aug[..., a, :], aug[..., b, :])


def _merge_rotary_keys(keys: torch.Tensor, sigma: torch.Tensor, energy: torch.Tensor | None):
    """Rank-1 complex merge of each rotary pair, which commutes with the rotary embedding.

    Args:
        keys: `[m, P, D+1]` complex rows of the group's `m` key heads (pair `f` of head `u` is `keys[u, f] x~`).
        energy: `[m, P]` weights `lambda_u,f` (the query energy of pair `f` of the heads using key head `u`),
            or None for unweighted.

    Returns:
        merged `[P, D+1]` complex rows and coefficients `c [m, P]` with `k_u,f ~= c_u,f k'_f`.
    """
    m, pairs, _ = keys.shape
    # `keys sigma` once, as two real products (sigma is real and symmetric), so that every second moment below
    # is a product of `[m, D+1]` rows: `E[conj(k_u) k_w] = conj(K_u) . (K_w sigma)`. Per pair, a product with the
    # complex `[D+1, D+1]` sigma read all of it from memory three times: at D = 3072 that was most of a layer.
    keys_sigma = torch.complex(keys.real @ sigma, keys.imag @ sigma)  # [m, P, D+1]
    merged = torch.empty(pairs, keys.shape[-1], dtype=keys.dtype, device=keys.device)
    coeff = torch.zeros(m, pairs, dtype=keys.dtype, device=keys.device)
    for f in range(pairs):
        rows, rows_sigma = keys[:, f], keys_sigma[:, f]  # [m, D+1]
        gram = rows.conj() @ rows_sigma.T  # E[conj(k_u) k_w]
        scale = (
            torch.ones(m, dtype=torch.float64, device=keys.device) if energy is None else energy[:, f].sqrt()
        )
        weighted = gram * scale[:, None] * scale[None, :]
        vals, vecs = torch.linalg.eigh((weighted + weighted.conj().T) / 2)
        w = vecs[:, -1] * scale  # k' = sum_u sqrt(l_u) w_u k_u
        new = (w[:, None] * rows).sum(0)
        new_sigma = (w[:, None] * rows_sigma).sum(0)
        norm = (new.conj() @ new_sigma).real
        if norm <= 1e-30:
            merged[f] = rows[0]
            coeff[0, f] = 1
            continue
        merged[f] = new / norm.sqrt()
        coeff[:, f] = merged[f].conj() @ rows_sigma.T  # least squares: E[conj(k') k_u] / E|k'|^2 (= 1)
    return merged, coeff


def _rotate_query_pairs(
    q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coeff: torch.Tensor
) -> torch.Tensor:
    """Fold `conj(c)` into the query's rotary pairs: `q'_f = conj(c_f) q_f`. `q [r, d, D+1]`, `coeff [P]`."""
    qa, qb = q[:, a, :], q[:, b, :]
    cr, ci = coeff.real[None, :, None], coeff.imag[None, :, None]
    out = q.clone()
    out[:, a, :] = cr * qa + ci * qb
    out[:, b, :] = cr * qb - ci * qa
    return out


def _query_energy(q: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`E[q q^T]` of augmented query heads `[r, n, D+1]`, summed over the heads -> `[n, n]`."""
    return torch.einsum("rnd,de,rme->nm", q, sigma, q)


def _merge_keys(
    weights: AttentionWeights, groups: int, sigma: torch.Tensor, score_aware: bool, procrustes: bool
):
    """Merged augmented keys `[G, d, D+1]` and the augmented queries with each group's maps folded in."""
    keys = augment(weights.k, weights.k_bias)
    queries = augment(weights.q, weights.q_bias)
    units, heads, d = weights.num_kv_heads, weights.num_heads, weights.head_dim
    m, r = units // groups, heads // units
    rot = weights.rotary
    rot_dim = 0 if rot is None or weights.extras.get("no_rotary") else rot.rotary_dim
    pa, pb = rot.pairs() if rot_dim else (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    rest = torch.arange(rot_dim, d)
    new_keys = torch.empty(groups, d, keys.shape[-1], dtype=keys.dtype, device=keys.device)
    # the maps are folded into `queries` (this function's own float64 copy, `qs` views of it) in place: a group's
    # query energies are read before its rotary pairs are rotated, and the non-rotary energies read dimensions the
    # rotation leaves
    for g in range(groups):
        us = list(range(g * m, (g + 1) * m))
        qs = [queries[u * r : (u + 1) * r] for u in us]
        if rot_dim:
            kc = _complex_pairs(keys[us], pa, pb)  # [m, P, D+1]
            if procrustes:
                merged, coeff = _procrustes_rotary(kc, sigma)
            else:
                energy = None
                if score_aware:
                    qa = torch.stack([_query_energy(q[:, pa], sigma).diagonal() for q in qs])
                    qb = torch.stack([_query_energy(q[:, pb], sigma).diagonal() for q in qs])
                    energy = qa + qb
                merged, coeff = _merge_rotary_keys(kc, sigma, energy)
            new_keys[g, pa], new_keys[g, pb] = merged.real, merged.imag
            for i, u in enumerate(us):
                queries[u * r : (u + 1) * r] = _rotate_query_pairs(
                    queries[u * r : (u + 1) * r], pa, pb, coeff[i]
                )
        if len(rest):
            blocks = [keys[u][rest] for u in us]
            if procrustes:
                merged, maps = _procrustes(blocks, sigma)
            else:
                energy = [_query_energy(q[:, rest], sigma) for q in qs] if score_aware else None
                merged, maps = _weighted_pca(blocks, sigma, energy)
            new_keys[g][rest] = merged
            for i, u in enumerate(us):  # q' = M_u q on these dims
                sl = queries[u * r : (u + 1) * r]
                sl[:, rest] = torch.einsum("nm,rmd->rnd", maps[i], sl[:, rest])
    return new_keys, queries


def _merge_values(
    weights: AttentionWeights, groups: int, sigma: torch.Tensor, output_aware: bool, procrustes: bool
):
    """Merged augmented values `[G, d, D+1]` and output heads `[H, d, D]` with each group's maps folded in."""
    values = augment(weights.v, weights.v_bias)
    out = weights.o.detach().to(torch.float64).clone()
    units, heads = weights.num_kv_heads, weights.num_heads
    m, r = units // groups, heads // units
    new_values = torch.empty(groups, *values.shape[1:], dtype=values.dtype, device=values.device)
    for g in range(groups):
        us = list(range(g * m, (g + 1) * m))
        blocks = [values[u] for u in us]
        if procrustes:
            merged, maps = _procrustes(blocks, sigma)
        else:
            energy = None
            if output_aware:
                energy = [
                    torch.einsum("rnd,rmd->nm", out[u * r : (u + 1) * r], out[u * r : (u + 1) * r])
                    for u in us
                ]
            merged, maps = _weighted_pca(blocks, sigma, energy)
        new_values[g] = merged
        for i, u in enumerate(us):  # V_u ~= V' M_u, so o'_h = M_u o_h
            out[u * r : (u + 1) * r] = torch.einsum("nm,rmd->rnd", maps[i], out[u * r : (u + 1) * r])
    return new_values, out


def _procrustes(units: list[torch.Tensor], sigma: torch.Tensor, iterations: int = 3):
    """Jin et al. (2024): rotate each head onto the group by orthogonal Procrustes, then average.

    Returns `B' [n, D+1]` and maps `M_u = R_u^T` with `B_u x~ ~= M_u^T B' x~` (`R_u` orthogonal).
    """
    reference = units[0]
    rotations = []
    for _ in range(iterations):
        rotations = []
        for b in units:
            u, _, vh = torch.linalg.svd(b @ sigma @ reference.T)  # cross moment [n, n]
            rotations.append(u @ vh)  # R maps head b onto the reference: R^T b ~ reference
        reference = torch.stack([rot.T @ b for rot, b in zip(rotations, units)]).mean(0)
    return reference, [rot.T for rot in rotations]


def _procrustes_rotary(keys: torch.Tensor, sigma: torch.Tensor, iterations: int = 3):
    """Procrustes restricted to maps that commute with RoPE: a unit phase per head and rotary pair.

    `keys [m, P, D+1]` complex; returns merged `[P, D+1]` and `c [m, P]` with `k_u,f ~= c_u,f k'_f`.
    """
    sig = sigma.to(torch.complex128)
    reference = keys[0]
    phases = torch.ones(keys.shape[:2], dtype=keys.dtype, device=keys.device)
    for _ in range(iterations):
        cross = torch.einsum("upd,de,pe->up", keys.conj(), sig, reference)  # E[conj(k_u) k_ref]
        phases = torch.where(cross.abs() > 0, cross / cross.abs().clamp(min=1e-300), torch.ones_like(cross))
        reference = (phases[:, :, None] * keys).mean(0)  # aligned heads averaged
    return reference, phases.conj()


class one_thread:
    """Context: torch on one CPU thread. The activation-aware merges factor matrices of a few hundred rows
    (`eigh`, `solve`), which LAPACK runs slower on two threads than on one, by 10-200x when other processes share
    the cores (measured: `eigh` of a 192 x 192 float64 matrix, 15 ms on one thread, 3.4 s on two)."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads)


def _activation_merge(
    weights: AttentionWeights,
    groups: int,
    stats: object | None,
    method: str,
    score_aware: bool = False,
    procrustes: bool = False,
) -> AttentionWeights:
    sigma = calibration_sigma(stats, method).to(weights.k.device)
    blocker = weights.extras.get("no_fold")
    if blocker:
        raise ValueError(
            f"merge={method!r} cannot fold maps through this model's {blocker}; use merge='mean' or 'first'."
        )

    with one_thread():
        keys, queries = _merge_keys(weights, groups, sigma, score_aware, procrustes)
        values, out = _merge_values(weights, groups, sigma, score_aware, procrustes)
    k, k_bias = _split_augmented(keys, weights.k, weights.k_bias)
    v, v_bias = _split_augmented(values, weights.v, weights.v_bias)
    q, q_bias = _split_augmented(queries, weights.q, weights.q_bias)
    # a bias-free family keeps no bias: the merged bias column is then zero up to rounding by construction
    return weights.replace(
        q=q, q_bias=q_bias, k=k, k_bias=k_bias, v=v, v_bias=v_bias, o=out.to(weights.o.dtype)
    )


def merge_pca(weights: AttentionWeights, groups: int, stats: object | None = None) -> AttentionWeights:
    """Activation-aware low-rank merge.

    Values: the merged head spans the principal subspace of the group's concatenated value activations; each
    query head's slice of the output projection absorbs its own map from the merged value. Keys: the same on
    non-rotary dimensions; on rotary dimensions a rank-1 complex merge per frequency pair (a rotation with a
    scale, which commutes with RoPE), the inverse side folded into each query head's projection.
    """
    return _activation_merge(weights, groups, stats, "pca")


def merge_score(weights: AttentionWeights, groups: int, stats: object | None = None) -> AttentionWeights:
    """`pca` weighted by what each head's error costs: key errors by the energy of the queries that read them
    (attention logits, not raw keys, are preserved) and value errors by the output projections that read them."""
    return _activation_merge(weights, groups, stats, "score", score_aware=True)


def merge_procrustes(weights: AttentionWeights, groups: int, stats: object | None = None) -> AttentionWeights:
    """Jin et al. (2024), "Align Attention Heads Before Merging Them": orthogonal alignment of each head to the
    group before averaging (a unit phase per rotary pair on rotary dimensions), the alignment folded into the
    query and output projections."""
    return _activation_merge(weights, groups, stats, "procrustes", procrustes=True)
