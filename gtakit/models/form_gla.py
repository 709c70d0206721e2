"""GLA (grouped latent attention); MLA is GLA with one latent head.

Flat file (copied next to converted weights for `trust_remote_code`); imports nothing from gtakit.

Spec: `num_latent_heads` J, `kv_lora_rank` c, `qk_nope_head_dim` n (may be 0), `qk_rope_head_dim` r (one RoPE key
shared by all heads, may exceed the source head dim), `v_head_dim` v, `attention_bias`, `o_proj_bias`,
`softmax_scale`, `rope_index`. Query heads are split in contiguous blocks of Hb = H / J; head h reads latent
j = h // Hb: key [W_uk,h c_j ; RoPE(k_r)], value W_uv,h c_j. Cache per token: J * c + r elements.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention_gtakit import GtakitAttention, apply_rope, attend_cache, fused_cache_attention, shared_matmul
from .spec_gtakit import LayerSpec, source_head_dim


@dataclass
class GLASpec(LayerSpec):
    """GLA/MLA: `num_latent_heads` J (1: MLA), `kv_lora_rank` c per latent, `qk_nope_head_dim` n (0: every key
    dim is in the RoPE key), `qk_rope_head_dim` r (0: a layer without RoPE), `v_head_dim`. Defaults: MLA with
    c = 4d, n = d, r = d/2, v = d (d the source's head dim)."""

    form: ClassVar[str] = "gla"
    num_latent_heads: int = 1
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None

    def complete(self, config: Any) -> None:
        head_dim = source_head_dim(config)
        for name, default in (("kv_lora_rank", 4 * head_dim), ("qk_nope_head_dim", head_dim),
                              ("qk_rope_head_dim", head_dim // 2), ("v_head_dim", head_dim)):
            if getattr(self, name) is None:
                setattr(self, name, default)
        self.check_positive("num_latent_heads", "kv_lora_rank", "v_head_dim")
        self.check_positive("qk_nope_head_dim", minimum=0)
        self.check_divides("num_latent_heads", config.num_attention_heads, "heads")
        rope = self.qk_rope_head_dim
        if not isinstance(rope, int) or rope < 0 or rope % 2:
            raise ValueError(f"`qk_rope_head_dim` must be an even number >= 0 (0: a layer without RoPE), "
                             f"got {rope!r}")
        self.complete_rope_index(rope // 2, config)
        self.complete_qk_norm(config)

    def cache_elements(self) -> int:
        return self.num_latent_heads * self.kv_lora_rank + self.qk_rope_head_dim + self.key_scales


class GLAAttention(GtakitAttention):
    form = "gla"
    spec_type = GLASpec
    supports_decode_kernels = True
    fold_weights: bool | None = None  # None: fold W_uk / W_uv into q_proj / o_proj when it saves work

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
        """Query `[B, H, L, n + r]` (RoPE on the last r; `[B, H, L, c + r]` with W_uk folded in when
        `latent_queries`), latents `[B, J, L, c]`, RoPE key `[B, 1, L, r (+ S)]` (the cached key scales appended)."""
        batch, q_len, _ = x.shape
        folded = self.latent_queries and self.qk_norm is None and self.folding_pays(batch * q_len, self.nope_dim)
        query = self.latent_query_heads(x) if folded else self.query_heads(x)
        width = query.shape[-1] - self.rope_dim
        no_rope = query[..., :width]
        if self.latent_queries and not folded:
            no_rope = self._absorbed_query(no_rope).reshape(batch, self.num_heads, q_len, self.latent_dim)
        query = torch.cat((no_rope, apply_rope(query[..., width:], cos, sin)), dim=-1)
        latent = self.kv_down_proj(x).view(batch, q_len, self.num_latents, self.latent_dim).transpose(1, 2)
        return query, latent, self.rotated_rope_key(x, cos, sin)

    @property
    def latent_queries(self) -> bool:
        """Queries live in the latent space (W_uk folded in) when the latent is narrower than the no-RoPE key and
        no key scales are cached: prefill then attends over the latents and decode reads them as they are."""
        return self.latent_dim < self.nope_dim and not self.key_scales

    def folding_pays(self, tokens: int, width: int) -> bool:
        """Whether multiplying W_uk (width n) or W_uv (width v) into the hidden-size projection once costs less
        than applying it to every one of `tokens` (the folded projection is narrower by width - c per head).
        Only at inference (no gradients: training sees q_proj and o_proj as they are) and on plain projections;
        `fold_weights` True / False forces it."""
        if self.fold_weights is not None:
            return self.fold_weights and self.latent_dim < width
        if torch.is_grad_enabled() or not (plain_linear(self.q_proj) and plain_linear(self.o_proj)):
            return False
        hidden, latent = self.config.hidden_size, self.latent_dim
        saved_per_token = hidden * (width - latent) + width * latent
        return latent < width and tokens * saved_per_token > hidden * width * latent

    def latent_query_heads(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, H, L, c + r]`: q_proj with each head's no-RoPE rows replaced by W_uk,h^T of them, one matmul."""
        batch, q_len, _ = x.shape
        n, heads = self.nope_dim, self.num_heads
        w_uk = self._up_weights()[0].reshape(heads, n, self.latent_dim)
        weight = self.q_proj.weight.view(heads, n + self.rope_dim, -1)
        folded = torch.einsum("hnc,hnd->hcd", w_uk, weight[:, :n])
        weight = torch.cat((folded, weight[:, n:]), dim=1).flatten(0, 1)
        bias = self.q_proj.bias
        if bias is not None:
            bias = bias.view(heads, -1)
            bias = torch.cat((torch.einsum("hnc,hn->hc", w_uk, bias[:, :n]), bias[:, n:]), dim=1).flatten()
        return F.linear(x, weight, bias).view(batch, q_len, heads, -1).transpose(1, 2)

    def plain_attention(self, query, latent, rope_key, mask, q_len, key_scale=None):
        """Prefill: SDPA in whichever space is narrower, the latent's (c + r) or the per-head keys' (n + r)."""
        if self.latent_queries:
            return self.latent_space_attention(query, latent, rope_key, mask, q_len)
        return self.upprojected_attention(query, latent, rope_key, mask, q_len, key_scale)

    def latent_space_attention(self, query, latent, rope_key, mask, q_len):
        """SDPA over keys [c_j ; k_r] and values c_j for a latent-space query: the same attention at width c + r
        instead of n + r (GLA-3 at 50% of SmolLM2's cache: 106 instead of 128), each latent serving its block of
        heads, and no per-head keys and values are materialised. Returns attended latents (see `output`)."""
        batch, _, total, _ = latent.shape
        key = torch.cat((latent, rope_key.expand(batch, self.num_latents, total, -1)), dim=-1)
        return self._as_latents(self.sdpa(query, key, latent, mask, q_len), q_len)

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
        """q_nope `[B, H, L, n (+ ...)]` -> latent-space query `[B, J, Hb, L, c]` (W_uk folded in)."""
        batch, _, q_len, _ = query.shape
        q_nope = query[..., : self.nope_dim].reshape(batch, self.num_latents, self.heads_per_latent, q_len, -1)
        return torch.einsum("bjhln,jhnc->bjhlc", q_nope, self._up_weights()[0])

    def _query_parts(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A query from `project` -> (latent-space no-RoPE part `[B, J, Hb, L, c]`, RoPE part `[B, H, L, r]`)."""
        width = query.shape[-1] - self.rope_dim
        if self.latent_queries:
            return self._as_latents(query[..., :width], query.shape[2]), query[..., width:]
        return self._absorbed_query(query), query[..., width:]

    def _as_latents(self, attended: torch.Tensor, q_len: int) -> torch.Tensor:
        return attended.reshape(-1, self.num_latents, self.heads_per_latent, q_len, self.latent_dim)

    def kernel_attention(self, kernels, query, latent, rope_key):
        """Triton decode over the whole (contiguous, causal) cache; same result as `absorbed_attention`."""
        batch, _, q_len, _ = query.shape
        q_latent, q_rope = self._query_parts(query)
        q_latent = q_latent.reshape(batch, self.num_heads, q_len, self.latent_dim).contiguous()
        attended = kernels.gla_decode(q_latent, q_rope, latent, rope_key, scale=self.scale)
        return self._as_latents(attended, q_len)

    def absorbed_attention(self, query, latent, rope_key, mask, key_scale=None):
        """Weight absorption: W_uk folds into the query, W_uv is applied after attending over the latents (by
        `output`). One fused SDPA call per latent head (`fused_cache_attention`); with soft-capping or cached key
        scales the scores are explicit, and without a mask long caches are then read in chunks (`online_softmax`)."""
        batch, _, q_len, _ = query.shape
        q_latent, q_rope = self._query_parts(query)
        q_latent = q_latent.reshape(batch, self.num_latents, self.heads_per_latent * q_len, self.latent_dim)
        if key_scale is None and self.softcap is None:
            return self._as_latents(fused_cache_attention(q_latent, latent, q_rope, rope_key, mask, self.scale), q_len)

        def scores_of(start: int, stop: int) -> torch.Tensor:
            cached = latent[:, :, start:stop]
            scores = (q_latent @ cached.transpose(-1, -2)).view(batch, self.num_heads, q_len, -1)
            if key_scale is not None:  # QK-norm: the no-RoPE score of each token times its key's 1/rms
                scores = scores * key_scale[..., start:stop].unsqueeze(2)
            scores = scores + shared_matmul(q_rope, rope_key[:, :, start:stop].transpose(-1, -2))
            return self.cap_scores(scores.float() * self.scale)

        def attend(probs: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            probs = probs.to(latent.dtype).view(batch, self.num_latents, self.heads_per_latent * q_len, -1)
            return (probs @ latent[:, :, start:stop]).view(batch, self.num_heads, q_len, self.latent_dim)

        return self._as_latents(attend_cache(scores_of, attend, latent, rope_key, mask), q_len)

    def output(self, hidden_states: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Per-head values `[B, H, L, v]` (up-projected prefill) or attended latents `[B, J, Hb, L, c]` (every
        other path; told apart by their rank) -> the layer output `[B, L, D]`. Latents go through W_uv then
        o_proj, or through the two multiplied together when that is cheaper for this many tokens."""
        if attended.dim() == 4:
            return super().output(hidden_states, attended)
        batch, q_len = attended.shape[0], attended.shape[3]
        if not self.folding_pays(batch * q_len, self.v_dim):
            return super().output(hidden_states, self._up_project(attended, q_len))
        w_uv = self._up_weights()[1].reshape(self.num_heads, self.v_dim, self.latent_dim)
        w_o = self.o_proj.weight.view(-1, self.num_heads, self.v_dim)
        weight = torch.einsum("dhv,hvc->dhc", w_o, w_uv).flatten(1)
        flat = attended.permute(0, 3, 1, 2, 4).reshape(batch, q_len, -1)
        return F.linear(flat, weight, self.o_proj.bias)

    def _up_project(self, attended: torch.Tensor, q_len: int) -> torch.Tensor:
        """Attended latents `[B, J, Hb, L, c]` -> per-head values `[B, H, L, v]`."""
        out = torch.einsum("bjhlc,jhvc->bjhlv", self._as_latents(attended, q_len), self._up_weights()[1])
        return out.reshape(-1, self.num_heads, q_len, self.v_dim)


def plain_linear(module: nn.Module) -> bool:
    """A bare `nn.Linear` with its weights at hand: reading `.weight` then computes what calling it would. Not so
    for LoRA or quantised wrappers, offloaded (meta) weights, or hooks that watch its inputs (the output refit)."""
    return (type(module) is nn.Linear and module.weight.device.type != "meta"
            and not (module._forward_pre_hooks or module._forward_hooks))  # private dicts; no public accessor


__all__ = ["GLAAttention", "GLASpec"]
