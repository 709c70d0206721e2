"""What every gtakit attention form shares: the module that replaces a family decoder layer's `self_attn`.

Flat file (copied next to converted weights for `trust_remote_code`); imports nothing from gtakit.

A form subclasses `GtakitAttention` and fills in the hooks: `project` (new tokens -> query and the two tensors
the cache stores), `plain_attention` (prefill: one SDPA over the new and cached tokens), `absorbed_attention` (decode: read the
compressed cache directly), optionally `kernel_attention` (Triton decode), `rope_cos_sin` and `output`.

Sources with QK-norm (Qwen3, Gemma 3, OLMo-2) keep it exact: the query is the source's own projection, RMS-normalised
per head (or over all heads), then mapped per head into the form's query (`q_map`: the norm's weight and the
conversion folded in). The key norm multiplies every source KV head's key by a per-token scalar 1/rms: with
`key_scale: cached` the scalar is computed when the token is written, stored beside the RoPE key (one per KV head,
or one per token for scope `all`) and multiplies the head's no-RoPE score, so absorbed decoding still holds; the
shared RoPE key is taken from the normalised source key. With `key_scale: mean` the calibrated mean scalar is
folded into the weights instead (no extra cache, approximate).
The layer is called the way the family's decoder layer calls its attention: hidden states, the family's
`position_embeddings` (cos, sin over its RoPE frequencies; a form picks the ones it kept by `rope_index`), the
mask transformers built (None = plain causal, else a 4-D boolean or additive mask) and the cache.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .cache_gtakit import append, is_compressed_cache_layer, pick_cache
from .spec_gtakit import LayerSpec, source_head_dim

# Query lengths up to this use the absorbed decode path against a non-empty cache (speculative decoding
# verifies a few tokens at once); longer chunks are prefill and use the plain path.
MAX_ABSORBED_QUERY_LEN = 16
ATTENTION_PATHS = ("auto", "plain", "absorbed")

_KERNELS: Any = None
_KERNEL_IMPORT_ERROR: str | None = None


def decode_kernels() -> Any | None:
    """`gtakit.kernels` (Triton decode kernels) or None when it does not import.

    Imported lazily and guarded: this file is copied next to converted weights and must load without gtakit or
    triton (the PyTorch path is then used). Lazy also lets TRITON_INTERPRET=1 be set before triton builds them.
    """
    global _KERNELS, _KERNEL_IMPORT_ERROR
    if _KERNELS is None and _KERNEL_IMPORT_ERROR is None:
        try:
            import gtakit.kernels as kernels
        except ImportError as exc:
            _KERNEL_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
        else:
            _KERNELS = kernels
    return _KERNELS


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def shared_matmul(x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """`x` `[B, H, q, k]` times one tensor shared by all heads `[B, 1, k, n]` -> `[B, H, q, n]`, as one matmul
    over the heads: a broadcasting matmul would copy `shared` once per head, a copy of the cache at every step
    (50 ms instead of 0.7 ms per layer at 8192 tokens, batch 4, on one CPU thread)."""
    batch, heads, q_len, width = x.shape
    return (x.reshape(batch, 1, heads * q_len, width) @ shared).view(batch, heads, q_len, -1)


# A decode step reads the cache twice (scores, then the weighted sum of the same rows); in chunks of about this
# many bytes both reads of a chunk come from the CPU's caches instead of memory (flash-decoding's online softmax).
# Measured on this project's 2-core CPU: GTA's attention at 8192 tokens x 4 rows 5.0 -> 3.6 ms per layer.
CHUNK_BYTES = 4 << 20
MIN_CHUNK_TOKENS = 1024


def chunk_tokens(row_bytes: int) -> int:
    """Tokens per chunk for a cache of `row_bytes` per token (all rows of the batch)."""
    return max(MIN_CHUNK_TOKENS, CHUNK_BYTES // max(1, row_bytes))


def online_softmax(
    scores_of: Callable[[int, int], torch.Tensor],
    attend: Callable[[torch.Tensor, int, int], torch.Tensor],
    total: int,
    chunk: int,
) -> torch.Tensor:
    """softmax(scores) @ values over `total` keys taken `chunk` at a time. `scores_of(start, stop)` gives the
    scaled fp32 scores `[..., stop - start]` of those keys, `attend(probs, start, stop)` the sum of their values
    weighted by `probs` `[..., width]` (summed across chunks in fp32); the chunks are combined with running maxima."""
    maximum = denominator = out = None
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        scores = scores_of(start, stop)
        chunk_max = scores.amax(dim=-1, keepdim=True)
        new_max = chunk_max if maximum is None else torch.maximum(maximum, chunk_max)
        probs = torch.exp(scores - new_max)
        part = attend(probs, start, stop).float()
        if maximum is None:
            denominator, out = probs.sum(dim=-1, keepdim=True), part
        else:
            correction = torch.exp(maximum - new_max)
            denominator = denominator * correction + probs.sum(dim=-1, keepdim=True)
            out = out * correction + part
        maximum = new_max
    return out / denominator


def attend_cache(
    scores_of: Callable[[int, int], torch.Tensor],
    attend: Callable[[torch.Tensor, int, int], torch.Tensor],
    state: torch.Tensor,
    rope_key: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """The absorbed attention over a cache of `state` `[B, n, T, w]` and `rope_key` `[B, 1, T, r]`, in their dtype:
    softmax(scores + mask) @ values at once, or, without a mask (a decode step over the whole cache), in chunks
    (`online_softmax`) once the cache is longer than two chunks. `scores_of` and `attend` as for `online_softmax`."""
    total = state.shape[2]
    chunk = chunk_tokens(state.shape[0] * (state.shape[1] * state.shape[3] + rope_key.shape[-1]) * state.element_size())
    if mask is None and total > 2 * chunk:
        return online_softmax(scores_of, attend, total, chunk).to(state.dtype)
    scores = scores_of(0, total)
    if mask is not None:
        scores = scores + mask
    return attend(torch.softmax(scores, dim=-1), 0, total)


def fused_cache_attention(
    rows: torch.Tensor,
    cached: torch.Tensor,
    rope_query: torch.Tensor,
    rope_key: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """softmax(scale * (rows . cached + rope_query . rope_key) + mask) @ cached through SDPA's fused kernel, for
    caches whose one tensor is both key and value (GTA's tied state, GLA's latents).

    `rows` `[B, n, R, w]`: per cached head n, its R = (heads per cached head) x q_len query rows, heads outer;
    `cached` `[B, n, T, w]`; the RoPE part of the scores `[B, H, q_len, T]` (H = n x heads per cached head) from
    `rope_query` `[B, H, q_len, r]` and `rope_key` `[B, 1, T, r]` enters as an additive bias, with `mask`. The
    heads of a cached head are query rows of one SDPA call, so the cache is read once per cached head and never
    copied (measured on this project's 2-core CPU, GTA at 8192 tokens x 4 rows: 8.9 -> 5.8 ms per layer, one
    thread, against the chunked bmm path)."""
    batch, heads, q_len, _ = rope_query.shape
    total = cached.shape[2]
    bias = None
    if rope_query.shape[-1]:
        bias = shared_matmul(rope_query, rope_key.transpose(-1, -2)).float() * scale
    if mask is not None:
        bias = mask.float().expand(batch, heads, q_len, total) if bias is None else bias + mask
    if bias is not None:
        bias = bias.reshape(batch, cached.shape[1], rows.shape[2], total).to(rows.dtype)
    return F.scaled_dot_product_attention(rows, cached, cached, attn_mask=bias, scale=scale)


def causal_additive_mask(q_len: int, total: int, device: torch.device) -> torch.Tensor | None:
    """Additive float mask `[1, 1, q_len, total]` of queries at the last `q_len` of `total` positions."""
    if q_len == 1:
        return None
    q_pos = torch.arange(total - q_len, total, device=device)
    allowed = torch.arange(total, device=device)[None, :] <= q_pos[:, None]
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


def additive(mask: torch.Tensor | None, q_len: int, total: int, device: torch.device) -> torch.Tensor | None:
    """The mask transformers built, as an additive float32 mask for the explicit (absorbed) path."""
    if mask is None:
        return causal_additive_mask(q_len, total, device)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask.float()


class GtakitAttention(nn.Module):
    """Base of the form modules. `spec` is this layer's entry of `config.gtakit_layers`."""

    form: str = ""
    spec_type: type[LayerSpec] = LayerSpec  # the form's typed spec (`spec_gtakit.py`)
    supports_decode_kernels = False  # forms with `kernel_attention(kernels, query, state, rope_key)` set it

    def __init__(self, config: Any, spec: dict, layer_idx: int, decode_backend: str = "auto") -> None:
        super().__init__()
        self.config = config  # the family's config
        self.spec = self.normalise_spec(spec, config)
        self.layer_idx = layer_idx
        self.decode_backend = decode_backend
        self.attention_path = "auto"
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        self.rope_dim: int | None = None  # width of the shared RoPE key (forms that have one set it)
        self.softcap: float | None = self.spec.get("softcap")  # Gemma 2: scores -> tanh(s / cap) * cap
        self.qk_norm: dict | None = self.spec.get("qk_norm")
        self.key_scales = self.qk_norm["key_scales"] if self.qk_norm else 0  # columns cached beside the RoPE key
        self._rope_index: dict[torch.device, torch.Tensor] = {}  # spec["rope_index"] per device, made once

    def rope_index(self, device: torch.device) -> torch.Tensor:
        """Which of the family's RoPE frequencies each rotating pair uses (from the config, not a weight)."""
        if device not in self._rope_index:
            self._rope_index[device] = torch.tensor(self.spec["rope_index"], dtype=torch.long, device=device)
        return self._rope_index[device]

    # ----------------------------------------------------------------------------------------- the spec
    @classmethod
    def normalise_spec(cls, spec: dict, config: Any) -> dict:
        """The spec with defaults filled in; a ValueError naming the field when it is invalid."""
        return cls.spec_type.from_dict(spec, config).to_dict()

    # ----------------------------------------------------------------------------------------- RoPE
    def rope_cos_sin(self, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin `[B, 1, L, 2P]` (rotate-half layout) of the kept frequencies, from the family's `[B, L, d]`."""
        cos, sin = position_embeddings
        half = cos.shape[-1] // 2
        index = self.rope_index(cos.device)
        cos, sin = cos[..., :half].index_select(-1, index), sin[..., :half].index_select(-1, index)
        return torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((sin, sin), dim=-1).unsqueeze(1)

    # ----------------------------------------------------------------------------------------- QK-norm
    def build_query_proj(self, config: Any, width: int, bias: bool) -> None:
        """`q_proj` giving `width` dims per head; with QK-norm the source's projection plus the per-head `q_map`."""
        hidden, heads = config.hidden_size, config.num_attention_heads
        if self.qk_norm is None:
            self.q_proj = nn.Linear(hidden, heads * width, bias=bias)
            return
        head_dim = source_head_dim(config)
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.q_map = nn.Linear(head_dim, heads * width, bias=False)  # block h: [width, head_dim] of head h

    def build_rope_key_proj(self, config: Any, rope_dim: int, bias: bool) -> None:
        """`k_rope_proj` (none for a layer without RoPE); with a cached key scale it reads the normalised source
        key (`k_proj`, no bias)."""
        self.rope_dim = rope_dim
        hidden = config.hidden_size
        if not self.key_scales:
            if rope_dim:
                self.k_rope_proj = nn.Linear(hidden, rope_dim, bias=bias)
            return
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        width = kv_heads * source_head_dim(config)
        self.k_proj = nn.Linear(hidden, width, bias=False)
        if rope_dim:
            self.k_rope_proj = nn.Linear(width, rope_dim, bias=False)

    def rms_scale(self, x: torch.Tensor) -> torch.Tensor:
        """1/rms of `[..., heads, d]` per head (scope `head`) or over all heads (`all`): `[..., heads or 1]`."""
        x = x.float()
        dims = (-1,) if self.qk_norm["scope"] == "head" else (-2, -1)
        return torch.rsqrt(x.pow(2).mean(dim=dims) + self.qk_norm["eps"]).view(*x.shape[:-2], -1)

    def query_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Queries `[B, H, L, width]` before RoPE."""
        batch, q_len, _ = x.shape
        raw = self.q_proj(x).view(batch, q_len, self.num_heads, -1)
        if self.qk_norm is None:
            return raw.transpose(1, 2)
        normed = raw * self.rms_scale(raw).unsqueeze(-1).to(raw.dtype)
        maps = self.q_map.weight.view(self.num_heads, -1, raw.shape[-1])
        return torch.einsum("blhd,hwd->bhlw", normed, maps)

    def rope_key_and_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The RoPE key `[B, 1, L, r]` before RoPE (r may be 0), and the cached key scales `[B, 1, L, S]` (None
        without)."""
        batch, q_len, _ = x.shape
        if not self.key_scales:
            if not self.rope_dim:
                return x.new_zeros(batch, 1, q_len, 0), None
            return self.k_rope_proj(x).view(batch, q_len, 1, -1).transpose(1, 2), None
        raw = self.k_proj(x).view(batch, q_len, -1, source_head_dim(self.config))
        scale = self.rms_scale(raw).to(raw.dtype)  # [B, L, S]
        if not self.rope_dim:
            return x.new_zeros(batch, 1, q_len, 0), scale.unsqueeze(1)
        key = self.k_rope_proj((raw * scale.unsqueeze(-1)).reshape(batch, q_len, -1))
        return key.view(batch, q_len, 1, -1).transpose(1, 2), scale.unsqueeze(1)

    def rotated_rope_key(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """What the cache's second slot stores for new tokens: the rotated RoPE key `[B, 1, L, r]`, with the
        cached key scales appended (`[B, 1, L, r + S]`) for QK-norm sources."""
        rope_key, key_scale = self.rope_key_and_scale(x)
        rope_key = apply_rope(rope_key, cos, sin)
        return rope_key if key_scale is None else torch.cat((rope_key, key_scale), dim=-1)

    def update_cache(self, cache: Cache, state: torch.Tensor, rope_key: torch.Tensor):
        """Append this step's tensors to the cache and return the whole layer's. A layer without RoPE key and
        key scales has nothing for the cache's second slot, so its state's two halves fill the two slots (no
        empty tensor in the cache); they are joined again for attention."""
        if rope_key.shape[-1]:
            return append(cache, self.layer_idx, state, rope_key)
        half = state.shape[-1] // 2
        first, second = append(cache, self.layer_idx, state[..., :half].contiguous(), state[..., half:].contiguous())
        return torch.cat((first, second), dim=-1), rope_key.new_zeros(*first.shape[:-1], 0)[:, :1]

    def split_key_scale(self, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cached `[B, 1, T, r + S]` -> RoPE key `[B, 1, T, r]` and per-head key scales `[B, H or 1, T]`."""
        if not self.key_scales:
            return rope_key, None
        scale = rope_key[:, 0, :, -self.key_scales :].transpose(1, 2)  # [B, S, T]
        if self.key_scales > 1:
            scale = scale.repeat_interleave(self.num_heads // self.key_scales, dim=1)
        return rope_key[..., : -self.key_scales], scale

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        layer_past: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        # The cache under whichever name the family passes it (GPT-NeoX: layer_past).
        cache = pick_cache(cache, past_key_values) if layer_past is None else layer_past
        if position_embeddings is not None:
            cos, sin = self.rope_cos_sin(position_embeddings)
            cos, sin = cos.to(hidden_states.dtype), sin.to(hidden_states.dtype)
        elif len(self.spec.get("rope_index", [])):
            raise ValueError("gtakit attention needs the family's position_embeddings (cos, sin)")
        else:  # families without RoPE (learned positions) pass none; nothing rotates
            cos = sin = hidden_states.new_zeros(1, 1, 1, 0)
        query, state, rope_key = self.project(hidden_states, cos, sin)
        if cache is not None:
            self._check_cache(cache)
            state, rope_key = self.update_cache(cache, state, rope_key)
        rope_key, key_scale = self.split_key_scale(rope_key)
        q_len, total = hidden_states.shape[1], state.shape[2]
        if self.use_absorbed(q_len, total - q_len):
            kernels = self.select_decode_kernels(query, attention_mask)
            if kernels is not None:
                attended = self.kernel_attention(kernels, query, state, rope_key)
            else:
                mask = additive(attention_mask, q_len, total, query.device)
                attended = self.absorbed_attention(query, state, rope_key, mask, key_scale)
        else:
            attended = self.plain_attention(query, state, rope_key, attention_mask, q_len, key_scale)
        return self.output(hidden_states, attended), None

    def _check_cache(self, cache: Cache) -> None:
        layers = getattr(cache, "layers", None)
        if layers is not None and len(layers) > self.layer_idx and not is_compressed_cache_layer(layers[self.layer_idx]):
            raise ValueError(
                f"gtakit attention stores its compressed state in dynamic cache layers, got "
                f"{type(layers[self.layer_idx]).__name__}; use the default cache (no cache_implementation)"
            )

    def output(self, hidden_states: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """`[B, heads, L, v]` attended values -> the layer output `[B, L, D]`."""
        batch, _, q_len, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(batch, q_len, -1))

    def use_absorbed(self, q_len: int, past_len: int) -> bool:
        if self.attention_path == "absorbed":
            return True
        if self.attention_path == "plain":
            return False
        return past_len > 0 and q_len <= MAX_ABSORBED_QUERY_LEN

    def select_decode_kernels(self, query: torch.Tensor, mask: torch.Tensor | None) -> Any | None:
        """The `gtakit.kernels` module when this absorbed step should run the Triton kernels, else None.

        `decode_backend`: 'torch' never uses them; 'auto' uses them for CUDA tensors when they import; 'triton'
        always (CPU only under TRITON_INTERPRET=1, otherwise a clear error). Cases the kernels do not cover fall
        back to PyTorch whatever the backend: gradients (no backward), an explicit mask (padding; the kernels know
        only causal order over the whole cache), cached key scales (QK-norm), query blocks over the kernels' limit
        and unsupported dtypes.
        """
        backend = self.decode_backend
        if backend == "torch" or not self.supports_decode_kernels or self.key_scales or self.rope_dim == 0 or \
                self.softcap is not None or \
                (backend == "auto" and not query.is_cuda):
            return None
        kernels = decode_kernels()
        if kernels is None:
            if backend == "triton":
                raise ImportError(f"decode_backend='triton' needs gtakit.kernels and triton: {_KERNEL_IMPORT_ERROR}")
            return None
        if not query.is_cuda and not kernels.kernels_interpreted():
            raise RuntimeError(
                "decode_backend='triton' on CPU needs TRITON_INTERPRET=1 set before gtakit.kernels is imported "
                "(slow, for tests); use decode_backend='auto' or 'torch' on CPU"
            )
        if query.shape[2] > kernels.MAX_QUERY_LEN or query.dtype not in kernels.SUPPORTED_DTYPES:
            return None
        if torch.is_grad_enabled() and query.requires_grad:
            return None
        return kernels if mask is None else None

    def cap_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Scaled scores, soft-capped when the family does (before the mask, as transformers does)."""
        if self.softcap is None:
            return scores
        return torch.tanh(scores / self.softcap) * self.softcap

    def explicit_attention(self, query, key, value, mask, q_len) -> torch.Tensor:
        """Attention with the scores materialised (soft-capping has no fused kernel)."""
        total = key.shape[2]
        scores = self.cap_scores((query @ key.transpose(-1, -2)).float() * self.scale)
        scores = scores + additive(mask, q_len, total, query.device) if (mask is not None or q_len > 1) else scores
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        probs = F.dropout(probs, p=self.attention_dropout, training=self.training)
        return probs @ value

    def sdpa(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, q_len: int
    ) -> torch.Tensor:
        groups = query.shape[1] // key.shape[1]  # > 1: each key head serves a contiguous block of query heads
        # SDPA's own GQA (no copies) is used on the CPU only: on CUDA not every kernel of the torch releases we
        # support takes it, and a fallback to the math path would materialise the T x T scores.
        if groups > 1 and (self.softcap is not None or query.device.type != "cpu"):
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
            groups = 1
        if self.softcap is not None:
            return self.explicit_attention(query, key, value, mask, q_len)
        # SDPA's fused (flash / memory-efficient) kernels need one head width for q, k and v; otherwise it falls
        # back to the math path, which materialises the T x T scores (15x slower and ~6x the memory at 8K tokens
        # on a CPU). Zero columns change neither the scores (the scale is explicit) nor the kept output columns.
        qk_dim, v_dim = query.shape[-1], value.shape[-1]
        if v_dim < qk_dim:
            value = F.pad(value, (0, qk_dim - v_dim))
        elif qk_dim < v_dim:
            query, key = F.pad(query, (0, v_dim - qk_dim)), F.pad(key, (0, v_dim - qk_dim))
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=mask is None and q_len > 1,
            scale=self.scale,
            enable_gqa=groups > 1,
        )
        return out[..., :v_dim]

    # ----------------------------------------------------------------------------------------- hooks
    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        raise NotImplementedError

    def plain_attention(self, query, state, rope_key, mask, q_len, key_scale=None):
        raise NotImplementedError

    def absorbed_attention(self, query, state, rope_key, mask, key_scale=None):
        raise NotImplementedError
