"""GPT-NeoX (Pythia): fused per-head interleaved `query_key_value`, partial rotary (25% of each head), biases,
LayerNorms and a parallel residual (the family's own layer, passed through).

The rotating dims of a head are its first `rotary_ndims` (rotate-half within them); the adapter permutes each
head's query and key rows so that the converter sees rotate-half pairs over the whole head, the non-rotating dims
forming pairs of frequency 0 that never enter the shared RoPE key (`SourceAttention.rotary_pairs`). q . k is
unchanged by the permutation, which stays inside the converted layer.
"""

from __future__ import annotations

from typing import Any

import torch

from gtakit.io.source import WeightReader

from .base import FamilyAdapter, SourceAttention, SourceShape

SUPPORTED_ROPE = ("default", "linear", "dynamic")


def partial_rotary_order(rotary_dims: int, head_dim: int) -> list[int]:
    """Head dims reordered so pair (i, i + d/2) is rotary pair i for i < rotary_dims/2, else two free dims."""
    half_rot, free = rotary_dims // 2, head_dim - rotary_dims
    return (list(range(half_rot)) + list(range(rotary_dims, rotary_dims + free // 2))
            + list(range(half_rot, rotary_dims)) + list(range(rotary_dims + free // 2, head_dim)))


class GPTNeoXFamily(FamilyAdapter):
    model_types = ("gpt_neox",)
    description = "GPT-NeoX decoders (partial rotary, fused per-head qkv)"
    layers_prefix = "gpt_neox.layers"
    attention_name = "attention"
    embedding_name = "gpt_neox.embed_in.weight"
    checkpoint_renames = {"embed_out.weight": "lm_head.weight"}

    def check_config(self, config: Any) -> None:
        rope = config.rope_parameters or {}
        if rope.get("rope_type", "default") not in SUPPORTED_ROPE:
            raise self.refuse(config, f"RoPE scaling {rope.get('rope_type')!r}")
        if self.rotary_pairs(config) < 1 or (2 * self.rotary_pairs(config)) % 2:
            raise self.refuse(config, "a rotary width below 2")
        if self.head_dim(config) % 2:
            raise self.refuse(config, "odd head_dim")

    def layer_shapes(self, config: Any, attn: str, mlp: str) -> dict[str, tuple[int, ...]]:
        d, inner = config.hidden_size, config.intermediate_size
        return {attn + "query_key_value.weight": (3 * d, d), attn + "dense.weight": (d, d),
                mlp + "dense_h_to_4h.weight": (inner, d), mlp + "dense_4h_to_h.weight": (d, inner)}

    def shape(self, config: Any, weights: WeightReader) -> SourceShape:
        return self.fused_mha_shape(config, weights, "query_key_value", "dense", rotary_pairs=self.rotary_pairs(config))

    def layer_inv_freq(self, config: Any, layer: int) -> torch.Tensor:
        """The rotating frequencies, then zeros for the free pairs (the converter's whole-head layout)."""
        rotating = self.inv_freq(config)
        return torch.cat((rotating, rotating.new_zeros(self.head_dim(config) // 2 - len(rotating))))

    def read_attention(self, weights: WeightReader, config: Any, layer: int) -> SourceAttention:
        prefix = self.attention_prefix(layer)
        heads, head_dim = config.num_attention_heads, self.head_dim(config)
        order = torch.tensor(partial_rotary_order(2 * self.rotary_pairs(config), head_dim))
        fused = weights.get(prefix + "query_key_value.weight").to(torch.float64).view(heads, 3, head_dim, -1)
        wq, wk, wv = fused[:, 0, order], fused[:, 1, order], fused[:, 2]
        bq = bk = bv = None
        if weights.has(prefix + "query_key_value.bias"):
            bias = weights.get(prefix + "query_key_value.bias").to(torch.float64).view(heads, 3, head_dim)
            bq, bk, bv = bias[:, 0, order].reshape(-1), bias[:, 1, order].reshape(-1), bias[:, 2].reshape(-1)
        bo = weights.get(prefix + "dense.bias").to(torch.float64) if weights.has(prefix + "dense.bias") else None
        return SourceAttention(
            wq=wq.reshape(heads * head_dim, -1), wk=wk.reshape(heads * head_dim, -1),
            wv=wv.reshape(heads * head_dim, -1), wo=weights.get(prefix + "dense.weight").to(torch.float64),
            bq=bq, bk=bk, bv=bv, bo=bo, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
            inv_freq=self.layer_inv_freq(config, layer), rotary_pairs=self.rotary_pairs(config),
        )

    def decoder_layers(self, model: Any) -> Any:
        return model.gpt_neox.layers

    def rotary(self, model: Any) -> Any:
        return model.gpt_neox.rotary_emb

    def rotated_queries_keys(self, layer: Any, x: torch.Tensor, cos_sin: Any, config: Any):
        from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

        batch, length, _ = x.shape
        head_dim = self.head_dim(config)
        qkv = layer.attention.query_key_value(x).view(batch, length, -1, 3 * head_dim).transpose(1, 2)
        q, k, _ = qkv.chunk(3, dim=-1)
        return apply_rotary_pos_emb(q, k, *cos_sin)
