"""GLA (grouped latent attention); MLA is GLA with one latent head.

Flat file (copied next to converted weights for `trust_remote_code`); imports nothing from gtakit.

Spec: `num_latent_heads` J, `kv_lora_rank` c, `qk_nope_head_dim` n (may be 0), `qk_rope_head_dim` r (one RoPE key
shared by all heads, may exceed the source head dim), `v_head_dim` v, `attention_bias`, `o_proj_bias`,
`softmax_scale`, `rope_index`. Query heads are split in contiguous blocks of Hb = H / J; head h reads latent
j = h // Hb: key [W_uk,h c_j ; RoPE(k_r)], value W_uv,h c_j. Cache per token: J * c + r elements.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .attention_gtakit import (
    GtakitAttention,
    apply_rope,
    attend_cache,
    check_positive,
    check_rope_index,
    fused_cache_attention,
    shared_matmul,
    source_head_dim,
)


class GLAAttention(GtakitAttention):
    form = "gla"
    supports_decode_kernels = True

    @classmethod
    def normalise_spec(cls, spec: dict, config: Any) -> dict:
        heads, head_dim = config.num_attention_heads, source_head_dim(config)
        spec = {"num_latent_heads": 1, "kv_lora_rank": 4 * head_dim, "qk_nope_head_dim": head_dim,
                "qk_rope_head_dim": head_dim // 2, "v_head_dim": head_dim, "attention_bias": False,
                "o_proj_bias": False, "softmax_scale": None, **spec}
        check_positive(spec, "num_latent_heads", "kv_lora_rank", "v_head_dim")
        check_positive(spec, "qk_nope_head_dim", minimum=0)
        if heads % spec["num_latent_heads"]:
            valid = [n for n in range(1, heads + 1) if heads % n == 0]
            raise ValueError(f"`num_latent_heads` ({spec['num_latent_heads']}) must divide the {heads} heads; "
                             f"valid values: {valid}")
        rope = spec["qk_rope_head_dim"]
        if not isinstance(rope, int) or rope < 0 or rope % 2:
            raise ValueError(f"`qk_rope_head_dim` must be an even number >= 0 (0: a layer without RoPE), "
                             f"got {rope!r}")
        spec.setdefault("rope_index", cls.default_rope_index(rope // 2, config))
        check_rope_index(spec, rope // 2, config)
        cls.normalise_qk_norm(spec, config)
        return spec

    @classmethod
    def cache_elements(cls, spec: dict) -> int:
        return spec["num_latent_heads"] * spec["kv_lora_rank"] + spec["qk_rope_head_dim"] + cls.key_scale_elements(spec)

    def __init__(self, config: Any, spec: dict, layer_idx: int, decode_backend: str = "auto") -> None:
        super().__init__(config, spec, layer_idx, decode_backend)
        spec = self.spec
        self.num_heads = config.num_attention_heads
        self.num_latents = spec["num_latent_heads"]
        self.heads_per_latent = self.num_heads // self.num_latents
        self.latent_dim = spec["kv_lora_rank"]
        self.nope_dim = spec["qk_nope_head_dim"]
        self.rope_dim = spec["qk_rope_head_dim"]
        self.v_dim = spec["v_head_dim"]
        qk_dim = self.nope_dim + self.rope_dim
        self.scale = spec["softmax_scale"] if spec["softmax_scale"] is not None else qk_dim**-0.5
        hidden, bias = config.hidden_size, spec["attention_bias"]
        self.build_query_proj(config, qk_dim, bias)
        self.kv_down_proj = nn.Linear(hidden, self.num_latents * self.latent_dim, bias=bias)
        self.build_rope_key_proj(config, self.rope_dim, bias)
        # Rows h*n:(h+1)*n of k_up_proj.weight map latent j(h) to head h's no-RoPE key; likewise v_up_proj.
        with warnings.catch_warnings():  # qk_nope_head_dim = 0 (lossless conversions) gives an empty weight
            warnings.simplefilter("ignore", UserWarning)
            self.k_up_proj = nn.Linear(self.latent_dim, self.num_heads * self.nope_dim, bias=False)
        self.v_up_proj = nn.Linear(self.latent_dim, self.num_heads * self.v_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=spec["o_proj_bias"])

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_latents, self.heads_per_latent)
        w_uk = self.k_up_proj.weight.view(*shape, self.nope_dim, self.latent_dim)
        w_uv = self.v_up_proj.weight.view(*shape, self.v_dim, self.latent_dim)
        return w_uk, w_uv

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Query `[B, H, L, n + r]` (RoPE on the last r), latents `[B, J, L, c]`, RoPE key `[B, 1, L, r (+ S)]`
        (the cached key scales appended)."""
        batch, q_len, _ = x.shape
        query = self.query_heads(x)
        query = torch.cat((query[..., : self.nope_dim], apply_rope(query[..., self.nope_dim :], cos, sin)), dim=-1)
        latent = self.kv_down_proj(x).view(batch, q_len, self.num_latents, self.latent_dim).transpose(1, 2)
        return query, latent, self.rotated_rope_key(x, cos, sin)

    def plain_attention(self, query, latent, rope_key, mask, q_len, key_scale=None):
        """Prefill: SDPA in whichever space is narrower, the latent's (c + r) or the per-head keys' (n + r)."""
        if key_scale is None and self.latent_dim < self.nope_dim:
            return self.latent_space_attention(query, latent, rope_key, mask, q_len)
        return self.upprojected_attention(query, latent, rope_key, mask, q_len, key_scale)

    def latent_space_attention(self, query, latent, rope_key, mask, q_len):
        """SDPA over keys [c_j ; k_r] and values c_j with W_uk folded into the query and W_uv applied after: the
        same attention at width c + r instead of n + r (GLA-3 at 50% of SmolLM2's cache: 106 instead of 128),
        and no per-head keys and values are materialised."""
        batch, _, total, _ = latent.shape
        q_latent = self._absorbed_query(query).reshape(batch, self.num_heads, q_len, self.latent_dim)
        q = torch.cat((q_latent, query[..., self.nope_dim :]), dim=-1)
        key = torch.cat((latent, rope_key.expand(batch, self.num_latents, total, -1)), dim=-1)
        key = key.repeat_interleave(self.heads_per_latent, dim=1)
        value = latent.repeat_interleave(self.heads_per_latent, dim=1)
        return self._up_project(self.sdpa(q, key, value, mask, q_len), q_len)

    def upprojected_attention(self, query, latent, rope_key, mask, q_len, key_scale=None):
        """Up-project every cached latent to per-head keys and values, then SDPA."""
        batch, _, total, _ = latent.shape
        w_uk, w_uv = self._up_weights()
        key_nope = torch.einsum("bjtc,jhnc->bjhtn", latent, w_uk).reshape(batch, self.num_heads, total, -1)
        if key_scale is not None:
            key_nope = key_nope * key_scale.unsqueeze(-1)
        value = torch.einsum("bjtc,jhvc->bjhtv", latent, w_uv).reshape(batch, self.num_heads, total, -1)
        key = torch.cat((key_nope, rope_key.expand(batch, self.num_heads, total, -1)), dim=-1)
        return self.sdpa(query, key, value, mask, q_len)

    def _absorbed_query(self, query: torch.Tensor) -> torch.Tensor:
        """q_nope `[B, H, L, n]` -> latent-space query `[B, J, Hb, L, c]` (W_uk folded in)."""
        batch, _, q_len, _ = query.shape
        q_nope = query[..., : self.nope_dim].reshape(batch, self.num_latents, self.heads_per_latent, q_len, -1)
        return torch.einsum("bjhln,jhnc->bjhlc", q_nope, self._up_weights()[0])

    def kernel_attention(self, kernels, query, latent, rope_key):
        """Triton decode over the whole (contiguous, causal) cache; same result as `absorbed_attention`."""
        batch, _, q_len, _ = query.shape
        q_latent = self._absorbed_query(query).reshape(batch, self.num_heads, q_len, self.latent_dim).contiguous()
        attended = kernels.gla_decode(q_latent, query[..., self.nope_dim :], latent, rope_key, scale=self.scale)
        return self._up_project(attended, q_len)

    def absorbed_attention(self, query, latent, rope_key, mask, key_scale=None):
        """Weight absorption: W_uk folds into the query, W_uv is applied after attending over the latents.
        One fused SDPA call per latent head (`fused_cache_attention`); with soft-capping or cached key scales the
        scores are explicit, and without a mask long caches are then read in chunks (`online_softmax`)."""
        batch, _, q_len, _ = query.shape
        q_latent = self._absorbed_query(query)
        q_latent = q_latent.reshape(batch, self.num_latents, self.heads_per_latent * q_len, self.latent_dim)
        if key_scale is None and self.softcap is None:
            attended = fused_cache_attention(q_latent, latent, query[..., self.nope_dim :], rope_key, mask, self.scale)
            return self._up_project(attended, q_len)

        def scores_of(start: int, stop: int) -> torch.Tensor:
            cached = latent[:, :, start:stop]
            scores = (q_latent @ cached.transpose(-1, -2)).view(batch, self.num_heads, q_len, -1)
            if key_scale is not None:  # QK-norm: the no-RoPE score of each token times its key's 1/rms
                scores = scores * key_scale[..., start:stop].unsqueeze(2)
            scores = scores + shared_matmul(query[..., self.nope_dim :], rope_key[:, :, start:stop].transpose(-1, -2))
            return self.cap_scores(scores.float() * self.scale)

        def attend(probs: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            probs = probs.to(latent.dtype).view(batch, self.num_latents, self.heads_per_latent * q_len, -1)
            return (probs @ latent[:, :, start:stop]).view(batch, self.num_heads, q_len, self.latent_dim)

        return self._up_project(attend_cache(scores_of, attend, latent, rope_key, mask), q_len)

    def _up_project(self, attended: torch.Tensor, q_len: int) -> torch.Tensor:
        """Attended latents (any shape holding `[B, J, Hb, L, c]` in order) -> per-head values `[B, H, L, v]`."""
        attended = attended.reshape(-1, self.num_latents, self.heads_per_latent, q_len, self.latent_dim)
        out = torch.einsum("bjhlc,jhvc->bjhlv", attended, self._up_weights()[1])
        return out.reshape(-1, self.num_heads, q_len, self.v_dim)


__all__ = ["GLAAttention"]
