"""Llama-style decoders: separate q/k/v/o projections (optional biases), rotate-half RoPE over the whole head.
Llama, Mistral (with or without its sliding window) and Qwen2 (q/k/v biases, sliding-window layers) share this
adapter; the family's own masks carry the windows, so converted layers need nothing for them."""

from __future__ import annotations

from typing import Any

import torch

from gtakit.io.source import WeightReader

from .base import FamilyAdapter, SourceAttention, SourceShape

SUPPORTED_ROPE = ("default", "linear", "llama3", "dynamic")


class LlamaFamily(FamilyAdapter):
    model_types = ("llama", "mistral", "qwen2")
    description = "Llama-family decoders (llama, mistral, qwen2) with RoPE and separate q/k/v projections"
    activations = ("silu", "swish")
    activation_field = "hidden_act"  # the config field naming the MLP's activation

    def check_config(self, config: Any) -> None:
        if getattr(config, "use_qk_norm", False) or getattr(config, "qk_norm", False):
            raise self.refuse(config, "QK-norm")
        self.check_common(config)

    def check_common(self, config: Any) -> None:
        kinds = set(getattr(config, "layer_types", None) or [])
        if kinds - {"full_attention", "sliding_attention"}:
            raise self.refuse(config, f"layer types {sorted(kinds)}")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE:
            raise self.refuse(config, f"RoPE scaling {rope_type!r}")
        if float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
            raise self.refuse(config, "partial rotary embeddings")
        activation = getattr(config, self.activation_field, "silu")
        if activation not in self.activations:
            raise self.refuse(config, f"activation {activation!r}")
        if self.head_dim(config) % 2:
            raise self.refuse(config, "odd head_dim")

    def layer_shapes(self, config: Any, attn: str, mlp: str) -> dict[str, tuple[int, ...]]:
        d, h = config.hidden_size, config.num_attention_heads
        g, hd = self.num_kv_heads(config), self.head_dim(config)
        return {attn + "q_proj.weight": (h * hd, d), attn + "k_proj.weight": (g * hd, d),
                attn + "v_proj.weight": (g * hd, d), attn + "o_proj.weight": (d, h * hd),
                **self.mlp_shapes(config, mlp, config.intermediate_size), **self.norm_shapes(config, attn)}

    def mlp_shapes(self, config: Any, mlp: str, inner: int) -> dict[str, tuple[int, ...]]:
        d = config.hidden_size
        return {mlp + "gate_proj.weight": (inner, d), mlp + "up_proj.weight": (inner, d),
                mlp + "down_proj.weight": (d, inner)}

    def norm_shapes(self, config: Any, attn: str) -> dict[str, tuple[int, ...]]:
        """Shapes of the attention's own norm weights (QK-norm families)."""
        return {}

    def num_kv_heads(self, config: Any) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def shape(self, config: Any, weights: WeightReader) -> SourceShape:
        attn = self.attention_prefix(0)
        return SourceShape(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=self.num_kv_heads(config),
            head_dim=self.head_dim(config),
            num_layers=config.num_hidden_layers,
            has_qk_bias=weights.has(attn + "q_proj.bias") or weights.has(attn + "k_proj.bias"),
            has_o_bias=weights.has(attn + "v_proj.bias") or weights.has(attn + "o_proj.bias"),
        )

    def read_attention(self, weights: WeightReader, config: Any, layer: int) -> SourceAttention:
        prefix = self.attention_prefix(layer)

        def get(name: str, optional: bool = False) -> torch.Tensor | None:
            if optional and not weights.has(prefix + name):
                return None
            return weights.get(prefix + name).to(torch.float64)

        return SourceAttention(
            wq=get("q_proj.weight"), wk=get("k_proj.weight"), wv=get("v_proj.weight"), wo=get("o_proj.weight"),
            bq=get("q_proj.bias", True), bk=get("k_proj.bias", True), bv=get("v_proj.bias", True),
            bo=get("o_proj.bias", True),
            num_heads=config.num_attention_heads, num_kv_heads=self.num_kv_heads(config),
            head_dim=self.head_dim(config), inv_freq=self.inv_freq(config),
        )

    def rotated_queries_keys(self, layer: Any, x: torch.Tensor, cos_sin: Any, config: Any):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = getattr(layer, self.attention_name)
        batch, length, _ = x.shape
        head_dim = self.head_dim(config)
        q = attn.q_proj(x).view(batch, length, config.num_attention_heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, length, self.num_kv_heads(config), head_dim).transpose(1, 2)
        return apply_rotary_pos_emb(q, k, *cos_sin)


class Phi3Family(LlamaFamily):
    """Phi-3: Llama-style with fused projections (`qkv_proj`: queries, then keys, then values; `gate_up_proj`)."""

    model_types = ("phi3",)
    description = "Phi-3 decoders (fused qkv_proj)"

    def layer_shapes(self, config: Any, attn: str, mlp: str) -> dict[str, tuple[int, ...]]:
        d, h = config.hidden_size, config.num_attention_heads
        g, hd, inner = self.num_kv_heads(config), self.head_dim(config), config.intermediate_size
        return {attn + "qkv_proj.weight": ((h + 2 * g) * hd, d), attn + "o_proj.weight": (d, h * hd),
                mlp + "gate_up_proj.weight": (2 * inner, d), mlp + "down_proj.weight": (d, inner)}

    def shape(self, config: Any, weights: WeightReader) -> SourceShape:
        base = super().shape(config, weights)
        attn = self.attention_prefix(0)
        return SourceShape(**{**base.__dict__, "has_qk_bias": weights.has(attn + "qkv_proj.bias")})

    def read_attention(self, weights: WeightReader, config: Any, layer: int) -> SourceAttention:
        prefix = self.attention_prefix(layer)
        h, g, hd = config.num_attention_heads, self.num_kv_heads(config), self.head_dim(config)
        splits = [h * hd, g * hd, g * hd]
        wq, wk, wv = weights.get(prefix + "qkv_proj.weight").to(torch.float64).split(splits)
        bias = weights.get(prefix + "qkv_proj.bias").to(torch.float64).split(splits) \
            if weights.has(prefix + "qkv_proj.bias") else (None, None, None)
        bo = weights.get(prefix + "o_proj.bias").to(torch.float64) if weights.has(prefix + "o_proj.bias") else None
        return SourceAttention(wq=wq, wk=wk, wv=wv, wo=weights.get(prefix + "o_proj.weight").to(torch.float64),
                               bq=bias[0], bk=bias[1], bv=bias[2], bo=bo, num_heads=h, num_kv_heads=g, head_dim=hd,
                               inv_freq=self.inv_freq(config))

    def rotated_queries_keys(self, layer: Any, x: torch.Tensor, cos_sin: Any, config: Any):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        batch, length, _ = x.shape
        h, g, hd = config.num_attention_heads, self.num_kv_heads(config), self.head_dim(config)
        q, k, _ = getattr(layer, self.attention_name).qkv_proj(x).split([h * hd, g * hd, g * hd], dim=-1)
        q = q.view(batch, length, h, hd).transpose(1, 2)
        k = k.view(batch, length, g, hd).transpose(1, 2)
        return apply_rotary_pos_emb(q, k, *cos_sin)


class SmolLM3Family(LlamaFamily):
    """SmolLM3: Llama-style, but every few layers has no RoPE (`no_rope_layers[i] == 0`); those layers convert with
    a zero-width RoPE key."""

    model_types = ("smollm3",)
    description = "SmolLM3 decoders (NoPE layers)"

    def layer_has_rope(self, config: Any, layer: int) -> bool:
        return bool(config.no_rope_layers[layer])
