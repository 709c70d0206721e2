"""Plain PyTorch reference of the grouped decode attention (see `_decode_core` for the math)."""

from __future__ import annotations

import torch

from .paging import gather_pages


def naive_grouped_decode(
    q_state: torch.Tensor,
    q_rope: torch.Tensor,
    state: torch.Tensor,
    rope_key: torch.Tensor,
    *,
    qk_dim: int,
    scale: float,
    lengths: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 dense softmax over the (gathered) cache; same shapes as `grouped_decode`."""
    if block_table is not None:
        state, rope_key = gather_pages(state, block_table), gather_pages(rope_key, block_table)
    batch, num_heads, q_len, _ = q_state.shape
    groups, total, width = state.shape[1], state.shape[2], state.shape[3]
    if lengths is None:
        lengths = torch.full((batch,), total, device=state.device)
    per_group = num_heads // groups
    # Unused positions of a paged cache may hold anything (NaN included): zero them so 0 * NaN cannot leak.
    tok = torch.arange(total, device=state.device)
    in_row = (tok[None, :] < lengths[:, None].to(tok.device))[:, None, :, None]
    state32 = torch.where(in_row, state.float(), 0.0)
    rope32 = torch.where(in_row, rope_key.float(), 0.0)
    qs = q_state[..., :qk_dim].float().reshape(batch, groups, per_group, q_len, qk_dim)
    scores = torch.einsum("bnhlc,bntc->bnhlt", qs, state32[..., :qk_dim])
    scores = scores + torch.einsum("bnhlr,btr->bnhlt", q_rope.float().reshape(batch, groups, per_group, q_len, -1),
                                   rope32[:, 0])
    qpos = lengths[:, None].to(tok.device) - q_len + torch.arange(q_len, device=tok.device)[None, :]  # [B, L]
    visible = (tok[None, None, :] <= qpos[:, :, None]) & (tok[None, None, :] < lengths[:, None, None].to(tok.device))
    scores = (scores * scale).masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    result = torch.einsum("bnhlt,bntw->bnhlw", probs, state32).reshape(batch, num_heads, q_len, width)
    if out is None:
        return result.to(q_state.dtype)
    out.copy_(result)
    return out
