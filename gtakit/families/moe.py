"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE): attention as their dense relatives, MLPs untouched.

Their checkpoints store one tensor per expert (`experts.3.w1.weight`), while transformers 5 holds the experts of a
layer fused (`mlp.experts.gate_up_proj` `[E, 2 * inner, D]`: gate rows then up rows; `mlp.experts.down_proj`
`[E, D, inner]`) and converts at load time for the family's own model_type only. A converted folder is loaded as
model_type `gtakit`, so the weights are written in the fused layout: this per-family map assembles them (lazily,
one layer at a time) and renames Mixtral's `block_sparse_moe` to `mlp`. Checkpoints already fused pass as they are.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import torch

from gtakit.io.source import WeightReader

from .llama import LlamaFamily
from .qk_norm import QKNormFamily

# model_type -> (checkpoint module of the MLP, names of the gate, up and down projections of one expert)
EXPERT_LAYOUTS = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}
FUSED = ("gate_up_proj", "down_proj")


class FusedExperts:
    """Mixin for a `FamilyAdapter`: per-expert checkpoint tensors in, transformers' fused expert tensors out."""

    layers_prefix: str

    def mlp_shapes(self, config: Any, mlp: str, inner: int) -> dict[str, tuple[int, ...]]:
        return {}  # expert layouts vary (and transformers checks them when loading)

    def _layout(self, config: Any) -> tuple[str, str, str, str]:
        return EXPERT_LAYOUTS[config.model_type]

    def _expert_pattern(self, module: str) -> re.Pattern:
        return re.compile(rf"^{re.escape(self.layers_prefix)}\.(\d+)\.{module}\.experts\.(\d+)\.(\w+)\.weight$")

    def passthrough(self, weights: WeightReader, config: Any,
                    kept_layers: frozenset[int] = frozenset()) -> Iterator[tuple[str, int | None]]:
        module = self._layout(config)[0]
        experts = self._expert_pattern(module)
        fused_layers: set[int] = set()
        for name, layer in super().passthrough(weights, config, kept_layers):
            if experts.match(name):
                if layer not in fused_layers:
                    fused_layers.add(layer)
                    for fused in FUSED:
                        yield f"{self.layers_prefix}.{layer}.mlp.experts.{fused}", layer
                continue
            yield name.replace(f".{module}.", ".mlp.", 1) if layer is not None else name, layer

    def read(self, weights: WeightReader, config: Any, name: str) -> torch.Tensor:
        if weights.has(name):
            return weights.get(name)
        module, gate, up, down = self._layout(config)
        match = re.match(rf"^({re.escape(self.layers_prefix)}\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
        if match is None:  # renamed (block_sparse_moe.gate -> mlp.gate)
            return weights.get(name.replace(".mlp.", f".{module}.", 1))
        prefix = f"{match.group(1)}.{module}.experts."
        count = getattr(config, "num_local_experts", None) or config.num_experts
        if match.group(2) == "down_proj":
            return torch.stack([weights.get(f"{prefix}{e}.{down}.weight") for e in range(count)])
        return torch.stack([torch.cat((weights.get(f"{prefix}{e}.{gate}.weight"),
                                       weights.get(f"{prefix}{e}.{up}.weight"))) for e in range(count)])


class MoEFamily(FusedExperts, LlamaFamily):
    model_types = ("mixtral", "qwen2_moe")
    description = "Mixtral and Qwen2-MoE decoders (experts passed through)"


class QKNormMoEFamily(FusedExperts, QKNormFamily):
    model_types = ("qwen3_moe",)
    description = "Qwen3-MoE decoders (per-head QK-norm; experts passed through)"
