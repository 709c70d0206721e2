"""GHLA (grouped-head latent attention, Sun, Deng et al. 2025, whose paper calls it GTA).

Flat file (copied next to converted weights for `trust_remote_code`); imports nothing from gtakit.

Spec: `num_maps` M, `num_key_heads` K, `head_dim` d (query/key width, RoPE on all of it), `latent_dim` c,
`v_head_dim` v, `attention_bias`, `o_proj_bias`, `softmax_scale`, `rope_index` (d/2 frequencies per key head,
key head after key head). Map m scores q_m against key head m // (M / K) and attends over the single latent
value: a_m = softmax(.) c. Output head h reads map m(h) = h // (H / M): u_h = W_dec,h a_m + a_m[:v] (zero-padded
when c < v), then o = W_o (sigmoid(W_g x + b_g) * concat_h u_h). The cache holds the rotated keys `[B, K, T, d]`
and the latent `[B, 1, T, c]`: K * d + c elements per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention_gtakit import GtakitAttention, apply_rope, shared_matmul
from .spec_gtakit import LayerSpec, source_head_dim


@dataclass
class GHLASpec(LayerSpec):
    """GHLA: `num_maps` M, `num_key_heads` K (must divide M), `head_dim` d (even: RoPE on all of it), `latent_dim`
    c, `v_head_dim` v. Defaults: one map and one key head, d and v the source's head dim, c = 2d."""

    form: ClassVar[str] = "ghla"
    num_maps: int = 1
    num_key_heads: int = 1
    head_dim: int | None = None
    latent_dim: int | None = None
    v_head_dim: int | None = None

    def complete(self, config: Any) -> None:
        head_dim = source_head_dim(config)
        for name, default in (("head_dim", head_dim), ("latent_dim", 2 * head_dim), ("v_head_dim", head_dim)):
            if getattr(self, name) is None:
                setattr(self, name, default)
        self.check_positive("num_maps", "num_key_heads", "latent_dim", "v_head_dim")
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"`head_dim` must be an even number >= 2 (full RoPE rotates pairs), got {self.head_dim}")
        self.check_divides("num_maps", config.num_attention_heads, "heads")
        if self.num_maps % self.num_key_heads:
            raise ValueError(f"`num_key_heads` ({self.num_key_heads}) must divide `num_maps` ({self.num_maps})")
        self.complete_rope_index(self.head_dim // 2 * self.num_key_heads, config, repeat=self.num_key_heads)
        if self.qk_norm:
            raise ValueError("GHLA does not take QK-norm sources yet; convert them to GTA, GLA or MLA")

    def cache_elements(self) -> int:
        return self.num_key_heads * self.head_dim + self.latent_dim


class GHLAAttention(GtakitAttention):
    form = "ghla"
    spec_type = GHLASpec

    def __init__(self, config: Any, spec: dict, layer_idx: int, decode_backend: str = "auto") -> None:
        super().__init__(config, spec, layer_idx, decode_backend)
        spec = self.spec
        self.num_heads = config.num_attention_heads
        self.num_maps = spec["num_maps"]
        self.num_key_heads = spec["num_key_heads"]
        self.heads_per_map = self.num_heads // self.num_maps
        self.maps_per_key = self.num_maps // self.num_key_heads
        self.head_dim = spec["head_dim"]
        self.latent_dim = spec["latent_dim"]
        self.v_dim = spec["v_head_dim"]
        self.scale = spec["softmax_scale"] if spec["softmax_scale"] is not None else self.head_dim**-0.5
        hidden, bias = config.hidden_size, spec["attention_bias"]
        self.q_proj = nn.Linear(hidden, self.num_maps * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_key_heads * self.head_dim, bias=bias)
        self.latent_proj = nn.Linear(hidden, self.latent_dim, bias=bias)
        # Rows h*v:(h+1)*v map the attended latent of head h's map to head h's value.
        self.value_decoder = nn.Linear(self.latent_dim, self.num_heads * self.v_dim, bias=False)
        self.gate_proj = nn.Linear(hidden, self.num_heads * self.v_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=spec["o_proj_bias"])

    def rope_cos_sin(self, position_embeddings):
        """cos/sin `[B, K, L, d]`: every key head rotates with its own frequencies."""
        cos, sin = position_embeddings
        half = cos.shape[-1] // 2
        pairs = self.head_dim // 2

        def per_key_head(table: torch.Tensor) -> torch.Tensor:
            picked = table[..., :half].index_select(-1, self.rope_index(table.device))  # [B, L, K * d/2]
            picked = picked.view(*picked.shape[:-1], self.num_key_heads, pairs).transpose(1, 2)
            return torch.cat((picked, picked), dim=-1)

        return per_key_head(cos), per_key_head(sin)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated queries `[B, M, L, d]`, rotated keys `[B, K, L, d]`, latent `[B, 1, L, c]`."""
        batch, q_len, _ = x.shape
        query = self.q_proj(x).view(batch, q_len, self.num_maps, self.head_dim).transpose(1, 2)
        query = apply_rope(
            query, cos.repeat_interleave(self.maps_per_key, dim=1), sin.repeat_interleave(self.maps_per_key, dim=1)
        )
        key = apply_rope(self.k_proj(x).view(batch, q_len, self.num_key_heads, self.head_dim).transpose(1, 2), cos, sin)
        latent = self.latent_proj(x).view(batch, q_len, 1, self.latent_dim).transpose(1, 2)
        return query, key, latent

    def plain_attention(self, query, key, latent, mask, q_len, key_scale=None):
        """Prefill: SDPA per map over the latent (`[B, M, L, c]`, decoded in `output`) or, when that is the wider
        of the two, per head over values decoded before attending (`[B, L, H * v]`, already decoded): the decoder
        is linear, so both give the same output. With one map per head (the default) the per-head SDPA is as wide
        as the source's (d_k = v = d), where the latent one would be c wide."""
        if self.num_heads * max(self.head_dim, self.v_dim) < self.num_maps * max(self.head_dim, self.latent_dim):
            return self.per_head_attention(query, key, latent, mask, q_len)
        return self.latent_attention(query, key, latent, mask, q_len)

    def per_head_attention(self, query, key, latent, mask, q_len):
        batch, _, total, _ = key.shape
        query = query.repeat_interleave(self.heads_per_map, dim=1)
        key = key.repeat_interleave(self.maps_per_key * self.heads_per_map, dim=1)
        values = self.decode(latent.expand(batch, self.num_maps, total, self.latent_dim))
        values = values.view(batch, total, self.num_heads, self.v_dim).transpose(1, 2)
        attended = self.sdpa(query, key, values, mask, q_len)
        return attended.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.v_dim)

    def latent_attention(self, query, key, latent, mask, q_len):
        """SDPA with each key head serving its maps (`sdpa` groups them) and the latent as every map's value:
        `[B, M, L, c]`."""
        batch, key_heads, total, _ = key.shape
        return self.sdpa(query, key, latent.expand(batch, key_heads, total, self.latent_dim), mask, q_len)

    def absorbed_attention(self, query, key, latent, mask, key_scale=None):
        """Scores straight from the cache, maps of one key head batched together: `[B, M, L, c]`."""
        batch, _, q_len, _ = query.shape
        total = key.shape[2]
        grouped = query.reshape(batch, self.num_key_heads, self.maps_per_key * q_len, self.head_dim)
        scores = (grouped @ key.transpose(-1, -2)).view(batch, self.num_maps, q_len, total)
        scores = self.cap_scores(scores.float() * self.scale)
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1).to(latent.dtype)
        return shared_matmul(probs, latent)

    def decode(self, maps: torch.Tensor) -> torch.Tensor:
        """Per-head values `[B, L, H * v]` from the attended latents `[B, M, L, c]`."""
        batch, _, q_len, _ = maps.shape
        weight = self.value_decoder.weight.view(self.num_maps, self.heads_per_map, self.v_dim, self.latent_dim)
        decoded = torch.einsum("bmlc,mhvc->blmhv", maps, weight)
        # The residual lets a trained decoder start from "each head reads the latent itself".
        residual = maps[..., : self.v_dim].transpose(1, 2)
        if residual.shape[-1] < self.v_dim:
            residual = F.pad(residual, (0, self.v_dim - residual.shape[-1]))
        decoded = decoded + residual.unsqueeze(3)
        return decoded.reshape(batch, q_len, self.num_heads * self.v_dim)

    def output(self, hidden_states: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """`attended`: the maps' attended latents `[B, M, L, c]`, or per-head values `[B, L, H * v]` already
        decoded (`per_head_attention`)."""
        gate = torch.sigmoid(self.gate_proj(hidden_states))
        return self.o_proj(gate * (attended if attended.dim() == 3 else self.decode(attended)))


__all__ = ["GHLAAttention", "GHLASpec"]
