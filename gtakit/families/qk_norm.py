"""Llama-style decoders with QK-norm: an RMSNorm on the queries and keys before RoPE.

Qwen3 normalises each head (`q_norm`, `k_norm` of width head_dim), Gemma 3 (`gemma.py`) likewise with weights
stored as w - 1, OLMo-2 the whole projection (one scalar per token; width H*d and G*d) and has no pre-attention norm. The
norm weights go into `SourceAttention` (the converter folds them; `gtakit/forms/qk_norm.py`), and calibration
measures the per-token scalars with the family's own projections.
"""

from __future__ import annotations

from typing import Any

import torch

from gtakit.io.source import WeightReader

from .base import SourceAttention, SourceShape
from .llama import LlamaFamily


class QKNormFamily(LlamaFamily):
    model_types = ("qwen3",)
    description = "Qwen3 decoders (per-head QK-norm)"
    qk_norm_scope = "head"  # RMS over each head ("all": over the whole projection)
    norm_weight_offset = 0.0  # Gemma stores w - 1

    def check_config(self, config: Any) -> None:
        if getattr(config, "attention_bias", False):
            raise self.refuse(config, "QK-norm with attention biases")
        self.check_common(config)

    def norm_width(self, config: Any, heads: int) -> int:
        return self.head_dim(config) * (heads if self.qk_norm_scope == "all" else 1)

    def norm_shapes(self, config: Any, attn: str) -> dict[str, tuple[int, ...]]:
        return {attn + "q_norm.weight": (self.norm_width(config, config.num_attention_heads),),
                attn + "k_norm.weight": (self.norm_width(config, self.num_kv_heads(config)),)}

    def shape(self, config: Any, weights: WeightReader) -> SourceShape:
        base = super().shape(config, weights)
        return SourceShape(**{**base.__dict__, "attention_scale": self.attention_scale(config),
                              "qk_norm_scope": self.qk_norm_scope, "qk_norm_eps": float(config.rms_norm_eps)})

    def read_attention(self, weights: WeightReader, config: Any, layer: int) -> SourceAttention:
        attn = super().read_attention(weights, config, layer)
        prefix = self.attention_prefix(layer)

        def norm_weight(name: str, heads: int) -> torch.Tensor:
            weight = weights.get(prefix + name).to(torch.float64) + self.norm_weight_offset
            return weight.reshape(-1, attn.head_dim).expand(heads, attn.head_dim).clone()

        attn.qk_norm_scope, attn.qk_norm_eps = self.qk_norm_scope, float(config.rms_norm_eps)
        attn.q_norm_weight = norm_weight("q_norm.weight", attn.num_heads)
        attn.k_norm_weight = norm_weight("k_norm.weight", attn.num_kv_heads)
        attn.inv_freq = self.layer_inv_freq(config, layer)
        return attn

    def _projections(self, layer: Any, x: torch.Tensor, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
        attn = getattr(layer, self.attention_name)
        return attn.q_proj(x), attn.k_proj(x)

    def rotated_queries_keys(self, layer: Any, x: torch.Tensor, cos_sin: Any, config: Any):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = getattr(layer, self.attention_name)
        batch, length, _ = x.shape
        q, k = self._projections(layer, x, config)
        if self.qk_norm_scope == "all":
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = q.view(batch, length, config.num_attention_heads, -1)
        k = k.view(batch, length, self.num_kv_heads(config), -1)
        if self.qk_norm_scope == "head":
            q, k = attn.q_norm(q), attn.k_norm(k)
        return apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *cos_sin)

    def qk_norm_scales(self, layer: Any, x: torch.Tensor, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = self._projections(layer, x, config)
        eps = float(config.rms_norm_eps)

        def scales(raw: torch.Tensor) -> torch.Tensor:
            per = raw.float().view(raw.shape[0], -1, self.head_dim(config))
            dims = (-1,) if self.qk_norm_scope == "head" else (-2, -1)
            return torch.rsqrt(per.pow(2).mean(dim=dims) + eps).view(raw.shape[0], -1)

        return scales(q), scales(k)


class Olmo2Family(QKNormFamily):
    model_types = ("olmo2",)
    description = "OLMo-2 decoders (QK-norm over the whole projection)"
    qk_norm_scope = "all"

    def input_norm(self, layer: Any) -> Any:
        return torch.nn.Identity()  # OLMo-2 normalises after the attention, not before
