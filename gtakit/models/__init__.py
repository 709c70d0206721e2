"""Target architectures (HF-compatible). The files here are flat so they can be copied next to weights."""

from .cache_gtakit import CompressedKVCache, CompressedKVLayer
from .configuration_gtakit import GLAConfig, GTAConfig
from .modeling_gla import GLAAttention, GLAForCausalLM, GLAModel
from .modeling_gta import GTAAttention, GTAForCausalLM, GTAModel

__all__ = [
    "CompressedKVCache",
    "CompressedKVLayer",
    "GLAAttention",
    "GLAConfig",
    "GLAForCausalLM",
    "GLAModel",
    "GTAAttention",
    "GTAConfig",
    "GTAForCausalLM",
    "GTAModel",
]
