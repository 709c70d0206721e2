"""Target architectures (HF-compatible). The files here are flat so they can be copied next to weights."""

# configuration first: it refuses an unsupported transformers before anything else can fail on one.
from .configuration_gtakit import GHLAConfig, GLAConfig, GTAConfig  # noqa: I001
from .cache_gtakit import CACHE_FIELD, CompressedKVCache, CompressedKVLayer, output_cache
from .modeling_ghla import GHLAAttention, GHLAForCausalLM, GHLAModel
from .modeling_gla import GLAAttention, GLAForCausalLM, GLAModel
from .modeling_gta import GTAAttention, GTAForCausalLM, GTAModel

__all__ = [
    "CACHE_FIELD",
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
    "output_cache",
]
