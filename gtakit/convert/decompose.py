"""Per-layer linear algebra turning one source attention layer into GLA/MLA or GTA weights (float64).

The error metric is pluggable (see `methods.py`): a `LayerMetric` gives the input second moment used to
measure key/value errors (identity = weights only) and optional extra weights on key and value errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .rope import SourceAttention, nope_query, select_shared_rope


@dataclass
class LayerMetric:
    """How errors are measured when compressing one layer.

    input_cov: E[x x^T] of the layer input [D, D]; None means identity (weight-only SVD).
    key_out_weight: per KV head [d, d] PSD weight on no-RoPE key errors (e.g. E[q q^T] of the heads reading it).
    value_out_weight: per KV head [d, d] PSD weight on value errors (e.g. W_o^T W_o of the heads reading it).
    balance: scale keys so key and value blocks carry equal energy before the joint decomposition.
    """

    input_cov: torch.Tensor | None = None
    query_cov: torch.Tensor | None = None  # [H, d] mean squared query per dim, for the RoPE ranking
    key_out_weight: list[torch.Tensor] | None = None
    value_out_weight: list[torch.Tensor] | None = None
    balance: bool = True
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None  # [H, d/2] mean cos/sin per head and frequency
    gta_state: str = "value"  # GTA tied state: "value" (values exact) or "joint" (key/value subspace)


@dataclass
class ConvertedLayer:
    tensors: dict[str, torch.Tensor]  # attention tensors, names relative to `self_attn.`
    metrics: dict[str, float] = field(default_factory=dict)


def _moment(rows: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
    return rows @ rows.T if cov is None else rows @ cov @ rows.T


def _sqrt_psd(mat: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(mat)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def _rel_err(resid: torch.Tensor, ref: torch.Tensor, cov: torch.Tensor | None) -> float:
    den = float(torch.trace(_moment(ref, cov)))
    return float(torch.trace(_moment(resid, cov)).clamp(min=0).sqrt() / max(den, 1e-300) ** 0.5) if den > 0 else 0.0


def _top_basis(moment: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal [n, rank] basis of the top eigenvectors of a PSD moment (zero columns past its size)."""
    evals, evecs = torch.linalg.eigh(moment)
    order = torch.argsort(evals, descending=True)[:rank]
    basis = evecs[:, order]
    if basis.shape[1] < rank:
        basis = torch.cat([basis, basis.new_zeros(basis.shape[0], rank - basis.shape[1])], dim=1)
    return basis


