"""QK-norm sources (Qwen3, Gemma 3, OLMo-2): what the form converters see, and how their output is completed.

The source's query for head h is n_h * w_q,h * (W_q,h x) with n_h = 1/rms (a per-token scalar, per head or over
all heads), and its key likewise with the key norm. Converters work on linear attention, so they are given
`folded`: the norm weights and the calibrated mean scalars folded into W_q and W_k (the best linear stand-in,
which also weights heads the way the real forward does). Their output is then completed (`complete`):

* the query becomes exact again: the converted query rows of head h are T_h (folded W_q,h); the model computes the
  source's own W_q,h x, normalises it and applies `q_map` = T_h diag(w_q,h) (so the mean scalar is not used);
* key scale `cached`: the model keeps the source's W_k, computes each token's key scalars when writing it, caches
  them (G per token, 1 for scope `all`) and multiplies each head's no-RoPE score by its KV head's scalar (the
  mean folded into the keys is divided out of the query's no-RoPE rows); the shared RoPE key is read from the
  normalised source key. Exact at full budget;
* key scale `mean`: the mean scalar stays folded (no extra cache, approximate).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from gtakit.families.base import SourceAttention

from .base import ConvertedLayer, TensorNames

KEY_SCALE_MODES = ("cached", "mean")


def _per_head(mean: torch.Tensor | None, heads: int) -> torch.Tensor:
    """Mean scalars `[heads]` from calibration (`[heads]` or `[1]` for scope `all`; None: 1)."""
    if mean is None:
        return torch.ones(heads, dtype=torch.float64)
    return mean.to(torch.float64).expand(heads) if mean.numel() == 1 else mean.to(torch.float64)


def folded(src: SourceAttention, query_scale: torch.Tensor | None, key_scale: torch.Tensor | None) -> SourceAttention:
    """`src` with the norm weights and mean scalars folded into its query and key rows (biases are refused
    for QK-norm sources, so there are none)."""
    H, G = src.num_heads, src.num_kv_heads
    q_gain = src.q_norm_weight * _per_head(query_scale, H)[:, None]  # [H, d]
    k_gain = src.k_norm_weight * _per_head(key_scale, G)[:, None]  # [G, d]
    return replace(src, wq=src.wq * q_gain.reshape(-1, 1), wk=src.wk * k_gain.reshape(-1, 1))


def complete(converted: ConvertedLayer, src: SourceAttention, folded_src: SourceAttention, mode: str,
             nope_width: int, key_scale: torch.Tensor | None, names: TensorNames) -> ConvertedLayer:
    """Replace the converted query (and, for `cached`, the RoPE key) by their QK-norm form."""
    H, G, d = src.num_heads, src.num_kv_heads, src.head_dim
    tensors = dict(converted.tensors)
    rows = tensors.pop(names.q_proj.weight).view(H, -1, src.wq.shape[1])  # [H, width, D]
    maps = []
    for h in range(H):
        # rows_h = T_h @ folded W_q,h with T_h acting within head h: recover T_h by least squares (exact: the
        # rows lie in the row space of the head's own query rows).
        source_rows = folded_src.wq[src.q_rows(h)]
        transform = torch.linalg.lstsq(source_rows.T, rows[h].T).solution.T  # [width, d]
        maps.append(transform * src.q_norm_weight[h][None, :])
    q_map = torch.stack(maps)  # [H, width, d]
    if mode == "cached":
        # Keys were folded with the mean scalar; the cached scalar is the true one, so divide the mean out.
        mean = _per_head(key_scale, G)[torch.tensor(src.group_of_head)]
        q_map[:, :nope_width] /= mean[:, None, None]
        tensors[names.k_proj.weight] = src.wk.clone()
        if converted.rope_key_map.shape[0]:  # layers without RoPE have no RoPE key
            tensors[names.k_rope_proj.weight] = converted.rope_key_map * src.k_norm_weight.reshape(1, -1)
    tensors[names.q_proj.weight] = src.wq.clone()
    tensors[names.q_map.weight] = q_map.reshape(-1, d)
    return replace(converted, tensors=tensors)


def qk_norm_spec(scope: str, eps: float, mode: str) -> dict[str, Any]:
    return {"scope": scope, "eps": eps, "key_scale": mode}
