"""GLA (grouped latent attention) and MLA (one latent head): planning and per-layer conversion (float64).

The model side is `gtakit/models/form_gla.py` (MLA is its `num_latent_heads = 1` case).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gtakit.errors import GtakitError
from gtakit.families.base import SourceAttention, SourceShape

from .base import ConvertedLayer, FormConverter, TensorNames, as_width, check_rope_dim, divisors, scaled_widths
from .linalg import LayerMetric, fold_value_bias, moment, rel_err, sqrt_psd, top_basis, weighted_rows
from .rope import nope_query, rope_grid, select_shared_rope

GRIDS = ("none", "spread", "fastest")
DEFAULT_GRID = "fastest"  # where one global RoPE table is needed; measured: benchmarks/deepseek_export.py


class GLAConverter(FormConverter):
    options = ("latent_heads", "kv_rank", "rope_grid")
    takes_qk_norm = True
    takes_rope_free = True
    report_fields = ("num_latent_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

    def __init__(self, name: str = "gla") -> None:
        self.name = name
        # Only MLA is a DeepSeek-V3 attention; GLA's latents would share one latent norm there.
        self.honours = frozenset({"global-rope-grid", "one-latent"} if name == "mla" else {"global-rope-grid"})
        self.title = ("MLA (multi-head latent attention, GLA with one latent head)" if name == "mla"
                      else "GLA (grouped latent attention)")

    def latent_heads(self, shape: SourceShape, options: Any) -> int:
        H, G = shape.num_heads, shape.num_kv_heads
        if self.name == "mla":
            if options.latent_heads not in (None, 1):
                raise GtakitError("--to mla has exactly one latent head; use --to gla for --latent-heads > 1")
            return 1
        latents = options.latent_heads
        if latents is None:
            latents = 2 if H % 2 == 0 and G % 2 == 0 else G
        if latents < 1 or H % latents:
            raise GtakitError(f"--latent-heads {latents} must divide the {H} query heads; valid counts: {divisors(H)}")
        return latents

    def plan(self, shape: SourceShape, options: Any) -> dict:
        H, G, d, D = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.hidden_size
        latents = self.latent_heads(shape, options)
        rope_dim, kv_rank = as_width(options.rope_dim, "rope-dim"), as_width(options.kv_rank, "kv-rank")
        source_elements, max_rope = shape.cache_elements, G * 2 * shape.max_rope_pairs
        if shape.rope_free:  # no RoPE in the source layer: everything goes to the latent
            rope_dim = 0
        elif rope_dim is None:
            # About a third of the cache (the half-cache default budget, or what --kv-rank implies).
            budget = source_elements // 2 if kv_rank in (None, "full") else latents * kv_rank * 3 // 2
            rope_dim = min(default_rope_dim(budget, d), max_rope)
        elif rope_dim == "full":
            rope_dim = max_rope
        if not shape.rope_free:
            check_rope_dim(rope_dim, max_rope)
        grid = options.rope_grid
        if grid not in GRIDS:
            raise GtakitError(f"--rope-grid must be one of {', '.join(GRIDS)}, got {grid!r}")
        if grid != "none" and rope_dim > d:
            raise GtakitError(f"--rope-dim {rope_dim}: one global RoPE table (--rope-grid {grid}) has at most one "
                              f"component per frequency, so at most {d}; lower --rope-dim")
        nope_dim = 0 if rope_dim == G * d else d  # every key dim rotates and is in the RoPE key: no position-free part
        per_latent, per_kv = H // latents, H // G
        latent_kv = [{h // per_kv for h in range(j * per_latent, (j + 1) * per_latent)} for j in range(latents)]
        full_rank = max(min((2 if nope_dim else 1) * len(kv) * d, D) for kv in latent_kv)
        if kv_rank is None:
            # The papers' budget (4 head dims of latent in total: MLA 512 + 64, GLA-2 2 x 256 + 64 at d = 128),
            # but never more than half the source's cache.
            half_budget = (source_elements // 2 - rope_dim) // latents
            kv_rank = max(1, min(4 * d // latents, full_rank, half_budget))
        elif kv_rank == "full":
            kv_rank = full_rank
        if not 1 <= kv_rank <= full_rank:
            raise GtakitError(f"--kv-rank {kv_rank} is out of range: it must be between 1 and {full_rank} for this "
                              "model")
        return self.make_spec(shape, num_latent_heads=latents, kv_lora_rank=kv_rank, qk_nope_head_dim=nope_dim,
                              qk_rope_head_dim=rope_dim, v_head_dim=d)

    def query_nope_width(self, spec: dict) -> int:
        return spec["qk_nope_head_dim"]

    def width_candidates(self, shape: SourceShape, spec: dict) -> list[dict[str, Any]]:
        return [{"kv_rank": width} for width in scaled_widths(spec["kv_lora_rank"])]

    def convert_layer(self, attn: SourceAttention, spec: dict, metric: LayerMetric, stats: Any,
                      options: Any, names: TensorNames) -> ConvertedLayer:
        pairs = spec["qk_rope_head_dim"] // 2
        grid = options.rope_grid
        return convert_gla_layer(attn, spec["num_latent_heads"], spec["kv_lora_rank"], pairs, metric, names,
                                 rope_grid(attn.head_dim, pairs, grid) if grid != "none" and pairs else None,
                                 options.rope_rotation_credit)


def default_rope_dim(budget: int, head_dim: int) -> int:
    """Shared RoPE key width for a GLA/MLA cache of `budget` elements per token and layer.

    About a third of the budget, at least 24 (12 rotating pairs) and at most min(64, head_dim) (DeepSeek's 64)
    and half the budget, rounded down to a multiple of 8 (of 2 below 24). Measured on SmolLM2
    (benchmarks/rope_split.py, MLA): 64 of 192 beats 32, 48, 80 and 96; 32 of 96 beats 48; 24 of 48 beats 16
    and 32.
    """
    upper = min(64, head_dim, max(2, budget // 2))
    width = min(upper, max(24, budget // 3))
    width = width // 8 * 8 if width >= 24 else width
    return max(2, width - width % 2)


@dataclass
class Latent:
    """One latent head: its down-projection [c, D], the up-projection of each of its KV heads' no-RoPE keys and
    values ((kind, KV head) -> [d, c]), and the relative errors of both."""

    down: torch.Tensor
    up: dict[tuple[str, int], torch.Tensor]
    key_error: float | None
    value_error: float


def convert_gla_layer(
    src: SourceAttention,
    num_latents: int,
    kv_rank: int,
    rope_pairs: int,
    metric: LayerMetric,
    names: TensorNames,
    grid: list[int] | None = None,
    rotation_credit: float = 0.5,
) -> ConvertedLayer:
    """GLA/MLA weights. The no-RoPE head dim is d, or 0 when every RoPE component is kept. `grid`: the RoPE key
    keeps only these frequencies, one component each (see `select_shared_rope`)."""
    H, G, d = src.num_heads, src.num_kv_heads, src.head_dim
    rope = select_shared_rope(src, rope_pairs, metric.input_cov, metric.query_cov,
                              metric.ranking_rotation(rotation_credit), grid, metric.input_mean)
    nope_dim = 0 if rope_pairs == G * d // 2 else d
    groups, per_latent = src.group_of_head, H // num_latents
    latents = [latent_head(src, rope, metric, sorted({groups[h] for h in range(j * per_latent, (j + 1) * per_latent)}),
                           kv_rank, with_keys=bool(nope_dim)) for j in range(num_latents)]
    up_of_head = [latents[h // per_latent].up for h in range(H)]
    q_rows, q_bias = [], [] if src.bq is not None else None
    for h in range(H):
        nope_rows, nope_bias = nope_query(src, h, metric.rotation)
        q_rows.append(torch.cat(([nope_rows] if nope_dim else []) + [rope.query_rows[h]]))
        if q_bias is not None:
            q_bias.append(torch.cat(([nope_bias] if nope_dim else []) + [rope.query_bias[h]]))
    tensors = {
        names.q_proj.weight: torch.cat(q_rows),
        names.kv_down_proj.weight: torch.cat([latent.down for latent in latents]),
        names.k_up_proj.weight: torch.cat([up[("k", groups[h])] for h, up in enumerate(up_of_head)]) if nope_dim
        else src.wq.new_zeros(0, kv_rank),
        names.v_up_proj.weight: torch.cat([up[("v", groups[h])] for h, up in enumerate(up_of_head)]),
        names.o_proj.weight: src.wo.clone(),
    }
    if rope.kept:  # a layer without RoPE has no RoPE key at all
        tensors[names.k_rope_proj.weight] = rope.key_rows
    if src.bq is not None or src.bk is not None:
        q_width = H * (nope_dim + 2 * len(rope.kept))
        tensors[names.q_proj.bias] = torch.cat(q_bias) if q_bias is not None else src.wq.new_zeros(q_width)
        tensors[names.kv_down_proj.bias] = src.wq.new_zeros(num_latents * kv_rank)
        if rope.kept:
            tensors[names.k_rope_proj.bias] = rope.key_bias if rope.key_bias is not None \
                else src.wq.new_zeros(2 * len(rope.kept))
    o_bias = fold_value_bias(src)
    if o_bias is not None:
        tensors[names.o_proj.bias] = o_bias
    key_errors = [latent.key_error for latent in latents if latent.key_error is not None]
    metrics = {
        "key_rel_error": max(key_errors) if key_errors else 0.0,
        "value_rel_error": max(latent.value_error for latent in latents),
        "rope_score_kept": rope.score_energy_kept,
    }
    return ConvertedLayer(tensors, metrics, {"rope_index": rope.index},
                          rope.key_map(src.num_kv_heads, src.head_dim))


def latent_head(src: SourceAttention, rope, metric: LayerMetric, kv_heads: list[int], kv_rank: int,
                with_keys: bool) -> Latent:
    """One latent of width `kv_rank` for the no-RoPE keys (residual of the shared RoPE key) and the values of
    `kv_heads`: the top principal directions of their stacked (error-weighted, balanced) rows."""
    d, cov = src.head_dim, metric.input_cov
    keys = [rope.residual_key[g] for g in kv_heads] if with_keys else []
    values = [src.wv[src.kv_rows(g)] for g in kv_heads]
    # Error weights (identity unless the method supplies them) make the decomposition minimise what the next step
    # sees; they are undone on the up-projections below.
    kw, vw = metric.key_out_weight, metric.value_out_weight
    keys_w = [weighted_rows(k, kw[g] if kw else None) for k, g in zip(keys, kv_heads)]
    values_w = [weighted_rows(v, vw[g] if vw else None) for v, g in zip(values, kv_heads)]
    alpha = 1.0
    if keys_w and metric.balance:
        k_energy = sum(float(torch.trace(moment(k, cov))) for k in keys_w)
        v_energy = sum(float(torch.trace(moment(v, cov))) for v in values_w)
        if k_energy > 0 and v_energy > 0:
            alpha = (v_energy / k_energy) ** 0.5
    stacked_w = torch.cat([alpha * k for k in keys_w] + values_w)
    basis = top_basis(moment(stacked_w, cov), kv_rank)  # [rows, c]
    # Latent = projection of the weighted rows; the up-projection maps it back in unweighted coordinates:
    # stacked ~= up @ (basis^T stacked_w), with up = pinv(W) blocks applied to the basis.
    down = basis.T @ stacked_w  # [c, D]
    # Blocks of `basis` follow the stacking order: one d-row block per key head, then per value head.
    blocks = [("k", g, alpha, kw[g] if kw else None) for g in (kv_heads if keys else [])]
    blocks += [("v", g, 1.0, vw[g] if vw else None) for g in kv_heads]
    up = {}
    for index, (kind, g, scale, w) in enumerate(blocks):
        rows = basis[index * d : (index + 1) * d] / scale
        if w is not None:
            rows = torch.linalg.pinv(sqrt_psd(w), hermitian=True) @ rows
        up[(kind, g)] = rows  # [d, c]
    key_error = None
    if keys:
        k_recon = torch.cat([up[("k", g)] for g in kv_heads]) @ down
        key_error = rel_err(k_recon - torch.cat(keys), torch.cat(keys), cov)
    v_recon = torch.cat([up[("v", g)] for g in kv_heads]) @ down
    value_error = rel_err(v_recon - torch.cat(values), torch.cat(values), cov)
    return Latent(down, up, key_error, value_error)
