"""GTA decode attention over the compressed cache (tied state per group + one shared RoPE key).

Shapes: B batch, H query heads, G groups (H % G == 0, head h reads group h // (H/G)), L query length (1..16),
T cache length (or P pages of `page_size` tokens), d head_dim, r rope_dim, n = d - r.

Head h of group g scores token t as `q[h, :n] . s_g[t, :n] + q[h, n:] . k_r[t]` (the query's last r dims and the
cached RoPE key already rotated), and returns `softmax(scale * scores) @ s_g` (value = the whole tied state), as
`GTAAttention.absorbed_attention` does; o_proj is applied by the caller.
"""

from __future__ import annotations

import torch

from ._decode_core import DecodeConfig, grouped_decode
from ._reference import naive_grouped_decode


def gta_decode(
    query: torch.Tensor,
    state: torch.Tensor,
    rope_key: torch.Tensor,
    *,
    scale: float,
    lengths: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Triton GTA decode.

    Args:
        query: `[B, H, L, d]`; columns `:d-r` are q_nope, `d-r:` the rotated q_rope.
        state: tied states `[B, G, T, d]` (contiguous layout) or pages `[P, G, page_size, d]` (paged layout).
        rope_key: rotated shared RoPE key `[B, 1, T, r]` or pages `[P, 1, page_size, r]`.
        scale: softmax scale.
        lengths: `[B]` int valid tokens per row, the L new ones included (query i sits at position
            `lengths[b] - L + i` and attends causally); None = T for every row (contiguous layout only).
        block_table: `[B, max_pages]` int32 page ids (paged layout).
        num_splits: sequence splits (flash-decoding); None = heuristic from batch x groups and the SM count.
        out: optional `[B, H, L, d]` output buffer.
        config: optional launch parameters (block sizes, warps), for tuning.
    Returns:
        `[B, H, L, d]` attention output in the query dtype (fp32 accumulation).
    """
    rope_dim = rope_key.shape[-1]
    nope = query.shape[-1] - rope_dim
    return grouped_decode(
        query, query[..., nope:], state, rope_key, qk_dim=nope, scale=scale, lengths=lengths,
        block_table=block_table, num_splits=num_splits, out=out, config=config,
    )


def naive_gta_decode(
    query: torch.Tensor,
    state: torch.Tensor,
    rope_key: torch.Tensor,
    *,
    scale: float,
    lengths: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """PyTorch reference of `gta_decode` (same arguments and shapes; `num_splits` and `config` are ignored)."""
    del num_splits, config
    nope = query.shape[-1] - rope_key.shape[-1]
    return naive_grouped_decode(
        query, query[..., nope:], state, rope_key, qk_dim=nope, scale=scale, lengths=lengths,
        block_table=block_table, out=out,
    )
