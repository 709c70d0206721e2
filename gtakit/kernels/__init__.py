"""Triton decode kernels for GTA and GLA/MLA over the compressed KV cache, with PyTorch references.

Importing this package imports triton and builds the kernels; set `TRITON_INTERPRET=1` *before* the first import
to run them on CPU tensors through Triton's interpreter (slow; tests only). The model files import this package
lazily and guarded (`decode_kernels()` in `attention_gtakit.py`), so converted checkpoints still load where
triton or gtakit is missing and then use the PyTorch path.
"""

from ._decode_core import MAX_QUERY_LEN, SUPPORTED_DTYPES, DecodeConfig, choose_config, kernels_interpreted
from .gla_decode import gla_decode, naive_gla_decode
from .gta_decode import gta_decode, naive_gta_decode
from .paging import DEFAULT_PAGE_SIZE, gather_pages, to_paged

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_QUERY_LEN",
    "SUPPORTED_DTYPES",
    "DecodeConfig",
    "choose_config",
    "gather_pages",
    "gla_decode",
    "gta_decode",
    "kernels_interpreted",
    "naive_gla_decode",
    "naive_gta_decode",
    "to_paged",
]
