"""Cache helpers of the gtakit models: the compressed attention state lives in transformers' dynamic cache layers.

Flat file (copied next to converted weights); imports nothing from gtakit.

Per layer the cache holds two tensors in the two slots of a transformers `DynamicLayer` (concatenation on the
sequence axis, cropping, beam reordering, batch selection need nothing else), so the models write into any dynamic
cache, including the `DynamicCache` that `generate()` builds, without overriding generate's private hooks:

* `state`: GTA the tied states `[B, G, T, head_dim]`; GLA/MLA the latents `[B, h_c, T, kv_lora_rank]`;
* `rope_key`: the shared, already rotated RoPE key `[B, 1, T, rope_dim]`, stored once for all heads.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.24 renamed the cache argument of forward() and the output field from `past_key_values` to `cache`
# (the old names warn, and are ignored when both are set). The models take either name and return the field under
# the name the installed release declares.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(outputs) -> Cache | None:
    """The cache a model output carries, whatever the installed transformers calls the field."""
    return getattr(outputs, CACHE_FIELD)


def pick_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The one cache passed under either name; two different ones are a caller error."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def is_compressed_cache_layer(layer) -> bool:
    """Dynamic layers append along the sequence axis, so they hold compressed tensors of any width; a sliding-window
    layer (the family's sliding-attention layers) also keeps only the last window of them, which is all its mask
    lets a query see."""
    return type(layer) in (DynamicLayer, DynamicSlidingWindowLayer, CompressedKVLayer)


# In-place appends: a layer's tensors live at the front of a buffer with room for more tokens, so a decode step
# writes its token instead of copying the whole cache (a dynamic layer concatenates, which reads and writes every
# cached byte at every step: on a CPU that copy was a third of a GTA decode step at 8192 tokens). The buffer grows
# by an eighth of the cache, at least this many tokens, when full.
GROWTH_TOKENS = 256


def append(cache: Cache, layer_idx: int, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache.update(first, second, layer_idx)`, appending in place where the layer is a plain dynamic layer that
    already holds tokens. Anything else (the first tokens, sliding-window or offloaded layers, tensors that need
    gradients) goes through `cache.update`."""
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
    if (layer is None or type(layer) not in (DynamicLayer, CompressedKVLayer) or not layer.is_initialized
            or getattr(cache, "offloading", False)
            or (torch.is_grad_enabled() and (first.requires_grad or second.requires_grad))):
        return cache.update(first, second, layer_idx)
    length, new = layer.keys.shape[-2], first.shape[-2]
    buffers = _live_buffers(layer, first, second)
    if buffers is None or buffers[0].shape[-2] < length + new:
        capacity = length + new + max(GROWTH_TOKENS, (length + new) // 8)
        buffers = tuple(_with_capacity(tensor, capacity) for tensor in (layer.keys, layer.values))
        layer.gtakit_buffers = buffers
    for buffer, tensor in zip(buffers, (first, second)):
        buffer[..., length : length + new, :].copy_(tensor)
    layer.keys, layer.values = (buffer[..., : length + new, :] for buffer in buffers)
    return layer.keys, layer.values


def _live_buffers(layer, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layer's buffers if its tensors are still their front views (cropping keeps them; reordering or
    selecting batch rows replaces the tensors, and then the buffers are stale)."""
    buffers = getattr(layer, "gtakit_buffers", None)
    if buffers is None:
        return None
    for buffer, held, tensor in zip(buffers, (layer.keys, layer.values), (first, second)):
        if (held.data_ptr() != buffer.data_ptr() or held.stride() != buffer.stride()
                or held.shape[:-2] != buffer.shape[:-2] or held.shape[-1] != tensor.shape[-1]
                or held.dtype != tensor.dtype or held.device != tensor.device):
            return None
    return buffers


def _with_capacity(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
    buffer = tensor.new_empty(*tensor.shape[:-2], capacity, tensor.shape[-1])
    buffer[..., : tensor.shape[-2], :].copy_(tensor)
    return buffer


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


class CompressedKVCache(DynamicCache):
    """A `DynamicCache` with size measurements. The models write into any dynamic cache (the family model and
    `generate()` create a plain `DynamicCache`); pass this one to measure what the cache holds.

    `update(state, rope_key, layer_idx)` appends the new tokens' tied/latent state `[B, n, L, w]` and shared
    RoPE key `[B, 1, L, rope_dim]` and returns the whole cached sequence of both.
    """

    def __init__(self, num_hidden_layers: int | None = None, config=None) -> None:
        if num_hidden_layers is None:
            if config is None:
                raise ValueError("CompressedKVCache needs `num_hidden_layers` or a `config`")
            num_hidden_layers = config.num_hidden_layers
        # Cache.__init__ directly: DynamicCache's own would derive layer types (sliding windows) from a config.
        Cache.__init__(self, layers=[CompressedKVLayer() for _ in range(num_hidden_layers)])

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
