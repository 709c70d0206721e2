"""GPT-2: learned absolute positions (no RoPE in any layer), `Conv1D` weights stored (in, out), fused `c_attn`,
biases everywhere, LayerNorms. Every layer converts with a zero-width RoPE key; the family's own blocks, position
embeddings and masks are passed through."""

from __future__ import annotations

from typing import Any

import torch

from gtakit.io.source import WeightReader

from .base import FamilyAdapter, SourceAttention, SourceShape


class GPT2Family(FamilyAdapter):
    model_types = ("gpt2",)
    description = "GPT-2 decoders (learned positions)"
    layers_prefix = "transformer.h"
    attention_name = "attn"
    embedding_name = "transformer.wte.weight"
    learned_positions = True
    required_fields = ("n_embd", "n_layer", "n_head", "vocab_size")

    def check_config(self, config: Any) -> None:
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise self.refuse(config, "scale_attn_by_inverse_layer_idx")
        if getattr(config, "add_cross_attention", False):
            raise self.refuse(config, "cross-attention")

    def inner_size(self, config: Any) -> int:
        return config.n_inner or 4 * config.hidden_size

    def expected_shapes(self, config: Any) -> dict[str, tuple[int, ...]]:
        return {**super().expected_shapes(config), "transformer.wpe.weight": (config.n_positions, config.hidden_size)}

    def layer_shapes(self, config: Any, attn: str, mlp: str) -> dict[str, tuple[int, ...]]:
        d, inner = config.hidden_size, self.inner_size(config)
        return {attn + "c_attn.weight": (d, 3 * d), attn + "c_proj.weight": (d, d),  # Conv1D: (in, out)
                mlp + "c_fc.weight": (d, inner), mlp + "c_proj.weight": (inner, d)}

    def layer_has_rope(self, config: Any, layer: int) -> bool:
        return False

    def attention_scale(self, config: Any) -> float:
        return self.head_dim(config) ** -0.5 if config.scale_attn_weights else 1.0

    def shape(self, config: Any, weights: WeightReader) -> SourceShape:
        return self.fused_mha_shape(config, weights, "c_attn", "c_proj", attention_scale=self.attention_scale(config))

    def read_attention(self, weights: WeightReader, config: Any, layer: int) -> SourceAttention:
        prefix = self.attention_prefix(layer)
        d = config.hidden_size
        # Conv1D keeps weights as (in, out): transposed, they are Linear rows.
        wq, wk, wv = weights.get(prefix + "c_attn.weight").to(torch.float64).T.split(d)
        bq = bk = bv = bo = None
        if weights.has(prefix + "c_attn.bias"):
            bq, bk, bv = weights.get(prefix + "c_attn.bias").to(torch.float64).split(d)
        if weights.has(prefix + "c_proj.bias"):
            bo = weights.get(prefix + "c_proj.bias").to(torch.float64)
        heads, head_dim = config.num_attention_heads, self.head_dim(config)
        return SourceAttention(
            wq=wq.contiguous(), wk=wk.contiguous(), wv=wv.contiguous(),
            wo=weights.get(prefix + "c_proj.weight").to(torch.float64).T.contiguous(), bq=bq, bk=bk, bv=bv, bo=bo,
            num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
            inv_freq=torch.zeros(head_dim // 2, dtype=torch.float64),
        )

    def embed(self, ids: torch.Tensor, weights: WeightReader, config: Any) -> torch.Tensor:
        tokens = torch.nn.functional.embedding(ids, weights.get(self.embedding_name)).float()
        positions = weights.get("transformer.wpe.weight").float()[: ids.shape[1]]
        return tokens + positions

    def decoder_layers(self, model: Any) -> Any:
        return model.transformer.h

    def rotary(self, model: Any) -> Any:
        return None

    def input_norm(self, layer: Any) -> Any:
        return layer.ln_1
