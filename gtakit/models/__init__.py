"""Target models (HF-compatible). The files here are flat so they can be copied next to weights."""

# configuration first: it refuses an unsupported transformers before anything else can fail on one.
from .configuration_gtakit import SOURCE_FORM, GtakitConfig  # noqa: I001
from .cache_gtakit import CACHE_FIELD, CompressedKVCache, CompressedKVLayer, output_cache
from .attention_gtakit import GtakitAttention
from .form_ghla import GHLAAttention, GHLASpec
from .form_gla import GLAAttention, GLASpec
from .form_gta import GTAAttention, GTASpec
from .spec_gtakit import LayerSpec
from .modeling_gtakit import FORMS, GtakitForCausalLM, attention_class, layer_cache_elements

__all__ = [
    "CACHE_FIELD",
    "FORMS",
    "SOURCE_FORM",
    "CompressedKVCache",
    "CompressedKVLayer",
    "GHLAAttention",
    "GHLASpec",
    "GLAAttention",
    "GLASpec",
    "GTAAttention",
    "GTASpec",
    "GtakitAttention",
    "GtakitConfig",
    "LayerSpec",
    "GtakitForCausalLM",
    "attention_class",
    "layer_cache_elements",
    "output_cache",
]
