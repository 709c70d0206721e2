"""Gemma 2 and Gemma 3 text decoders: Llama-style attention with the Gemma particulars.

Both scale embeddings by sqrt(hidden_size), use `query_pre_attn_scalar` for the softmax scale, GELU-tanh MLPs
and sandwich norms (all the family's own modules, passed through), and alternate sliding and full layers.
Gemma 2 soft-caps the attention scores (tanh(s / cap) * cap; the converted layers do the same, and transformers
runs it with eager attention); Gemma 3 has per-head QK-norm with weights stored as w - 1, and its sliding and
full layers rotate with their own RoPE bases.
"""

from __future__ import annotations

from typing import Any

import torch

from gtakit.io.source import WeightReader

from .base import SourceShape
from .llama import LlamaFamily
from .qk_norm import QKNormFamily


class GemmaParticulars:
    """What Gemma 2 and 3 share, for a `FamilyAdapter`."""

    activations = ("gelu_pytorch_tanh", "gelu")
    activation_field = "hidden_activation"

    def attention_scale(self, config: Any) -> float:
        return float(config.query_pre_attn_scalar) ** -0.5

    def embed(self, ids: torch.Tensor, weights: WeightReader, config: Any) -> torch.Tensor:
        # Gemma scales its embeddings by sqrt(hidden_size), rounded to the weights' dtype as transformers does.
        weight = weights.get(self.embedding_name)
        scale = torch.tensor(config.hidden_size**0.5, dtype=weight.dtype)
        return torch.nn.functional.embedding(ids, weight).float() * scale.float()

    def check_gemma(self, config: Any) -> None:
        if config.hidden_activation not in self.activations:
            raise self.refuse(config, f"activation {config.hidden_activation!r}")
        if getattr(config, "use_bidirectional_attention", False):
            raise self.refuse(config, "bidirectional attention")


class Gemma2Family(GemmaParticulars, LlamaFamily):
    model_types = ("gemma2",)
    description = "Gemma 2 decoders (attention soft-capping)"
    attention_implementation = "eager"  # transformers has no SDPA path with soft-capping for Gemma 2

    def check_config(self, config: Any) -> None:
        self.check_gemma(config)
        self.check_common(config)

    def shape(self, config: Any, weights: WeightReader) -> SourceShape:
        base = super().shape(config, weights)
        return SourceShape(**{**base.__dict__, "attention_scale": self.attention_scale(config),
                              "attention_softcap": config.attn_logit_softcapping})


class Gemma3Family(GemmaParticulars, QKNormFamily):
    model_types = ("gemma3_text",)
    description = "Gemma 3 text decoders (QK-norm, sliding layers with their own RoPE)"
    norm_weight_offset = 1.0

    def check_config(self, config: Any) -> None:
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise self.refuse(config, "attention logit soft-capping")
        super().check_config(config)

    def check_common(self, config: Any) -> None:
        for kind in set(config.layer_types):
            rope = (config.rope_parameters or {}).get(kind) or {}
            if rope.get("rope_type", "default") not in ("default", "linear"):
                raise self.refuse(config, f"RoPE scaling {rope.get('rope_type')!r} on {kind} layers")
        self.check_gemma(config)

    def rope_kind(self, config: Any, layer: int) -> str:
        return config.layer_types[layer]

    def position_embeddings(self, rotary: Any, x: torch.Tensor, position_ids: torch.Tensor, kind: Any):
        return rotary(x, position_ids, kind)

    def layer_inv_freq(self, config: Any, layer: int) -> torch.Tensor:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

        kind = self.rope_kind(config, layer)
        rope = config.rope_parameters[kind]
        if rope.get("rope_type", "default") == "default":
            return Gemma3RotaryEmbedding.compute_default_rope_parameters(config, "cpu", layer_type=kind)[0].double()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu", layer_type=kind)[0].double()

    def inv_freq(self, config: Any) -> torch.Tensor:
        return self.layer_inv_freq(config, 0)
