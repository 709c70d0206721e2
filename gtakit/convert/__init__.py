"""Conversion of MHA/GQA checkpoints into GTA, GLA and MLA form."""

from .methods import INIT_METHODS, get_init_method
from .pipeline import convert
from .plan import ConvertOptions

__all__ = ["INIT_METHODS", "ConvertOptions", "convert", "get_init_method"]
