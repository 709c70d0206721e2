"""GLA / MLA decode attention over the compressed cache (latent heads + one shared RoPE key), weights absorbed.

Shapes: B batch, H query heads, J latent heads (H % J == 0, head h reads latent h // (H/J); MLA is J = 1),
L query length (1..16), T cache length (or P pages of `page_size` tokens), c latent width (kv_lora_rank),
r rope dim.

The caller absorbs W_uk into the query (`q_latent[h] = W_uk,h^T q_nope[h]`, width c). Head h scores token t as
`q_latent[h] . c_j[t] + q_rope[h] . k_r[t]` and gets `softmax(scale * scores) @ c_j`, the c-wide latent mixture;
the caller applies W_uv,h after, as `GLAAttention.output` does.
"""

from __future__ import annotations

import torch

from ._decode_core import DecodeConfig, grouped_decode
from ._reference import naive_grouped_decode


def gla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    rope_key: torch.Tensor,
    *,
    scale: float,
    lengths: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Triton GLA / MLA decode.

    Args:
        q_latent: absorbed no-RoPE query `[B, H, L, c]`.
        q_rope: rotated RoPE query `[B, H, L, r]`.
        latent: latents `[B, J, T, c]` (contiguous layout) or pages `[P, J, page_size, c]` (paged layout).
        rope_key: rotated shared RoPE key `[B, 1, T, r]` or pages `[P, 1, page_size, r]`.
        scale: softmax scale.
        lengths: `[B]` int valid tokens per row, the L new ones included (query i sits at position
            `lengths[b] - L + i` and attends causally); None = T for every row (contiguous layout only).
        block_table: `[B, max_pages]` int32 page ids (paged layout).
        num_splits: sequence splits (flash-decoding); None = heuristic from batch x latents and the SM count.
        out: optional `[B, H, L, c]` output buffer.
        config: optional launch parameters (block sizes, warps), for tuning.
    Returns:
        `[B, H, L, c]` attended latents in the query dtype (fp32 accumulation); apply W_uv per head after.
    """
    return grouped_decode(
        q_latent, q_rope, latent, rope_key, qk_dim=latent.shape[-1], scale=scale, lengths=lengths,
        block_table=block_table, num_splits=num_splits, out=out, config=config,
    )


def naive_gla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    rope_key: torch.Tensor,
    *,
    scale: float,
    lengths: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """PyTorch reference of `gla_decode` (same arguments and shapes; `num_splits` and `config` are ignored)."""
    del num_splits, config
    return naive_grouped_decode(
        q_latent, q_rope, latent, rope_key, qk_dim=latent.shape[-1], scale=scale, lengths=lengths,
        block_table=block_table, out=out,
    )
