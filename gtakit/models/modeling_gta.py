"""GTA (grouped-tied attention) model: Llama-style decoder whose KV cache is one tied state per group.

Flat file (copied next to converted weights for `trust_remote_code`); imports nothing from gtakit.

Shapes: B batch, L new tokens, T cached tokens, H query heads, G groups, d head_dim, r rope_dim.
Head h in group g = h // (H/G) scores against key [s_g[:d-r] ; RoPE(k_r)] and reads value s_g.
"""

from __future__ import annotations

import torch
from torch import nn

from .common_gtakit import (
    CompressedAttentionBase,
    GtakitForCausalLMBase,
    GtakitModelBase,
    apply_rope,
)
from .configuration_gtakit import GTAConfig


class GTAAttention(CompressedAttentionBase):
    def __init__(self, config: GTAConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx, config.rope_dim)
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.nope_dim = config.head_dim - config.rope_dim
        self.scale = config.softmax_scale if config.softmax_scale is not None else self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.kv_proj = nn.Linear(hidden, self.num_groups * self.head_dim, bias=bias)
        self.k_rope_proj = nn.Linear(hidden, config.rope_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_proj_bias)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Query `[B, H, L, d]` (RoPE applied to its last r dims), tied state `[B, G, L, d]`, RoPE key `[B, 1, L, r]`."""
        batch, q_len, _ = x.shape
        query = self.q_proj(x).view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        query = torch.cat((query[..., : self.nope_dim], apply_rope(query[..., self.nope_dim :], cos, sin)), dim=-1)
        state = self.kv_proj(x).view(batch, q_len, self.num_groups, self.head_dim).transpose(1, 2)
        rope_key = apply_rope(self.k_rope_proj(x).view(batch, q_len, 1, -1).transpose(1, 2), cos, sin)
        return query, state, rope_key

    def plain_attention(self, query, state, rope_key, mask, q_len):
        """Materialise per-group keys and run SDPA with grouped heads."""
        batch, _, total, _ = state.shape
        key = torch.cat((state[..., : self.nope_dim], rope_key.expand(batch, self.num_groups, total, -1)), dim=-1)
        rep = self.num_heads // self.num_groups
        key = key.repeat_interleave(rep, dim=1)
        value = state.repeat_interleave(rep, dim=1)
        return self.sdpa(query, key, value, mask, q_len)

    supports_decode_kernels = True

    def kernel_attention(self, kernels, query, state, rope_key):
        """Triton decode over the whole (contiguous, causal) cache; same result as `absorbed_attention`."""
        return kernels.gta_decode(query, state, rope_key, scale=self.scale)

    def absorbed_attention(self, query, state, rope_key, mask):
        """Scores straight from the cache: q_nope . s_g[:d-r] + q_rope . k_r; output p @ s_g. No key is built."""
        batch, _, q_len, _ = query.shape
        total = state.shape[2]
        rep = self.num_heads // self.num_groups
        grouped = query.reshape(batch, self.num_groups, rep * q_len, self.head_dim)
        scores = grouped[..., : self.nope_dim] @ state[..., : self.nope_dim].transpose(-1, -2)
        scores = scores.view(batch, self.num_heads, q_len, total)
        scores = scores + query[..., self.nope_dim :] @ rope_key.transpose(-1, -2)
        scores = scores.float() * self.scale
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1).to(state.dtype)
        probs = probs.view(batch, self.num_groups, rep * q_len, total)
        return (probs @ state).view(batch, self.num_heads, q_len, self.head_dim)


class GTAModel(GtakitModelBase):
    config_class = GTAConfig
    attention_cls = GTAAttention


class GTAForCausalLM(GtakitForCausalLMBase):
    config_class = GTAConfig
    model_cls = GTAModel


__all__ = ["GTAAttention", "GTAModel", "GTAForCausalLM"]
