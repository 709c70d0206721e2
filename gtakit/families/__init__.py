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
    if model_type == "gtakit":
        raise GtakitError("this model is already a gtakit conversion (model_type 'gtakit'); convert its source "
                          "model (conversion.json names it), or uptrain it with gtakit finetune")
    if model_type not in BY_MODEL_TYPE:
        raise GtakitError(f"model_type {model_type!r}: unsupported architecture; gtakit converts "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)} decoders")
    return BY_MODEL_TYPE[model_type]


def check_positions(config: Any, length: int, option: str, log=None) -> int:
    """A sequence length against the positions the model was trained for (max_position_embeddings). Past them,
    learned position embeddings (GPT-2) have no entry: refused in one line. RoPE models extrapolate: a warning
    line. Returns `length`."""
    limit = getattr(config, "max_position_embeddings", None)
    if not limit or length <= limit:
        return length
    # a gtakit model: its source family
    model_type = getattr(config, "source_model_type", None) or getattr(config, "model_type", None)
    family = BY_MODEL_TYPE.get(model_type)
    if family is not None and family.learned_positions:
        raise GtakitError(f"{option} {length} exceeds the model's {limit} learned positions; use {option} {limit} or "
                          "less")
    if log is not None:
        log(f"warning: {option} {length} runs past the model's {limit} positions (max_position_embeddings); "
            "results there measure extrapolation")
    return length


class FamilyChecks:
    """`gtakit.io.source.SourceChecks` that dispatch to the family adapters (what `open_source` refuses)."""

    def check_raw(self, raw: dict, path: Path) -> None:
        family_of(raw.get("model_type")).check_raw(raw, path)

    def check_config(self, config: Any) -> None:
        family_of(config).check_config(config)

    def check_weights(self, config: Any, reader: WeightReader, folder: Path) -> None:
        family_of(config).check_weights(config, reader, folder)


__all__ = ["ADAPTERS", "check_positions", "SUPPORTED_MODEL_TYPES", "FamilyAdapter", "FamilyChecks", "SourceAttention", "SourceShape",
           "family_of"]
