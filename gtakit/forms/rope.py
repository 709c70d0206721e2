"""Shared RoPE key selection (DESIGN.md section 4, RoRoPE idea).

For one RoPE frequency i the 2-D pairs of all G key heads may be mixed by an orthogonal G x G matrix U_i,
applied identically to both coordinates: that commutes with the rotation, and the query absorbs the inverse.
PCA of the heads' frequency-i components concentrates key energy in a few mixed components; components are
ranked by key energy times the energy of the queries that read them and the best `rope_dim / 2` become the
shared RoPE key. Each kept component keeps its own frequency. What is not kept stays in a per-KV-head residual
key that loses its rotation (the no-RoPE part), and the query for it is the head's original query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gtakit.families.base import SourceAttention

from .linalg import with_bias


@dataclass
class RopeSelection:
    kept: list[tuple[int, int]]  # (frequency index i, mixed component m), in shared-key order
    mixing: torch.Tensor  # [d/2, G, G]; row m of mixing[i] is component m
    freqs: torch.Tensor  # [len(kept)] frequencies of the shared key
    key_rows: torch.Tensor  # [2P, D] shared RoPE key projection (rotate-half layout)
    key_bias: torch.Tensor | None  # [2P]
    query_rows: list[torch.Tensor]  # per head [2P, D]
    query_bias: list[torch.Tensor] | None
    residual_key: list[torch.Tensor]  # per KV head [d, D]: key minus its kept components (rotation dropped)
    score_energy_kept: float  # share of the ranking score held by the kept components

    def key_map(self, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """[2P, G*d]: the shared RoPE key as a linear map of the source key vector (key_rows = map @ wk)."""
        half, P = head_dim // 2, len(self.kept)
        out = torch.zeros(2 * P, num_kv_heads * head_dim, dtype=self.key_rows.dtype)
        for j, (i, m) in enumerate(self.kept):
            for c in range(2):
                out[j + c * P, torch.arange(num_kv_heads) * head_dim + c * half + i] = self.mixing[i, m]
        return out

    @property
    def index(self) -> list[int]:
        """The source frequency index of every kept pair (what the model's `rope_index` stores)."""
        return [i for i, _ in self.kept]


def _energy(rows: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    """Second moment of `rows @ x` summed over rows' leading dims: tr(rows cov rows^T)."""
    if cov is None:
        return (rows * rows).sum(dim=-1)
    return ((rows @ cov) * rows).sum(dim=-1)


def select_shared_rope(
    src: SourceAttention,
    num_pairs: int,
    input_cov: torch.Tensor | None = None,
    query_cov: torch.Tensor | None = None,
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    grid: list[int] | None = None,
    input_mean: torch.Tensor | None = None,
) -> RopeSelection:
    """Pick `num_pairs` mixed (frequency, component) pairs for the shared RoPE key.

    `input_cov` [D, D] is the second moment of the layer input (None: identity, i.e. weights only).
    `query_cov`, if given, replaces the query energies by measured ones: [H, d] mean squared query per dim.
    `rotation` ([H, d/2] attention-weighted E[cos], E[sin] of each frequency), if given, ranks components by the
    score energy that their mean rotation cannot reproduce: a slowly rotating component loses little when it
    becomes position-free, a fast one loses everything.
    `grid`, if given, lists the only frequencies the key may use, at most one component each (the best-scoring):
    what an output format with one global RoPE table (DeepSeek-V3) can hold.
    `input_mean` (E[x]) with query/key biases: energies are those of the affine maps, biases included.
    """
    G, half = src.num_kv_heads, src.head_dim // 2
    if not 0 <= num_pairs <= G * half:
        raise ValueError(f"num_pairs must be in [0, {G * half}], got {num_pairs}")
    # Energies of the affine projections (biases as a constant input coordinate); the kept rows stay linear.
    biased = src.bk is not None or src.bq is not None
    k_bias = (src.bk if src.bk is not None else src.wk.new_zeros(G * src.head_dim)) if biased else None
    q_bias = (src.bq if src.bq is not None else src.wq.new_zeros(src.num_heads * src.head_dim)) if biased else None
    wk_energy, energy_cov = with_bias(src.wk, k_bias, input_cov, input_mean)
    wq_energy, _ = with_bias(src.wq, q_bias, input_cov, input_mean)
    mixing, key_energy = component_mixing(src, wk_energy, energy_cov)
    score = component_scores(src, mixing, key_energy, wq_energy, energy_cov, query_cov, rotation)
    if src.rotary_pairs is not None:  # frequency-0 pairs (partial rotary) never enter the RoPE key
        if num_pairs > G * src.rotary_pairs:
            raise ValueError(f"num_pairs must be at most {G * src.rotary_pairs} (rotating pairs), got {num_pairs}")
        score[src.rotary_pairs :] = -1.0
    if grid is not None:
        score = on_grid(score, grid, num_pairs)
    flat = torch.argsort(score.flatten(), descending=True)[:num_pairs]
    kept = sorted((int(f) // G, int(f) % G) for f in flat)  # high frequencies first, like standard RoPE
    total = float(score.sum())
    kept_score = float(sum(score[i, m] for i, m in kept))
    key_rows, key_bias, residual = shared_key_rows(src, kept, mixing)
    query_rows, query_bias = shared_query_rows(src, kept, mixing)
    return RopeSelection(
        kept=kept,
        mixing=mixing,
        freqs=torch.tensor([float(src.inv_freq[i]) for i, _ in kept], dtype=torch.float32),
        key_rows=key_rows,
        key_bias=key_bias,
        query_rows=query_rows,
        query_bias=query_bias,
        residual_key=residual,
        score_energy_kept=kept_score / total if total > 0 else 1.0,
    )


def component_mixing(src: SourceAttention, wk_energy: torch.Tensor, energy_cov: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frequency, the KV heads' key components mixed into orthogonal ones, strongest first: the mixing
    [d/2, G, G] (row m of mixing[i] is component m) and each component's key energy [d/2, G]."""
    G, half = src.num_kv_heads, src.head_dim // 2
    wk_energy = wk_energy.view(G, 2, half, -1)
    mixing = torch.zeros(half, G, G, dtype=src.wk.dtype)
    key_energy = torch.zeros(half, G, dtype=src.wk.dtype)
    for i in range(half):
        rows = wk_energy[:, :, i, :]  # [G, 2, D (+1)]
        if energy_cov is None:
            cov = torch.einsum("gcd,hcd->gh", rows, rows)
        else:
            cov = torch.einsum("gcd,de,hce->gh", rows, energy_cov, rows)
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)
        mixing[i] = evecs[:, order].T
        key_energy[i] = evals[order].clamp(min=0)
    return mixing, key_energy


def component_scores(src: SourceAttention, mixing: torch.Tensor, key_energy: torch.Tensor, wq_energy: torch.Tensor,
                     energy_cov: torch.Tensor | None, query_cov: torch.Tensor | None,
                     rotation: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """[d/2, G]: the score energy of each mixed component, key energy times the energy of the queries reading it
    (less what the mean rotation reproduces, with `rotation`)."""
    H, half = src.num_heads, src.head_dim // 2
    if query_cov is not None:
        q_energy = query_cov.view(H, 2, half).sum(dim=1)  # [H, i]
    else:
        q_energy = _energy(wq_energy.view(H, 2, half, -1), energy_cov).sum(dim=1)  # [H, i]
    # Query energy of component m of frequency i: heads read it with weight U_i[m, g(h)].
    head_weight = mixing[:, :, src.group_of_head] ** 2  # [i, m, H]
    if rotation is not None:
        kept_share = (rotation[0] ** 2 + rotation[1] ** 2).clamp(max=1.0)  # [H, i]
        q_energy = q_energy * (1.0 - kept_share)
    return key_energy * torch.einsum("imh,hi->im", head_weight, q_energy)


def shared_key_rows(src: SourceAttention, kept: list[tuple[int, int]], mixing: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """The shared RoPE key's rows [2P, D] and bias, and each KV head's key with the kept components removed."""
    G, half, P = src.num_kv_heads, src.head_dim // 2, len(kept)
    wk = src.wk.view(G, 2, half, -1)  # [G, coord, i, D]
    key_rows = torch.zeros(2 * P, wk.shape[-1], dtype=wk.dtype)
    residual = [src.wk[src.kv_rows(g)].clone() for g in range(G)]
    key_bias = torch.zeros(2 * P, dtype=wk.dtype) if src.bk is not None else None
    bk = src.bk.view(G, 2, half) if src.bk is not None else None
    for j, (i, m) in enumerate(kept):
        u = mixing[i, m]  # [G]
        for c in range(2):
            row = torch.einsum("g,gd->d", u, wk[:, c, i, :])
            key_rows[j + c * P] = row
            for g in range(G):  # remove this component from every head's residual key
                residual[g][i + c * half] -= u[g] * row
            if key_bias is not None:
                key_bias[j + c * P] = torch.dot(u, bk[:, c, i])
    return key_rows, key_bias, residual


def shared_query_rows(src: SourceAttention, kept: list[tuple[int, int]], mixing: torch.Tensor
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per head, the query rows [2P, D] (and bias) that score against the shared RoPE key."""
    H, half, P = src.num_heads, src.head_dim // 2, len(kept)
    wq = src.wq.view(H, 2, half, -1)
    groups = src.group_of_head
    query_rows, query_bias = [], [] if src.bq is not None else None
    bq = src.bq.view(H, 2, half) if src.bq is not None else None
    for h in range(H):
        rows = torch.zeros(2 * P, wq.shape[-1], dtype=wq.dtype)
        bias = torch.zeros(2 * P, dtype=wq.dtype)
        for j, (i, m) in enumerate(kept):
            weight = mixing[i, m, groups[h]]
            for c in range(2):
                rows[j + c * P] = weight * wq[h, c, i]
                if bq is not None:
                    bias[j + c * P] = weight * bq[h, c, i]
        query_rows.append(rows)
        if query_bias is not None:
            query_bias.append(bias)
    return query_rows, query_bias


def on_grid(score: torch.Tensor, grid: list[int], num_pairs: int) -> torch.Tensor:
    """`score` [d/2, G] with every pair off `grid`, and all but the best component of each grid frequency, ruled
    out (-1, below any real score)."""
    if num_pairs > len(grid):
        raise ValueError(f"num_pairs {num_pairs} exceeds the {len(grid)} frequencies of the RoPE grid")
    allowed = torch.full_like(score, -1.0)
    for i in grid:
        best = int(torch.argmax(score[i]))
        allowed[i, best] = score[i, best].clamp(min=0.0)
    return allowed


def rope_grid(head_dim: int, pairs: int, kind: str) -> list[int]:
    """The source frequency indices of a global RoPE table of `pairs` slots: `fastest` takes the first `pairs`,
    `spread` every (d/2 / pairs)-th from index 0 (every other one when the key is half a head wide). Slot j's
    frequency theta^(-2kj/d) is the table theta'^(-2j/r) of width r = 2 pairs with theta' = theta^(k r / d)."""
    half = head_dim // 2
    if not 1 <= pairs <= half:
        raise ValueError(f"a RoPE grid of {pairs} pairs does not fit {half} source frequencies")
    stride = 1 if kind == "fastest" else half // pairs
    return [stride * j for j in range(pairs)]


def nope_query(
    src: SourceAttention, head: int, rotation: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Query rows (and bias) of `head` for the position-free residual key.

    The residual key lost its rotation R(-dt theta_i); replacing R by its attention-weighted mean
    M_i = [[c, s], [-s, c]] is the best position-free stand-in, and M_i folds into the query: q' = M_i^T q.
    """
    rows = src.wq[src.q_rows(head)].clone()
    bias = src.bq[src.q_rows(head)].clone() if src.bq is not None else None
    if rotation is None:
        return rows, bias
    half = src.head_dim // 2
    c = rotation[0][head].to(rows.dtype)
    s = rotation[1][head].to(rows.dtype)
    a, b = rows[:half], rows[half:]
    rows = torch.cat([c[:, None] * a - s[:, None] * b, s[:, None] * a + c[:, None] * b])
    if bias is not None:
        ba, bb = bias[:half], bias[half:]
        bias = torch.cat([c * ba - s * bb, s * ba + c * bb])
    return rows, bias
