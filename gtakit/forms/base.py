"""The conversion side of a target form: planning one layer's widths and converting one source layer.

A form module (`gta.py`, `gla.py`, `ghla.py`) subclasses `FormConverter`, and `forms/__init__.py` registers it
under the name `--to` takes, paired with its model class (`gtakit/models/form_*.py`). The pair shares one typed
spec (the model class's `spec_type`: the converter plans a layer by building it), and the converter names the
tensors it writes after the attributes of the model class's module built on the meta device (`TensorNames`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gtakit.errors import GtakitError
from gtakit.families.base import SourceAttention, SourceShape
from gtakit.models import GtakitAttention, LayerSpec
from gtakit.models.spec_gtakit import divisors  # noqa: F401 - the form modules take it from here

from .linalg import LayerMetric


@dataclass
class ConvertedLayer:
    tensors: dict[str, torch.Tensor]  # attention tensors, names relative to the attention module
    metrics: dict[str, float] = field(default_factory=dict)
    spec_updates: dict[str, Any] = field(default_factory=dict)  # e.g. the RoPE frequencies kept ("rope_index")
    # [r, G*d]: the shared RoPE key as a map of the source's keys (k_rope_proj = map @ wk), for QK-norm sources
    rope_key_map: torch.Tensor | None = None


class TensorNames:
    """The tensor names of a form's module, read from an instance on the meta device: `names.q_proj.weight` is
    "q_proj.weight" where the module has that tensor and an AttributeError where it has not, so a converter cannot
    write a tensor the model does not load."""

    def __init__(self, module: nn.Module, prefix: str = "") -> None:
        self._module, self._prefix = module, prefix

    def __getattr__(self, attribute: str):
        child = getattr(self._module, attribute, None)
        if child is None:
            raise AttributeError(f"{type(self._module).__name__} has no tensor or module "
                                 f"{self._prefix + attribute!r}")
        if isinstance(child, torch.Tensor):
            return self._prefix + attribute
        return TensorNames(child, f"{self._prefix}{attribute}.")


def check_tensors(tensors: dict[str, torch.Tensor], module: nn.Module) -> None:
    """The converted tensors are exactly the module's, shape for shape (a converter bug otherwise)."""
    expected = {name: tuple(t.shape) for name, t in module.state_dict(keep_vars=True).items()}
    given = {name: tuple(t.shape) for name, t in tensors.items()}
    if given != expected:
        missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        shapes = sorted(f"{n} {given[n]} != {expected[n]}" for n in set(given) & set(expected)
                        if given[n] != expected[n])
        raise RuntimeError(f"{type(module).__name__}: converted tensors disagree with the model's: missing "
                           f"{missing}, unexpected {extra}, shapes {shapes}")


class FormConverter:
    name = ""  # what --to takes
    model_class: type[GtakitAttention] = GtakitAttention  # set when registered (`forms.register`)
    title = ""  # one line for the model card
    options: tuple[str, ...] = ()  # ConvertOptions fields only this form reads
    report_fields: tuple[str, ...] = ()  # spec fields worth a line in conversion.json and the card
    honours: frozenset[str] = frozenset()  # output-format constraints (`Sink.constraints`) this form can meet
    takes_qk_norm = False  # converts QK-norm sources (see `qk_norm.py`)
    takes_rope_free = False  # converts layers without RoPE (a zero-width RoPE key)

    @property
    def model_form(self) -> str:
        """The model-side form (`gtakit.models.FORMS`)."""
        return self.model_class.form

    @property
    def spec_type(self) -> type[LayerSpec]:
        return self.model_class.spec_type

    def plan(self, shape: SourceShape, options: Any) -> dict:
        """The model-side spec of one layer (without `rope_index`, which conversion chooses)."""
        raise NotImplementedError

    def convert_layer(self, attn: SourceAttention, spec: dict, metric: LayerMetric, stats: Any,
                      options: Any, names: TensorNames) -> ConvertedLayer:
        """The layer's tensors, named by `names` (the model module's, see `meta_module`)."""
        raise NotImplementedError

    def meta_module(self, config: Any, spec: dict) -> GtakitAttention:
        """The model's module for one layer of `spec`, on the meta device (no memory): its tensor names and shapes
        are what a conversion must write."""
        with torch.device("meta"):
            return self.model_class(config, spec, layer_idx=0)

    def query_nope_width(self, spec: dict) -> int:
        """Leading query dims per head that score the position-free key (the part a cached key scale multiplies)."""
        raise NotImplementedError

    def width_candidates(self, shape: SourceShape, spec: dict) -> list[dict[str, Any]]:
        """`--layer` settings that make a layer planned as `spec` narrower or wider, for per-layer budget allocation
        (settings a layer cannot take are dropped when planned); none: the form's widths are not allocated."""
        return []

    def summary(self, spec: dict) -> str:
        return ", ".join(f"{name}={spec[name]}" for name in self.report_fields)

    def make_spec(self, shape: SourceShape, **widths: Any) -> dict:
        """The spec of one layer: the form's typed spec built from the fields every form takes from the source and
        the form's `widths` (a field the spec does not have is a TypeError), as the config stores it."""
        scale = shape.attention_scale if shape.attention_scale is not None else shape.head_dim**-0.5
        softcap = float(shape.attention_softcap) if shape.attention_softcap is not None else None
        return self.spec_type(attention_bias=shape.has_qk_bias, o_proj_bias=shape.has_o_bias, softmax_scale=scale,
                              softcap=softcap, **widths).to_dict()


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


def check_rope_dim(rope_dim: int, maximum: int) -> None:
    if rope_dim % 2:
        raise GtakitError(f"--rope-dim {rope_dim} must be even (RoPE rotates pairs of dimensions)")
    if not 2 <= rope_dim <= maximum:
        raise GtakitError(f"--rope-dim {rope_dim} is out of range: it must be between 2 and {maximum}")
