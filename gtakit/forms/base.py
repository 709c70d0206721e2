"""The conversion side of a target form: planning one layer's widths and converting one source layer.

A form module (`gta.py`, `gla.py`, `ghla.py`) subclasses `FormConverter`, and `forms/__init__.py` registers it
under the name `--to` takes; the model side of the form is `gtakit/models/form_<model_form>.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gtakit.errors import GtakitError
from gtakit.families.base import SourceAttention, SourceShape

from .linalg import LayerMetric


@dataclass
class ConvertedLayer:
    tensors: dict[str, torch.Tensor]  # attention tensors, names relative to the attention module
    metrics: dict[str, float] = field(default_factory=dict)
    spec_updates: dict[str, Any] = field(default_factory=dict)  # e.g. the RoPE frequencies kept ("rope_index")
    # [r, G*d]: the shared RoPE key as a map of the source's keys (k_rope_proj = map @ wk), for QK-norm sources
    rope_key_map: torch.Tensor | None = None


class FormConverter:
    name = ""  # what --to takes
    model_form = ""  # the model-side form (gtakit.models.FORMS)
    title = ""  # one line for the model card
    options: tuple[str, ...] = ()  # ConvertOptions fields only this form reads
    report_fields: tuple[str, ...] = ()  # spec fields worth a line in conversion.json and the card
    honours: frozenset[str] = frozenset()  # output-format constraints (`Sink.constraints`) this form can meet
    takes_qk_norm = False  # converts QK-norm sources (see `qk_norm.py`)
    takes_rope_free = False  # converts layers without RoPE (a zero-width RoPE key)

    def plan(self, shape: SourceShape, options: Any) -> dict:
        """The model-side spec of one layer (without `rope_index`, which conversion chooses)."""
        raise NotImplementedError

    def convert_layer(self, attn: SourceAttention, spec: dict, metric: LayerMetric, stats: Any,
                      options: Any) -> ConvertedLayer:
        raise NotImplementedError

    def query_nope_width(self, spec: dict) -> int:
        """Leading query dims per head that score the position-free key (the part a cached key scale multiplies)."""
        raise NotImplementedError

    def width_candidates(self, shape: SourceShape, spec: dict) -> list[dict[str, Any]]:
        """`--layer` settings that make a layer planned as `spec` narrower or wider, for per-layer budget allocation
        (settings a layer cannot take are dropped when planned); none: the form's widths are not allocated."""
        return []

    def summary(self, spec: dict) -> str:
        return ", ".join(f"{name}={spec[name]}" for name in self.report_fields)

    def common_spec(self, shape: SourceShape) -> dict:
        scale = shape.attention_scale if shape.attention_scale is not None else shape.head_dim**-0.5
        spec = {"form": self.model_form, "attention_bias": shape.has_qk_bias, "o_proj_bias": shape.has_o_bias,
                "softmax_scale": scale}
        if shape.attention_softcap is not None:
            spec["softcap"] = float(shape.attention_softcap)
        return spec


def as_width(value: Any, option: str) -> int | str | None:
    """An option that takes an integer or 'full'."""
    if value is None or value == "full":
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise GtakitError(f"--{option} must be an integer or 'full', got {value!r}") from None


WIDTH_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # widths per-layer budget allocation tries, times the uniform one


def scaled_widths(width: int) -> list[int]:
    """`width` itself and `width` times each of `WIDTH_SCALES`, those in multiples of 8 from 16 on (kernels and
    GEMMs like them; so a width off that grid also appears rounded onto it)."""
    widths = {width}
    for scale in WIDTH_SCALES:
        value = max(1, round(width * scale))
        widths.add(max(8, round(value / 8) * 8) if value >= 16 else value)
    return sorted(widths)


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_rope_dim(rope_dim: int, maximum: int) -> None:
    if rope_dim % 2:
        raise GtakitError(f"--rope-dim {rope_dim} must be even (RoPE rotates pairs of dimensions)")
    if not 2 <= rope_dim <= maximum:
        raise GtakitError(f"--rope-dim {rope_dim} is out of range: it must be between 2 and {maximum}")
