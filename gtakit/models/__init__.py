"""Target architectures (HF-compatible). The files here are flat so they can be copied next to weights."""

from .cache_gtakit import CompressedKVCache, CompressedKVLayer
from .configuration_gtakit import GHLAConfig, GLAConfig, GTAConfig
from .modeling_ghla import GHLAAttention, GHLAForCausalLM, GHLAModel
from .modeling_gla import GLAAttention, GLAForCausalLM, GLAModel
from .modeling_gta import GTAAttention, GTAForCausalLM, GTAModel

__all__ = [
    "CompressedKVCache",
    "CompressedKVLayer",
    "GHLAAttention",
    "GHLAConfig",
    "GHLAForCausalLM",
    "GHLAModel",
    "GLAAttention",
    "GLAConfig",
    "GLAForCausalLM",
    "GLAModel",
    "GTAAttention",
    "GTAConfig",
    "GTAForCausalLM",
    "GTAModel",
]