def _svd_full(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD with a full orthogonal Vh; falls back to the eigendecomposition of M^T M when LAPACK's SVD fails
    to converge on an ill-conditioned M (seen on real checkpoints)."""
    try:
        return torch.linalg.svd(mat, full_matrices=True)
    except torch.linalg.LinAlgError:
        evals, evecs = torch.linalg.eigh(mat.T @ mat)
        order = torch.argsort(evals, descending=True)
        evecs = evecs[:, order]
        k = min(mat.shape)
        sing = evals[order][:k].clamp(min=0).sqrt()
        left = mat @ evecs[:, :k]
        safe = torch.where(sing > sing.max() * 1e-12, sing, torch.ones_like(sing))
        left = torch.where(sing > sing.max() * 1e-12, left / safe, torch.zeros_like(left))
        return left, sing, evecs.T


def _fold_value_bias(src: SourceAttention) -> torch.Tensor | None:
    """A value bias passes through softmax unchanged (weights sum to 1), so it folds into o_proj's bias."""
    if src.bv is None and src.bo is None:
        return None
    bias = src.bo.clone() if src.bo is not None else src.wo.new_zeros(src.wo.shape[0])
    if src.bv is not None:
        groups = src.group_of_head
        for h in range(src.num_heads):
            bias += src.wo[:, src.q_rows(h)] @ src.bv[src.kv_rows(groups[h])]
    return bias


def _weighted(rows: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return rows if weight is None else _sqrt_psd(weight) @ rows


def convert_gla_layer(
    src: SourceAttention,
    num_latents: int,
    kv_rank: int,
    rope_pairs: int,
    metric: LayerMetric,
) -> ConvertedLayer:
    """GLA/MLA weights. The no-RoPE head dim is d, or 0 when every RoPE component is kept."""
    H, G, d = src.num_heads, src.num_kv_heads, src.head_dim
    cov = metric.input_cov
    rope = select_shared_rope(src, rope_pairs, cov, metric.query_cov, metric.rotation)
    nope_dim = 0 if rope_pairs == G * d // 2 else d
    groups = src.group_of_head
    per_latent = H // num_latents

    down_rows, k_up, v_up = [], [None] * H, [None] * H
    key_errs, value_errs = [], []
    for j in range(num_latents):
        heads = range(j * per_latent, (j + 1) * per_latent)
        kv_heads = sorted({groups[h] for h in heads})
        keys = [rope.residual_key[g] for g in kv_heads] if nope_dim else []
        values = [src.wv[src.kv_rows(g)] for g in kv_heads]
        # Error weights (identity unless the method supplies them) make the decomposition minimise what the
        # next step sees; they are undone on the up-projections below.
        kw = metric.key_out_weight
        vw = metric.value_out_weight
        keys_w = [_weighted(k, kw[g] if kw else None) for k, g in zip(keys, kv_heads)]
        values_w = [_weighted(v, vw[g] if vw else None) for v, g in zip(values, kv_heads)]
        alpha = 1.0
        if keys_w and metric.balance:
            k_energy = sum(float(torch.trace(_moment(k, cov))) for k in keys_w)
            v_energy = sum(float(torch.trace(_moment(v, cov))) for v in values_w)
            if k_energy > 0 and v_energy > 0:
                alpha = (v_energy / k_energy) ** 0.5
        stacked_w = torch.cat([alpha * k for k in keys_w] + values_w)
        basis = _top_basis(_moment(stacked_w, cov), kv_rank)  # [rows, c]
        # Latent = projection of the weighted rows; the up-projection maps it back in unweighted coordinates:
        # stacked ~= up @ (basis^T stacked_w), with up = pinv(W) blocks applied to the basis.
        down = basis.T @ stacked_w  # [c, D]
        # Blocks of `basis` follow the stacking order: one d-row block per key head, then per value head.
        blocks = [("k", g, alpha, kw[g] if kw else None) for g in (kv_heads if keys else [])]
        blocks += [("v", g, 1.0, vw[g] if vw else None) for g in kv_heads]
        block_up = {}
        for index, (kind, g, scale, w) in enumerate(blocks):
            rows = basis[index * d : (index + 1) * d] / scale
            if w is not None:
                rows = torch.linalg.pinv(_sqrt_psd(w), hermitian=True) @ rows
            block_up[(kind, g)] = rows  # [d, c]
        if keys:
            k_recon = torch.cat([block_up[("k", g)] for g in kv_heads]) @ down
            key_errs.append(_rel_err(k_recon - torch.cat(keys), torch.cat(keys), cov))
        v_recon = torch.cat([block_up[("v", g)] for g in kv_heads]) @ down
        value_errs.append(_rel_err(v_recon - torch.cat(values), torch.cat(values), cov))
        down_rows.append(down)
        for h in heads:
            if nope_dim:
                k_up[h] = block_up[("k", groups[h])]
            v_up[h] = block_up[("v", groups[h])]

    q_rows, q_bias = [], [] if src.bq is not None else None
    for h in range(H):
        nope_rows, nope_bias = nope_query(src, h, metric.rotation)
        q_rows.append(torch.cat(([nope_rows] if nope_dim else []) + [rope.query_rows[h]]))
        if q_bias is not None:
            q_bias.append(torch.cat(([nope_bias] if nope_dim else []) + [rope.query_bias[h]]))
    tensors = {
        "q_proj.weight": torch.cat(q_rows),
        "kv_down_proj.weight": torch.cat(down_rows),
        "k_rope_proj.weight": rope.key_rows,
        "k_up_proj.weight": torch.cat(k_up) if nope_dim else src.wq.new_zeros(0, kv_rank),
        "v_up_proj.weight": torch.cat(v_up),
        "o_proj.weight": src.wo.clone(),
        "rope_freqs": rope.freqs,
    }
    if src.bq is not None or src.bk is not None:
        q_width = H * (nope_dim + 2 * len(rope.kept))
        tensors["q_proj.bias"] = torch.cat(q_bias) if q_bias is not None else src.wq.new_zeros(q_width)
        tensors["kv_down_proj.bias"] = src.wq.new_zeros(num_latents * kv_rank)
        rope_width = 2 * len(rope.kept)
        tensors["k_rope_proj.bias"] = rope.key_bias if rope.key_bias is not None else src.wq.new_zeros(rope_width)
    o_bias = _fold_value_bias(src)
    if o_bias is not None:
        tensors["o_proj.bias"] = o_bias
    metrics = {
        "key_rel_error": max(key_errs) if key_errs else 0.0,
        "value_rel_error": max(value_errs),
        "rope_score_kept": rope.score_energy_kept,
    }
    return ConvertedLayer(tensors, metrics)


def convert_gta_layer(src: SourceAttention, num_groups: int, rope_dim: int, metric: LayerMetric) -> ConvertedLayer:
    """GTA weights: per group a tied state s (value; its first d - r coords are the no-RoPE key)."""
    H, d = src.num_heads, src.head_dim
    cov = metric.input_cov
    rope = select_shared_rope(src, rope_dim // 2, cov, metric.query_cov, metric.rotation)
    nope = d - rope_dim
    groups = src.group_of_head
    per_group = H // num_groups

    state_rows, o_cols, q_rows, q_bias = [], [None] * H, [None] * H, [None] * H
    key_errs, value_errs = [], []
    for j in range(num_groups):
        heads = list(range(j * per_group, (j + 1) * per_group))
        kv_heads = sorted({groups[h] for h in heads})
        values = torch.cat([src.wv[src.kv_rows(g)] for g in kv_heads])  # [|S| d, D]
        if len(kv_heads) == 1:
            value_basis = torch.eye(d, dtype=values.dtype)  # one source head: the value stays exact
        else:
            vw = metric.value_out_weight
            weight = torch.block_diag(*[vw[g] for g in kv_heads]) if vw else None
            value_basis = _top_basis(_moment(_weighted(values, weight), cov), d)
            if weight is not None:
                value_basis = torch.linalg.pinv(_sqrt_psd(weight), hermitian=True) @ value_basis
                value_basis = torch.linalg.qr(value_basis).Q
        state0 = value_basis.T @ values  # [d, D]
        keys = torch.cat([rope.residual_key[g] for g in kv_heads])  # [|S| d, D]
        kw = metric.key_out_weight
        k_weight = torch.block_diag(*[kw[g] for g in kv_heads]) if kw else None
        keys_w = _weighted(keys, k_weight)
        if metric.gta_state == "joint" and nope:
            state0, value_basis = _joint_tied_state(keys_w, values, nope, cov, metric, kv_heads)
        value_errs.append(_rel_err(value_basis @ state0 - values, values, cov))

        # Reduced-rank regression of the residual (no-RoPE) keys on the state: keys ~= B s[:nope].
        s_moment = _moment(state0, cov)
        cross = keys_w @ state0.T if cov is None else keys_w @ cov @ state0.T
        coef = cross @ torch.linalg.pinv(s_moment, hermitian=True)  # unconstrained regression [|S| d, d]
        fitted = coef @ s_moment @ coef.T
        top = _top_basis(fitted, nope)  # [|S| d, nope]
        reduced = top.T @ coef  # [nope, d]
        u_c, sing, vh = _svd_full(reduced)
        transform = vh  # orthogonal [d, d]; first `nope` rows span the regression's row space
        b_w = top @ u_c @ torch.diag(sing) if nope else keys.new_zeros(keys.shape[0], 0)
        b = torch.linalg.pinv(_sqrt_psd(k_weight), hermitian=True) @ b_w if k_weight is not None else b_w
        state = transform @ state0
        key_errs.append(_rel_err(b @ state[:nope] - keys, keys, cov) if keys.abs().sum() > 0 else 0.0)
        state_rows.append(state)
        for h in heads:
            pos = kv_heads.index(groups[h])
            block = slice(pos * d, (pos + 1) * d)
            # head value = value_basis[block] @ s0 = value_basis[block] @ transform^T @ s
            o_cols[h] = src.wo[:, src.q_rows(h)] @ value_basis[block] @ transform.T
            b_h = b[block]  # [d, nope]
            nope_rows, nope_bias = nope_query(src, h, metric.rotation)
            q_rows[h] = torch.cat([b_h.T @ nope_rows, rope.query_rows[h]])
            if src.bq is not None:
                q_bias[h] = torch.cat([b_h.T @ nope_bias, rope.query_bias[h]])
    tensors = {
        "q_proj.weight": torch.cat(q_rows),
        "kv_proj.weight": torch.cat(state_rows),
        "k_rope_proj.weight": rope.key_rows,
        "o_proj.weight": torch.cat(o_cols, dim=1),
        "rope_freqs": rope.freqs,
    }
    if src.bq is not None or src.bk is not None:
        tensors["q_proj.bias"] = torch.cat(q_bias) if src.bq is not None else src.wq.new_zeros(H * d)
        tensors["kv_proj.bias"] = src.wq.new_zeros(num_groups * d)
        tensors["k_rope_proj.bias"] = rope.key_bias if rope.key_bias is not None else src.wq.new_zeros(rope_dim)
    o_bias = _fold_value_bias(src)
    if o_bias is not None:
        tensors["o_proj.bias"] = o_bias
    metrics = {
        "key_rel_error": max(key_errs),
        "value_rel_error": max(value_errs),
        "rope_score_kept": rope.score_energy_kept,
    }
    return ConvertedLayer(tensors, metrics)


def _joint_tied_state(
    keys_w: torch.Tensor,
    values: torch.Tensor,
    nope: int,
    cov: torch.Tensor | None,
    metric: LayerMetric,
    kv_heads: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """GTA tied state that trades value exactness for key fidelity.

    The first `nope` coordinates are the top principal directions of the (query-weighted) residual keys, so
    the no-RoPE key is a plain PCA of the keys; the other coordinates are the principal directions of what
    those miss of the values. Values are then read from the whole state by least squares (folded into W_o).
    Returns (state rows [d, D], value map [|S| d, d] with values ~= value_map @ state).
    """
    d = values.shape[0] // len(kv_heads)
    key_dirs = _top_basis(_moment(keys_w, cov), nope).T @ keys_w  # [nope, D]
    vw = metric.value_out_weight
    v_weight = torch.block_diag(*[vw[g] for g in kv_heads]) if vw else None
    values_w = _weighted(values, v_weight)
    k_moment = _moment(key_dirs, cov)
    cross = values_w @ key_dirs.T if cov is None else values_w @ cov @ key_dirs.T
    explained = cross @ torch.linalg.pinv(k_moment, hermitian=True) @ key_dirs
    residual = values_w - explained
    extra = _top_basis(_moment(residual, cov), d - nope).T @ residual  # [d - nope, D]
    state = torch.cat([key_dirs, extra])
    s_moment = _moment(state, cov)
    v_cross = values @ state.T if cov is None else values @ cov @ state.T
    value_map = v_cross @ torch.linalg.pinv(s_moment, hermitian=True)  # [|S| d, d]
    return state, value_map
