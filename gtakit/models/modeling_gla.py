"""GLA (grouped latent attention) model; MLA is GLA with one latent head.

Flat file (copied next to converted weights for `trust_remote_code`); imports nothing from gtakit.

Shapes: B batch, L new tokens, T cached tokens, H query heads, J = h_c latent heads, c = kv_lora_rank,
n = qk_nope_head_dim, r = qk_rope_head_dim, v = v_head_dim, Hb = H / J heads per latent.
Head h reads latent j = h // Hb: key [W_uk,h c_j ; RoPE(k_r)], value W_uv,h c_j.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .common_gtakit import CompressedAttentionBase, GtakitForCausalLMBase, GtakitModelBase, apply_rope
from .configuration_gtakit import GLAConfig


class GLAAttention(CompressedAttentionBase):
    def __init__(self, config: GLAConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx, config.qk_rope_head_dim)
        self.num_heads = config.num_attention_heads
        self.num_latents = config.num_latent_heads
        self.heads_per_latent = self.num_heads // self.num_latents
        self.latent_dim = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        self.scale = config.softmax_scale if config.softmax_scale is not None else qk_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * qk_dim, bias=bias)
        self.kv_down_proj = nn.Linear(hidden, self.num_latents * self.latent_dim, bias=bias)
        self.k_rope_proj = nn.Linear(hidden, self.rope_dim, bias=bias)
        # Rows h*n:(h+1)*n of k_up_proj.weight map latent j(h) to head h's no-RoPE key; likewise v_up_proj.
        with warnings.catch_warnings():  # qk_nope_head_dim = 0 (lossless conversions) gives an empty weight
            warnings.simplefilter("ignore", UserWarning)
            self.k_up_proj = nn.Linear(self.latent_dim, self.num_heads * self.nope_dim, bias=False)
        self.v_up_proj = nn.Linear(self.latent_dim, self.num_heads * self.v_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=config.o_proj_bias)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_latents, self.heads_per_latent)
        w_uk = self.k_up_proj.weight.view(*shape, self.nope_dim, self.latent_dim)
        w_uv = self.v_up_proj.weight.view(*shape, self.v_dim, self.latent_dim)
        return w_uk, w_uv

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Query `[B, H, L, n + r]` (RoPE on the last r), latents `[B, J, L, c]`, RoPE key `[B, 1, L, r]`."""
        batch, q_len, _ = x.shape
        query = self.q_proj(x).view(batch, q_len, self.num_heads, -1).transpose(1, 2)
        query = torch.cat((query[..., : self.nope_dim], apply_rope(query[..., self.nope_dim :], cos, sin)), dim=-1)
        latent = self.kv_down_proj(x).view(batch, q_len, self.num_latents, self.latent_dim).transpose(1, 2)
        rope_key = apply_rope(self.k_rope_proj(x).view(batch, q_len, 1, -1).transpose(1, 2), cos, sin)
        return query, latent, rope_key

    def plain_attention(self, query, latent, rope_key, mask, q_len):
        """Up-project every cached latent to per-head keys and values, then SDPA."""
        batch, _, total, _ = latent.shape
        w_uk, w_uv = self._up_weights()
        key_nope = torch.einsum("bjtc,jhnc->bjhtn", latent, w_uk).reshape(batch, self.num_heads, total, -1)
        value = torch.einsum("bjtc,jhvc->bjhtv", latent, w_uv).reshape(batch, self.num_heads, total, -1)
        key = torch.cat((key_nope, rope_key.expand(batch, self.num_heads, total, -1)), dim=-1)
        return self.sdpa(query, key, value, mask, q_len)

    def _absorbed_query(self, query: torch.Tensor) -> torch.Tensor:
        """q_nope `[B, H, L, n]` -> latent-space query `[B, J, Hb, L, c]` (W_uk folded in)."""
        batch, _, q_len, _ = query.shape
        q_nope = query[..., : self.nope_dim].reshape(batch, self.num_latents, self.heads_per_latent, q_len, -1)
        return torch.einsum("bjhln,jhnc->bjhlc", q_nope, self._up_weights()[0])

    supports_decode_kernels = True

    def kernel_attention(self, kernels, query, latent, rope_key):
        """Triton decode over the whole (contiguous, causal) cache; same result as `absorbed_attention`."""
        batch, _, q_len, _ = query.shape
        q_latent = self._absorbed_query(query).reshape(batch, self.num_heads, q_len, self.latent_dim).contiguous()
        attended = kernels.gla_decode(q_latent, query[..., self.nope_dim :], latent, rope_key, scale=self.scale)
        attended = attended.view(batch, self.num_latents, self.heads_per_latent, q_len, self.latent_dim)
        out = torch.einsum("bjhlc,jhvc->bjhlv", attended, self._up_weights()[1])
        return out.reshape(batch, self.num_heads, q_len, self.v_dim)

    def absorbed_attention(self, query, latent, rope_key, mask):
        """Weight absorption: W_uk folds into the query, W_uv is applied after attending over the latents."""
        batch, _, q_len, _ = query.shape
        total = latent.shape[2]
        w_uk, w_uv = self._up_weights()
        q_latent = self._absorbed_query(query)
        q_latent = q_latent.reshape(batch, self.num_latents, self.heads_per_latent * q_len, self.latent_dim)
        scores = (q_latent @ latent.transpose(-1, -2)).view(batch, self.num_heads, q_len, total)
        scores = scores + query[..., self.nope_dim :] @ rope_key.transpose(-1, -2)
        scores = scores.float() * self.scale
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1).to(latent.dtype)
        probs = probs.view(batch, self.num_latents, self.heads_per_latent * q_len, total)
        attended = (probs @ latent).view(batch, self.num_latents, self.heads_per_latent, q_len, self.latent_dim)
        out = torch.einsum("bjhlc,jhvc->bjhlv", attended, w_uv)
        return out.reshape(batch, self.num_heads, q_len, self.v_dim)


class GLAModel(GtakitModelBase):
    config_class = GLAConfig
    attention_cls = GLAAttention


class GLAForCausalLM(GtakitForCausalLMBase):
    config_class = GLAConfig
    model_cls = GLAModel


__all__ = ["GLAAttention", "GLAModel", "GLAForCausalLM"]
