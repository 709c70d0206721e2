"""GTA (grouped-tied attention, Zadouri, Strauss & Dao 2025): one tied state per group is value and no-RoPE key.

Flat file (copied next to converted weights for `trust_remote_code`); imports nothing from gtakit.

Spec: `num_key_value_heads` groups G, `head_dim` d, `rope_dim` r (width of the one RoPE key shared by all heads),
`attention_bias`, `o_proj_bias`, `softmax_scale`, `rope_index`. Head h in group g = h // (H/G) scores against key
[s_g[:d-r] ; RoPE(k_r)] and reads value s_g. Cache per token: G * d + r elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention_gtakit import GtakitAttention, apply_rope, attend_cache, fused_cache_attention, shared_matmul
from .spec_gtakit import LayerSpec, source_head_dim


@dataclass
class GTASpec(LayerSpec):
    """GTA: `num_key_value_heads` tied-state groups (default: one per query head), `head_dim` (default the
    source's), `rope_dim` (default half of it; 0: a layer without RoPE)."""

    form: ClassVar[str] = "gta"
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rope_dim: int | None = None

    def complete(self, config: Any) -> None:
        heads = config.num_attention_heads
        self.num_key_value_heads = heads if self.num_key_value_heads is None else self.num_key_value_heads
        self.head_dim = source_head_dim(config) if self.head_dim is None else self.head_dim
        self.rope_dim = self.head_dim // 2 if self.rope_dim is None else self.rope_dim
        self.check_positive("num_key_value_heads", "head_dim")
        self.check_divides("num_key_value_heads", heads, "heads")
        if not isinstance(self.rope_dim, int) or self.rope_dim % 2 or not 0 <= self.rope_dim <= self.head_dim:
            raise ValueError(f"`rope_dim` ({self.rope_dim}) must be even and between 0 (a layer without RoPE) "
                             "and `head_dim`")
        self.complete_rope_index(self.rope_dim // 2, config)
        self.complete_qk_norm(config)

    def cache_elements(self) -> int:
        return self.num_key_value_heads * self.head_dim + self.rope_dim + self.key_scales


class GTAAttention(GtakitAttention):
    form = "gta"
    spec_type = GTASpec
    supports_decode_kernels = True

    def __init__(self, config: Any, spec: dict, layer_idx: int, decode_backend: str = "auto") -> None:
        super().__init__(config, spec, layer_idx, decode_backend)
        spec = self.spec
        self.num_heads = config.num_attention_heads
        self.num_groups = spec["num_key_value_heads"]
        self.head_dim = spec["head_dim"]
        self.nope_dim = spec["head_dim"] - spec["rope_dim"]
        self.scale = spec["softmax_scale"] if spec["softmax_scale"] is not None else self.head_dim**-0.5
        hidden, bias = config.hidden_size, spec["attention_bias"]
        self.build_query_proj(config, self.head_dim, bias)
        self.kv_proj = nn.Linear(hidden, self.num_groups * self.head_dim, bias=bias)
        self.build_rope_key_proj(config, spec["rope_dim"], bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=spec["o_proj_bias"])

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Query `[B, H, L, d]` (RoPE on its last r dims), tied state `[B, G, L, d]`, RoPE key `[B, 1, L, r (+ S)]`
        (the cached key scales appended)."""
        batch, q_len, _ = x.shape
        query = self.query_heads(x)
        query = torch.cat((query[..., : self.nope_dim], apply_rope(query[..., self.nope_dim :], cos, sin)), dim=-1)
        state = self.kv_proj(x).view(batch, q_len, self.num_groups, self.head_dim).transpose(1, 2)
        return query, state, self.rotated_rope_key(x, cos, sin)

    def plain_attention(self, query, state, rope_key, mask, q_len, key_scale=None):
        """Materialise per-group keys and run SDPA with grouped heads (`sdpa` serves each group's block of heads)."""
        batch, _, total, _ = state.shape
        if key_scale is None:
            key = torch.cat((state[..., : self.nope_dim], rope_key.expand(batch, self.num_groups, total, -1)), dim=-1)
            return self.sdpa(query, key, state, mask, q_len)
        # QK-norm: each head's no-RoPE key times its source KV head's 1/rms, so keys and values are per head.
        rep = self.num_heads // self.num_groups
        key_nope = state[..., : self.nope_dim].repeat_interleave(rep, dim=1) * key_scale.unsqueeze(-1)
        key = torch.cat((key_nope, rope_key.expand(batch, self.num_heads, total, -1)), dim=-1)
        return self.sdpa(query, key, state.repeat_interleave(rep, dim=1), mask, q_len)

    def kernel_attention(self, kernels, query, state, rope_key):
        """Triton decode over the whole (contiguous, causal) cache; same result as `absorbed_attention`."""
        return kernels.gta_decode(query, state, rope_key, scale=self.scale)

    def absorbed_attention(self, query, state, rope_key, mask, key_scale=None):
        """Scores straight from the cache: q_nope . s_g[:d-r] + q_rope . k_r; output p @ s_g. No key is built.
        One fused SDPA call per group (`fused_cache_attention`); with soft-capping or cached key scales the scores
        are explicit, and without a mask long caches are then read in chunks (`online_softmax`)."""
        batch, _, q_len, _ = query.shape
        rep = self.num_heads // self.num_groups
        if key_scale is None and self.softcap is None:
            # Zeroing the query's RoPE columns leaves q_nope . s_g[:d-r] as the state's part of the scores.
            rows = F.pad(query[..., : self.nope_dim], (0, self.head_dim - self.nope_dim))
            rows = rows.reshape(batch, self.num_groups, rep * q_len, self.head_dim)
            out = fused_cache_attention(rows, state, query[..., self.nope_dim :], rope_key, mask, self.scale)
            return out.view(batch, self.num_heads, q_len, self.head_dim)
        grouped = query.reshape(batch, self.num_groups, rep * q_len, self.head_dim)

        def scores_of(start: int, stop: int) -> torch.Tensor:
            cached = state[:, :, start:stop, : self.nope_dim]
            scores = (grouped[..., : self.nope_dim] @ cached.transpose(-1, -2)).view(batch, self.num_heads, q_len, -1)
            if key_scale is not None:  # QK-norm: the no-RoPE score of each token times its key's 1/rms
                scores = scores * key_scale[..., start:stop].unsqueeze(2)
            scores = scores + shared_matmul(query[..., self.nope_dim :], rope_key[:, :, start:stop].transpose(-1, -2))
            return self.cap_scores(scores.float() * self.scale)

        def attend(probs: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            probs = probs.to(state.dtype).view(batch, self.num_groups, rep * q_len, -1)
            return (probs @ state[:, :, start:stop]).view(batch, self.num_heads, q_len, self.head_dim)

        return attend_cache(scores_of, attend, state, rope_key, mask)


__all__ = ["GTAAttention", "GTASpec"]
