"""Parts shared by the gtakit model forms: norm, MLP, RoPE, masks, decoder stack and the HF model classes.

Flat file (copied next to converted weights for `trust_remote_code`); imports nothing from gtakit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as hf_init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache_gtakit import CACHE_FIELD, CompressedKVCache, is_compressed_cache_compatible, output_cache, pick_cache

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


# --------------------------------------------------------------------------------------------- RoPE


def standard_rope_freqs(rope_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies of a standard `rope_dim`-wide RoPE: theta^(-2i/rope_dim), i < rope_dim/2."""
    exponent = torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim
    return (1.0 / (theta**exponent)).float()


def apply_static_rope_scaling(freqs: torch.Tensor, rope_parameters: dict) -> torch.Tensor:
    """Length-independent scalings (`linear`, `llama3`) applied to inverse-frequency values."""
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type == "linear":
        return freqs / float(rope_parameters["factor"])
    if rope_type == "llama3":
        factor = float(rope_parameters["factor"])
        low = float(rope_parameters["low_freq_factor"])
        high = float(rope_parameters["high_freq_factor"])
        old_len = float(rope_parameters["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freqs
        scaled = torch.where(wavelen > old_len / low, freqs / factor, freqs)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    return freqs


def dynamic_rope_freqs(freqs: torch.Tensor, rope_parameters: dict, seq_len: int, max_positions: int) -> torch.Tensor:
    """Dynamic-NTK rescaling of stored frequencies.

    Dynamic NTK replaces the base theta by theta' once the sequence outgrows the trained length. A frequency
    theta^(-2i/d) then becomes theta'^(-2i/d) = freq^(ln theta' / ln theta), so stored frequency values can be
    rescaled without knowing which index they came from (conversion keeps arbitrary subsets per layer).
    """
    if seq_len <= max_positions:
        return freqs
    theta = float(rope_parameters["rope_theta"])
    factor = float(rope_parameters.get("factor", 1.0))
    dim = int(rope_parameters.get("original_head_dim", 2 * freqs.numel()))
    new_theta = theta * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    return freqs.double().pow(math.log(new_theta) / math.log(theta)).to(freqs.dtype)


def default_layer_rope_freqs(config: Any, rope_dim: int) -> torch.Tensor:
    return apply_static_rope_scaling(
        standard_rope_freqs(rope_dim, float(config.rope_parameters["rope_theta"])), config.rope_parameters
    )


def rope_cos_sin(
    position_ids: torch.Tensor, freqs: torch.Tensor, config: Any, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[B, 1, L, 2 * len(freqs)]` in the rotate-half layout for positions `[B, L]`."""
    if config.rope_parameters.get("rope_type") == "dynamic":
        seq_len = int(position_ids.max().item()) + 1
        freqs = dynamic_rope_freqs(freqs, config.rope_parameters, seq_len, config.max_position_embeddings)
    angles = position_ids.to(torch.float32)[..., None] * freqs.to(position_ids.device, torch.float32)
    emb = torch.cat((angles, angles), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------- masks


def build_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask `[B, 1, L, past_len + L]` (True = attend), or None when plain causal attention suffices.

    None is returned only when no position is padded and the causal mask is top-left aligned (no past) or
    trivial (one query). Rows with nothing to attend to (queries at left-padding positions) are opened to
    their causal window so that they stay finite instead of producing NaN that would leak through values.
    """
    total = past_len + q_len
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask > -1
        return mask[..., -q_len:, -total:]
    has_padding = attention_mask is not None and not bool(attention_mask[:, -total:].all())
    if not has_padding and (past_len == 0 or q_len == 1):
        return None
    q_pos = torch.arange(past_len, total, device=device)
    causal = torch.arange(total, device=device)[None, :] <= q_pos[:, None]
    mask = causal[None, None].expand(batch, 1, q_len, total)
    if has_padding:
        if attention_mask.shape[-1] < total:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but past + new tokens are {total}"
            )
        mask = mask & attention_mask[:, None, None, -total:].to(device).bool()
        empty = ~mask.any(dim=-1, keepdim=True)
        mask = torch.where(empty, causal[None, None], mask)
    return mask


def additive_mask(mask: torch.Tensor | None, q_len: int, past_len: int, device: torch.device, dtype: torch.dtype):
    """Additive float mask for the explicit (absorbed) attention path; causal when `mask` is None."""
    if mask is None:
        if q_len == 1:
            return None
        total = past_len + q_len
        q_pos = torch.arange(past_len, total, device=device)
        mask = (torch.arange(total, device=device)[None, :] <= q_pos[:, None])[None, None]
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)


class AttentionMask:
    """The mask of one forward pass, shared by all layers: `boolean` for SDPA (None = plain causal) and, built
    once on first use, the `additive` float mask of the explicit (absorbed) path. `source` is the caller's
    attention_mask, kept to tell (lazily, see `causal_only`) whether the Triton decode kernels may be used."""

    def __init__(
        self,
        boolean: torch.Tensor | None,
        q_len: int,
        past_len: int,
        device: torch.device,
        source: torch.Tensor | None = None,
    ) -> None:
        self.boolean = boolean
        self.q_len = q_len
        self.past_len = past_len
        self.device = device
        self.source = source
        self._additive: torch.Tensor | None = None
        self._additive_built = False
        self._causal_only: bool | None = None

    @property
    def causal_only(self) -> bool:
        """True when the mask is plain causal over the whole cache (no padding, no custom 4-D mask)."""
        if self._causal_only is None:
            if self.boolean is None or self.source is None:
                self._causal_only = True
            elif self.source.dim() != 2:
                self._causal_only = False
            else:  # one host sync per forward pass, and only when a kernel path asks
                self._causal_only = bool(self.source[:, -(self.past_len + self.q_len) :].all())
        return self._causal_only

    @property
    def additive(self) -> torch.Tensor | None:
        if not self._additive_built:
            self._additive = additive_mask(self.boolean, self.q_len, self.past_len, self.device, torch.float32)
            self._additive_built = True
        return self._additive


# --------------------------------------------------------------------------------------------- blocks


class GtakitRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GtakitMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class CompressedAttentionBase(nn.Module):
    """Common plumbing of GTA and GLA attention: RoPE buffer, path selection, cache update."""

    rope_width: int

    def __init__(self, config: Any, layer_idx: int, rope_width: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.rope_width = rope_width
        self.attention_path = "auto"
        # Conversion keeps a different subset of the source's RoPE frequencies in every layer, so each layer
        # owns its frequency vector and saves it with the weights.
        self.register_buffer("rope_freqs", default_layer_rope_freqs(config, rope_width), persistent=True)

    def _apply(self, fn, recurse: bool = True):
        # `model.to(torch.bfloat16)` / `.half()` would round the frequencies (bf16 keeps ~3 digits, so angles at
        # long positions go wrong); follow device moves but keep them in float32.
        original = self._buffers["rope_freqs"]
        super()._apply(fn, recurse)
        converted = self._buffers["rope_freqs"]
        if converted is not None and converted.dtype != torch.float32:
            if original.is_meta or converted.is_meta:
                self._buffers["rope_freqs"] = converted.float()
            else:
                self._buffers["rope_freqs"] = original.to(device=converted.device, dtype=torch.float32)
        return self

    # Subclasses with a `kernel_attention(kernels, query, state, rope_key)` set this (GTA, GLA).
    supports_decode_kernels = False

    def select_decode_kernels(self, query: torch.Tensor, mask: AttentionMask) -> Any | None:
        """The `gtakit.kernels` module when this absorbed step should run the Triton kernels, else None.

        `config.decode_backend`: 'torch' never uses them; 'auto' uses them for CUDA tensors when they import;
        'triton' always (CPU only under TRITON_INTERPRET=1, otherwise a clear error). Cases the kernels do not
        cover fall back to PyTorch whatever the backend: gradients (no backward), a padding or custom mask (the
        kernels know only per-row lengths and causal order, and this contiguous cache gives every row the full
        length; left padding lives in the mask), query blocks over the kernels' limit and unsupported dtypes.
        """
        backend = getattr(self.config, "decode_backend", "auto")
        if backend == "torch" or not self.supports_decode_kernels or (backend == "auto" and not query.is_cuda):
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
        return kernels if mask.causal_only else None

    def use_absorbed(self, q_len: int, past_len: int) -> bool:
        if self.attention_path == "absorbed":
            return True
        if self.attention_path == "plain":
            return False
        return past_len > 0 and q_len <= MAX_ABSORBED_QUERY_LEN

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: AttentionMask,
        cache: Cache | None = None,
        past_len: int = 0,
    ) -> torch.Tensor:
        cos, sin = rope_cos_sin(position_ids, self.rope_freqs, self.config, hidden_states.dtype)
        query, state, rope_key = self.project(hidden_states, cos, sin)
        if cache is not None:
            state, rope_key = cache.update(state, rope_key, self.layer_idx)
        q_len = hidden_states.shape[1]
        absorbed = self.use_absorbed(q_len, past_len)
        kernels = self.select_decode_kernels(query, attention_mask) if absorbed else None
        if kernels is not None:
            out = self.kernel_attention(kernels, query, state, rope_key)
        elif absorbed:
            out = self.absorbed_attention(query, state, rope_key, attention_mask.additive)
        else:
            out = self.plain_attention(query, state, rope_key, attention_mask.boolean, q_len)
        batch = hidden_states.shape[0]
        return self.o_proj(out.transpose(1, 2).reshape(batch, q_len, -1))

    def sdpa(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, q_len: int
    ) -> torch.Tensor:
        # SDPA's fused (flash / memory-efficient) kernels need one head width for q, k and v; otherwise it falls
        # back to the math path, which materialises the T x T scores (15x slower and ~6x the memory at 8K tokens
        # on a CPU). Zero columns change neither the scores (the scale is explicit) nor the kept output columns.
        qk_dim, v_dim = query.shape[-1], value.shape[-1]
        if v_dim < qk_dim:
            value = F.pad(value, (0, qk_dim - v_dim))
        elif qk_dim < v_dim:
            query, key = F.pad(query, (0, v_dim - qk_dim)), F.pad(key, (0, v_dim - qk_dim))
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=self.config.attention_dropout if self.training else 0.0,
            is_causal=mask is None and q_len > 1,
            scale=self.scale,
        )
        return out[..., :v_dim]


class GtakitDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: Any, layer_idx: int, attention_cls: type[CompressedAttentionBase]) -> None:
        super().__init__()
        self.self_attn = attention_cls(config, layer_idx)
        self.mlp = GtakitMLP(config)
        self.input_layernorm = GtakitRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = GtakitRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: AttentionMask,
        cache: Cache | None = None,
        past_len: int = 0,
    ) -> torch.Tensor:
        residual = hidden_states
        normed = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(normed, position_ids, attention_mask, cache, past_len)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


# --------------------------------------------------------------------------------------------- HF models


class GtakitPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GtakitDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CompressedAttentionBase):
            hf_init.copy_(module.rope_freqs, default_layer_rope_freqs(self.config, module.rope_width))

    def set_attention_path(self, path: str) -> None:
        """Force the attention path: 'plain' (up-projected, SDPA), 'absorbed' (reads the compressed cache
        directly) or 'auto' (absorbed for short queries against a non-empty cache)."""
        if path not in ATTENTION_PATHS:
            raise ValueError(f"attention path must be one of {ATTENTION_PATHS}, got {path!r}")
        for module in self.modules():
            if isinstance(module, CompressedAttentionBase):
                module.attention_path = path



class GtakitModelBase(GtakitPreTrainedModel):
    attention_cls: type[CompressedAttentionBase]

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [GtakitDecoderLayer(config, idx, self.attention_cls) for idx in range(config.num_hidden_layers)]
        )
        self.norm = GtakitRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _ensure_cache(self, cache: Cache | None) -> Cache:
        """The cache to write into: the caller's (generate() passes a DynamicCache; its layers hold the compressed
        tensors as well as ours do), or a new CompressedKVCache."""
        if cache is None:
            return CompressedKVCache(config=self.config)
        if not is_compressed_cache_compatible(cache):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            raise ValueError(
                f"gtakit models store their compressed state in dynamic cache layers, got {type(cache).__name__} "
                f"with {', '.join(kinds)}; use the default cache (no cache_implementation) or pass cache=None"
            )
        return cache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        cache = pick_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        cache = self._ensure_cache(cache) if use_cache else None
        past_len = cache.get_seq_length() if cache is not None else 0
        batch, q_len = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device)
            position_ids = position_ids.unsqueeze(0).expand(batch, q_len)
        device = inputs_embeds.device
        boolean_mask = build_attention_mask(attention_mask, batch, q_len, past_len, device)
        mask = AttentionMask(boolean_mask, q_len, past_len, device, source=attention_mask)

        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        all_hidden = [] if output_hidden_states else None
        hidden_states = inputs_embeds
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, position_ids, mask, cache, past_len)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{CACHE_FIELD: cache},
        )


class GtakitForCausalLMBase(GtakitPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    model_cls: type[GtakitModelBase]

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.model = self.model_cls(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_FIELD: output_cache(outputs)}
        )
