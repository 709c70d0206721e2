"""Source families: one adapter per family; adding a family is one module and one entry in `ADAPTERS`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gtakit.errors import GtakitError
from gtakit.io.source import WeightReader

from .base import FamilyAdapter, SourceAttention, SourceShape
from .llama import LlamaFamily, Phi3Family, SmolLM3Family
from .moe import MoEFamily, QKNormMoEFamily
from .gemma import Gemma2Family, Gemma3Family
from .gpt2 import GPT2Family
from .gpt_neox import GPTNeoXFamily
from .qk_norm import Olmo2Family, QKNormFamily

ADAPTERS: tuple[FamilyAdapter, ...] = (LlamaFamily(), Phi3Family(), SmolLM3Family(), MoEFamily(), QKNormFamily(), QKNormMoEFamily(), Gemma2Family(), Gemma3Family(), GPTNeoXFamily(), GPT2Family(),
                                      Olmo2Family())
BY_MODEL_TYPE = {model_type: adapter for adapter in ADAPTERS for model_type in adapter.model_types}
SUPPORTED_MODEL_TYPES = tuple(BY_MODEL_TYPE)


def family_of(config_or_model_type: Any) -> FamilyAdapter:
    """The adapter of a source config (or model_type), or a one-line refusal naming what is supported."""
    model_type = config_or_model_type if isinstance(config_or_model_type, str) or config_or_model_type is None \
        else getattr(config_or_model_type, "model_type", None)
    if model_type not in BY_MODEL_TYPE:
        raise GtakitError(f"model_type {model_type!r}: unsupported architecture; gtakit converts "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)} decoders")
    return BY_MODEL_TYPE[model_type]


class FamilyChecks:
    """`gtakit.io.source.SourceChecks` that dispatch to the family adapters (what `open_source` refuses)."""

    def check_raw(self, raw: dict, path: Path) -> None:
        family_of(raw.get("model_type")).check_raw(raw, path)

    def check_config(self, config: Any) -> None:
        family_of(config).check_config(config)

    def check_weights(self, config: Any, reader: WeightReader, folder: Path) -> None:
        family_of(config).check_weights(config, reader, folder)


__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "FamilyAdapter", "FamilyChecks", "SourceAttention", "SourceShape",
           "family_of"]
