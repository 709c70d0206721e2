"""Conversion of MHA/GQA checkpoints into GTA, GLA, MLA and GHLA form: plan, calibrate, stream into a sink."""

from .methods import INIT_METHODS, get_init_method
from .options import ConvertOptions
from .pipeline import convert, convert_in_memory, open_convertible

__all__ = ["INIT_METHODS", "ConvertOptions", "convert", "convert_in_memory", "get_init_method", "open_convertible"]
