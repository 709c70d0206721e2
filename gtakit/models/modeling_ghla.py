"""GHLA (grouped-head latent attention, Sun, Deng et al. 2025) model.

Flat file (copied next to converted weights for `trust_remote_code`); imports nothing from gtakit.

Shapes: B batch, L new tokens, T cached tokens, H output heads, M = num_maps attention maps, K = num_key_heads,
d = head_dim (query/key width, RoPE on all of it), c = latent_dim, v = v_head_dim, Hm = H / M heads per map.
Map m scores q_m against key head m // (M / K) and attends over the single latent value: a_m = softmax(.) c.
Output head h reads map m(h) = h // Hm: u_h = W_dec,h a_m + a_m[:v] (zero-padded when c < v), then
o = W_o (sigmoid(W_g x + b_g) * concat_h u_h). The cache holds the rotated keys `[B, K, T, d]` (the cache
layer's `keys` slot) and the latent `[B, 1, T, c]` (its `values` slot): K * d + c elements per token per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as hf_init
from transformers.cache_utils import Cache

from .common_gtakit import (
    AttentionMask,
    CompressedAttentionBase,
    GtakitForCausalLMBase,
    GtakitModelBase,
    apply_rope,
    default_layer_rope_freqs,
    rope_cos_sin,
)
from .configuration_gtakit import GHLAConfig


def default_ghla_freqs(config: GHLAConfig) -> torch.Tensor:
    """Standard RoPE frequencies of one `head_dim`-wide key, once per key head (conversion may store others)."""
    return default_layer_rope_freqs(config, config.head_dim).repeat(config.num_key_heads)


class GHLAAttention(CompressedAttentionBase):
    def __init__(self, config: GHLAConfig, layer_idx: int) -> None:
        # Each key head owns head_dim / 2 frequencies (conversion picks them per key head), stored side by side.
        super().__init__(config, layer_idx, config.num_key_heads * config.head_dim)
        self.rope_freqs = default_ghla_freqs(config)
        self.num_heads = config.num_attention_heads
        self.num_maps = config.num_maps
        self.num_key_heads = config.num_key_heads
        self.heads_per_map = self.num_heads // self.num_maps
        self.maps_per_key = self.num_maps // self.num_key_heads
        self.head_dim = config.head_dim
        self.latent_dim = config.latent_dim
        self.v_dim = config.v_head_dim
        self.scale = config.softmax_scale if config.softmax_scale is not None else self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_maps * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_key_heads * self.head_dim, bias=bias)
        self.latent_proj = nn.Linear(hidden, self.latent_dim, bias=bias)
        # Rows h*v:(h+1)*v map the attended latent of head h's map to head h's value.
        self.value_decoder = nn.Linear(self.latent_dim, self.num_heads * self.v_dim, bias=False)
        self.gate_proj = nn.Linear(hidden, self.num_heads * self.v_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=config.o_proj_bias)

    def key_head_cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin `[B, K, L, d]`: every key head rotates with its own frequencies."""
        freqs = self.rope_freqs.view(self.num_key_heads, -1)
        pairs = [rope_cos_sin(position_ids, freqs[j], self.config, dtype) for j in range(self.num_key_heads)]
        return torch.cat([p[0] for p in pairs], dim=1), torch.cat([p[1] for p in pairs], dim=1)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated queries `[B, M, L, d]`, rotated keys `[B, K, L, d]`, latent `[B, 1, L, c]`."""
        batch, q_len, _ = x.shape
        query = self.q_proj(x).view(batch, q_len, self.num_maps, self.head_dim).transpose(1, 2)
        query = apply_rope(
            query,
            cos.repeat_interleave(self.maps_per_key, dim=1),
            sin.repeat_interleave(self.maps_per_key, dim=1),
        )
        key = self.k_proj(x).view(batch, q_len, self.num_key_heads, self.head_dim).transpose(1, 2)
        key = apply_rope(key, cos, sin)
        latent = self.latent_proj(x).view(batch, q_len, 1, self.latent_dim).transpose(1, 2)
        return query, key, latent

    def plain_attention(self, query, key, latent, mask, q_len):
        """SDPA with keys repeated per map and the latent as every map's value: `[B, M, L, c]`."""
        batch, _, total, _ = key.shape
        key = key.repeat_interleave(self.maps_per_key, dim=1)
        value = latent.expand(batch, self.num_maps, total, self.latent_dim)
        return self.sdpa(query, key, value, mask, q_len)

    def absorbed_attention(self, query, key, latent, mask):
        """Scores straight from the cache, maps of one key head batched together: `[B, M, L, c]`."""
        batch, _, q_len, _ = query.shape
        total = key.shape[2]
        grouped = query.reshape(batch, self.num_key_heads, self.maps_per_key * q_len, self.head_dim)
        scores = (grouped @ key.transpose(-1, -2)).view(batch, self.num_maps, q_len, total)
        scores = scores.float() * self.scale
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1).to(latent.dtype)
        return probs @ latent

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

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: AttentionMask,
        cache: Cache | None = None,
        past_len: int = 0,
    ) -> torch.Tensor:
        cos, sin = self.key_head_cos_sin(position_ids, hidden_states.dtype)
        query, key, latent = self.project(hidden_states, cos, sin)
        if cache is not None:
            key, latent = cache.update(key, latent, self.layer_idx)
        q_len = hidden_states.shape[1]
        if self.use_absorbed(q_len, past_len):
            maps = self.absorbed_attention(query, key, latent, attention_mask.additive)
        else:
            maps = self.plain_attention(query, key, latent, attention_mask.boolean, q_len)
        gate = torch.sigmoid(self.gate_proj(hidden_states))
        return self.o_proj(gate * self.decode(maps))


class _GHLAInitMixin:
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GHLAAttention):
            # The shared hook fills the buffer as one wide RoPE; GHLA repeats one head's frequencies per key head.
            hf_init.copy_(module.rope_freqs, default_ghla_freqs(self.config))


class GHLAModel(_GHLAInitMixin, GtakitModelBase):
    config_class = GHLAConfig
    attention_cls = GHLAAttention


class GHLAForCausalLM(_GHLAInitMixin, GtakitForCausalLMBase):
    config_class = GHLAConfig
    model_cls = GHLAModel


__all__ = ["GHLAAttention", "GHLAModel", "GHLAForCausalLM"]
