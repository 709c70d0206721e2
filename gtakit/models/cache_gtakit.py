"""A KV cache that stores only the compressed attention state of GTA / GLA / MLA layers.

Flat file (copied next to converted weights); imports nothing from gtakit.

Per layer the cache holds two tensors, reusing transformers' `DynamicLayer` machinery (concatenation on the
sequence axis, cropping, beam reordering, batch selection):

* `state`: GTA the tied states `[B, G, T, head_dim]`; GLA/MLA the latents `[B, h_c, T, kv_lora_rank]`;
* `rope_key`: the shared, already rotated RoPE key `[B, 1, T, rope_dim]`, stored once for all heads.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class CompressedKVLayer(DynamicLayer):
    """One layer of the compressed cache: `keys` slot = per-group state, `values` slot = shared RoPE key."""

    @property
    def state(self) -> torch.Tensor | None:
        return self.keys if self.is_initialized else None

    @property
    def rope_key(self) -> torch.Tensor | None:
        return self.values if self.is_initialized else None

    def nbytes(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class CompressedKVCache(Cache):
    """Cache for gtakit models; `generate()` creates one by default.

    `update(state, rope_key, layer_idx)` appends the new tokens' tied/latent state `[B, n, L, w]` and shared
    RoPE key `[B, 1, L, rope_dim]` and returns the whole cached sequence of both.
    """

    def __init__(self, num_hidden_layers: int | None = None, config=None) -> None:
        if num_hidden_layers is None:
            if config is None:
                raise ValueError("CompressedKVCache needs `num_hidden_layers` or a `config`")
            num_hidden_layers = config.num_hidden_layers
        super().__init__(layers=[CompressedKVLayer() for _ in range(num_hidden_layers)])

    def nbytes(self) -> int:
        """Bytes held by the cached tensors (all layers)."""
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> float:
        """Measured bytes per cached token summed over layers (batch rows counted as tokens)."""
        first = self.layers[0]
        if not first.is_initialized or first.keys is None or first.keys.numel() == 0:
            return 0.0
        batch, seq = first.keys.shape[0], first.keys.shape[-2]
        return self.nbytes() / (batch * seq)

    def elements_per_token(self) -> float:
        """Measured elements per cached token summed over layers."""
        first = self.layers[0]
        if not first.is_initialized or first.keys is None or first.keys.numel() == 0:
            return 0.0
        batch, seq = first.keys.shape[0], first.keys.shape[-2]
        total = sum(layer.keys.numel() + layer.values.numel() for layer in self.layers if layer.is_initialized)
        return total / (batch * seq)
