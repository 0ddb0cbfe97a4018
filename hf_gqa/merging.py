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


class one_thread:
    """Context: torch on one CPU thread. The activation-aware merges factor matrices of a few hundred rows
    (`eigh`, `solve`), which LAPACK runs slower on two threads than on one, by 10-200x when other processes share
    the cores (measured: `eigh` of a 192 x 192 float64 matrix, 15 ms on one thread, 3.4 s on two)."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads)


def _eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.linalg.eigh` on one thread (`one_thread`)."""
    with one_thread():
        return torch.linalg.eigh(a)


def _sqrtm(c: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root of `[n, n]`."""
    vals, vecs = _eigh((c + c.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """`gram^-1 rhs` with a small ridge for rank-deficient `gram`."""
    ridge = 1e-9 * gram.diagonal().abs().mean().clamp(min=1e-30)
    with one_thread():
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
    vals, vecs = _eigh((cov + cov.T) / 2)
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
        vals, vecs = _eigh((weighted + weighted.conj().T) / 2)
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


def _row_energy(heads: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`E[(b x~)^2]` of every row `b` of augmented heads `[n, d, D+1]` -> `[n, d]` (one product with `sigma`)."""
    flat = heads.reshape(-1, heads.shape[-1])
    return ((flat @ sigma) * flat).sum(-1).reshape(heads.shape[:2])


def _query_energy(q: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`E[q q^T]` of augmented query heads `[r, n, D+1]`, summed over the heads -> `[n, n]`."""
    return torch.einsum("rnd,de,rme->nm", q, sigma, q)


def _rows(t: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    """Heads `lo:hi` of a per-head tensor `[n, ...]`, or None."""
    return None if t is None else t[lo:hi]


def _store(aug: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Write augmented heads `aug [n, d, D+1]` (float64) into weights `w [n, d, D]` and bias `b [n, d]` (each
    in its own dtype)."""
    w.copy_(aug[..., :-1])
    if b is not None:
        b.copy_(aug[..., -1])


def _new_like(t: torch.Tensor | None, heads: int | None = None) -> torch.Tensor | None:
    """An uninitialised tensor like `t` (`[n, ...]`), with `heads` rows instead of `n` when given."""
    if t is None:
        return None
    return t.new_empty((heads if heads is not None else t.shape[0], *t.shape[1:]))


def _merge_keys(
    weights: AttentionWeights, groups: int, sigma: torch.Tensor, score_aware: bool, procrustes: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Merged keys `k [G, d, D]`, `k_bias [G, d]` and the queries with each group's maps folded in, `q [H, d, D]`,
    `q_bias [H, d]` (biases None where the weights have none), in the weights' dtypes.

    One group at a time: only that group's `m` key heads and `m r` query heads are held in float64
    (`[m, d, D+1]`, `[m r, d, D+1]`), not the whole layer's (at D = 3072, 24 heads: 0.15 GiB less at the peak)."""
    units, heads, d = weights.num_kv_heads, weights.num_heads, weights.head_dim
    m, r = units // groups, heads // units
    rot = weights.rotary
    rot_dim = 0 if rot is None or weights.extras.get("no_rotary") else rot.rotary_dim
    pa, pb = rot.pairs() if rot_dim else (torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    rest = torch.arange(rot_dim, d)
    k, k_bias = _new_like(weights.k, groups), _new_like(weights.k_bias, groups)
    q, q_bias = _new_like(weights.q), _new_like(weights.q_bias)
    for g in range(groups):
        keys = augment(weights.k[g * m : (g + 1) * m], _rows(weights.k_bias, g * m, (g + 1) * m))
        lo, hi = g * m * r, (g + 1) * m * r
        # the maps are folded into `queries` (this group's own float64 copy, `qs` views of it) in place: its query
        # energies are read before its rotary pairs are rotated, and the non-rotary energies read dimensions the
        # rotation leaves
        queries = augment(weights.q[lo:hi], _rows(weights.q_bias, lo, hi))
        qs = [queries[i * r : (i + 1) * r] for i in range(m)]
        new_key = torch.empty(d, keys.shape[-1], dtype=keys.dtype, device=keys.device)
        if rot_dim:
            kc = _complex_pairs(keys, pa, pb)  # [m, P, D+1]
            if procrustes:
                merged, coeff = _procrustes_rotary(kc, sigma)
            else:
                energy = None
                if score_aware:
                    rows = torch.stack([_row_energy(q_u, sigma).sum(0) for q_u in qs])  # [m, d]
                    energy = rows[:, pa] + rows[:, pb]
                merged, coeff = _merge_rotary_keys(kc, sigma, energy)
            del kc
            new_key[pa], new_key[pb] = merged.real, merged.imag
            for i in range(m):
                queries[i * r : (i + 1) * r] = _rotate_query_pairs(
                    queries[i * r : (i + 1) * r], pa, pb, coeff[i]
                )
        if len(rest):
            blocks = [keys[i][rest] for i in range(m)]
            if procrustes:
                merged, maps = _procrustes(blocks, sigma)
            else:
                energy = [_query_energy(q_u[:, rest], sigma) for q_u in qs] if score_aware else None
                merged, maps = _weighted_pca(blocks, sigma, energy)
            new_key[rest] = merged
            for i in range(m):  # q' = M_u q on these dims
                sl = queries[i * r : (i + 1) * r]
                sl[:, rest] = torch.einsum("nm,rmd->rnd", maps[i], sl[:, rest])
        _store(new_key[None], k[g : g + 1], _rows(k_bias, g, g + 1))
        _store(queries, q[lo:hi], _rows(q_bias, lo, hi))
    return k, k_bias, q, q_bias


def _merge_values(
    weights: AttentionWeights, groups: int, sigma: torch.Tensor, output_aware: bool, procrustes: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Merged values `v [G, d, D]`, `v_bias [G, d]` (None without one) and the output heads with each group's
    maps folded in, `o [H, d, D]`, in the weights' dtypes; one group's heads in float64 at a time."""
    units, heads = weights.num_kv_heads, weights.num_heads
    m, r = units // groups, heads // units
    v, v_bias, o = _new_like(weights.v, groups), _new_like(weights.v_bias, groups), _new_like(weights.o)
    for g in range(groups):
        values = augment(weights.v[g * m : (g + 1) * m], _rows(weights.v_bias, g * m, (g + 1) * m))
        lo, hi = g * m * r, (g + 1) * m * r
        out = weights.o[lo:hi].detach().to(torch.float64)  # [m r, d, D]
        blocks = [values[i] for i in range(m)]
        if procrustes:
            merged, maps = _procrustes(blocks, sigma)
        else:
            energy = None
            if output_aware:
                energy = [
                    torch.einsum("rnd,rmd->nm", out[i * r : (i + 1) * r], out[i * r : (i + 1) * r])
                    for i in range(m)
                ]
            merged, maps = _weighted_pca(blocks, sigma, energy)
        _store(merged[None], v[g : g + 1], _rows(v_bias, g, g + 1))
        for i in range(m):  # V_u ~= V' M_u, so o'_h = M_u o_h
            o[lo + i * r : lo + (i + 1) * r] = torch.einsum("nm,rmd->rnd", maps[i], out[i * r : (i + 1) * r])
    return v, v_bias, o


def _procrustes(units: list[torch.Tensor], sigma: torch.Tensor, iterations: int = 3):
    """Jin et al. (2024): rotate each head onto the group by orthogonal Procrustes, then average.

    Returns `B' [n, D+1]` and maps `M_u = R_u^T` with `B_u x~ ~= M_u^T B' x~` (`R_u` orthogonal).
    """
    reference = units[0]
    rotations = []
    for _ in range(iterations):
        rotations = []
        for b in units:
            cross = b @ sigma @ reference.T  # cross moment [n, n]
            with one_thread():
                u, _, vh = torch.linalg.svd(cross)
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

    k, k_bias, q, q_bias = _merge_keys(weights, groups, sigma, score_aware, procrustes)
    v, v_bias, o = _merge_values(weights, groups, sigma, score_aware, procrustes)
    # a bias-free family keeps no bias: the merged bias column is then zero up to rounding by construction
    return weights.replace(q=q, q_bias=q_bias, k=k, k_bias=k_bias, v=v, v_bias=v_bias, o=o)


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
