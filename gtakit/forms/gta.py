"""GTA (grouped-tied attention): planning and per-layer conversion (float64).

Per group a tied state s (value; its first d - r coordinates are the no-RoPE key) and one shared RoPE key of
width r chosen by `rope.py`. The model side is `gtakit/models/form_gta.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from gtakit.errors import GtakitError
from gtakit.families.base import SourceAttention, SourceShape

from .base import ConvertedLayer, FormConverter, TensorNames, as_width, check_rope_dim, divisors
from .linalg import LayerMetric, fold_value_bias, moment, rel_err, sqrt_psd, svd_full, top_basis, weighted_rows
from .rope import nope_query, select_shared_rope

GTA_STATES = ("joint", "value")


class GTAConverter(FormConverter):
    name = "gta"
    title = "GTA (grouped-tied attention)"
    options = ("groups", "gta_state")
    takes_qk_norm = True
    takes_rope_free = True
    report_fields = ("num_key_value_heads", "head_dim", "rope_dim")

    def plan(self, shape: SourceShape, options: Any) -> dict:
        H, d = shape.num_heads, shape.head_dim
        groups = options.groups if options.groups is not None else shape.num_kv_heads
        if groups < 1 or H % groups:
            raise GtakitError(f"--groups {groups} must divide the {H} query heads; valid: {divisors(H)}")
        rope_dim = as_width(options.rope_dim, "rope-dim")
        rotary = 2 * shape.max_rope_pairs
        rope_dim = min(d // 2, rotary) if rope_dim is None else rotary if rope_dim == "full" else rope_dim
        if shape.rope_free:  # no RoPE in the source layer: the tied state is the whole key
            rope_dim = 0
        else:
            check_rope_dim(rope_dim, rotary)
        if options.gta_state not in GTA_STATES:
            raise GtakitError(f"--gta-state must be joint or value, got {options.gta_state!r}")
        return self.make_spec(shape, num_key_value_heads=groups, head_dim=d, rope_dim=rope_dim)

    def query_nope_width(self, spec: dict) -> int:
        return spec["head_dim"] - spec["rope_dim"]

    def width_candidates(self, shape: SourceShape, spec: dict) -> list[dict[str, Any]]:
        return [{"groups": groups} for groups in divisors(shape.num_heads)]

    def convert_layer(self, attn: SourceAttention, spec: dict, metric: LayerMetric, stats: Any,
                      options: Any, names: TensorNames) -> ConvertedLayer:
        return convert_gta_layer(attn, spec["num_key_value_heads"], spec["rope_dim"], metric, names,
                                 tied_state=options.gta_state, rotation_credit=options.rope_rotation_credit)


def convert_gta_layer(src: SourceAttention, num_groups: int, rope_dim: int, metric: LayerMetric,
                      names: TensorNames, tied_state: str = "joint", rotation_credit: float = 0.5) -> ConvertedLayer:
    """GTA weights: per group a tied state s (value; its first d - r coords are the no-RoPE key)."""
    H, d = src.num_heads, src.head_dim
    cov = metric.input_cov
    rope = select_shared_rope(src, rope_dim // 2, cov, metric.query_cov, metric.ranking_rotation(rotation_credit),
                              input_mean=metric.input_mean)
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
            value_basis = top_basis(moment(weighted_rows(values, weight), cov), d)
            if weight is not None:
                value_basis = torch.linalg.pinv(sqrt_psd(weight), hermitian=True) @ value_basis
                value_basis = torch.linalg.qr(value_basis).Q
        state0 = value_basis.T @ values  # [d, D]
        keys = torch.cat([rope.residual_key[g] for g in kv_heads])  # [|S| d, D]
        kw = metric.key_out_weight
        k_weight = torch.block_diag(*[kw[g] for g in kv_heads]) if kw else None
        keys_w = weighted_rows(keys, k_weight)
        if tied_state == "joint" and nope:
            state0, value_basis = _joint_tied_state(keys_w, values, nope, cov, metric, kv_heads)
        value_errs.append(rel_err(value_basis @ state0 - values, values, cov))

        # Reduced-rank regression of the residual (no-RoPE) keys on the state: keys ~= B s[:nope].
        s_moment = moment(state0, cov)
        cross = keys_w @ state0.T if cov is None else keys_w @ cov @ state0.T
        coef = cross @ torch.linalg.pinv(s_moment, hermitian=True)  # unconstrained regression [|S| d, d]
        fitted = coef @ s_moment @ coef.T
        top = top_basis(fitted, nope)  # [|S| d, nope]
        reduced = top.T @ coef  # [nope, d]
        u_c, sing, vh = svd_full(reduced)
        transform = vh  # orthogonal [d, d]; first `nope` rows span the regression's row space
        b_w = top @ u_c @ torch.diag(sing) if nope else keys.new_zeros(keys.shape[0], 0)
        b = torch.linalg.pinv(sqrt_psd(k_weight), hermitian=True) @ b_w if k_weight is not None else b_w
        state = transform @ state0
        key_errs.append(rel_err(b @ state[:nope] - keys, keys, cov) if keys.abs().sum() > 0 else 0.0)
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
        names.q_proj.weight: torch.cat(q_rows),
        names.kv_proj.weight: torch.cat(state_rows),
        names.o_proj.weight: torch.cat(o_cols, dim=1),
    }
    if rope.kept:  # a layer without RoPE has no RoPE key at all
        tensors[names.k_rope_proj.weight] = rope.key_rows
    if src.bq is not None or src.bk is not None:
        tensors[names.q_proj.bias] = torch.cat(q_bias) if src.bq is not None else src.wq.new_zeros(H * d)
        tensors[names.kv_proj.bias] = src.wq.new_zeros(num_groups * d)
        if rope.kept:
            tensors[names.k_rope_proj.bias] = rope.key_bias if rope.key_bias is not None else src.wq.new_zeros(rope_dim)
    o_bias = fold_value_bias(src)
    if o_bias is not None:
        tensors[names.o_proj.bias] = o_bias
    metrics = {
        "key_rel_error": max(key_errs),
        "value_rel_error": max(value_errs),
        "rope_score_kept": rope.score_energy_kept,
    }
    return ConvertedLayer(tensors, metrics, {"rope_index": rope.index},
                          rope.key_map(src.num_kv_heads, src.head_dim))


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
    key_dirs = top_basis(moment(keys_w, cov), nope).T @ keys_w  # [nope, D]
    vw = metric.value_out_weight
    v_weight = torch.block_diag(*[vw[g] for g in kv_heads]) if vw else None
    values_w = weighted_rows(values, v_weight)
    k_moment = moment(key_dirs, cov)
    cross = values_w @ key_dirs.T if cov is None else values_w @ cov @ key_dirs.T
    explained = cross @ torch.linalg.pinv(k_moment, hermitian=True) @ key_dirs
    residual = values_w - explained
    extra = top_basis(moment(residual, cov), d - nope).T @ residual  # [d - nope, D]
    state = torch.cat([key_dirs, extra])
    s_moment = moment(state, cov)
    v_cross = values @ state.T if cov is None else values @ cov @ state.T
    value_map = v_cross @ torch.linalg.pinv(s_moment, hermitian=True)  # [|S| d, d]
    return state, value_map
