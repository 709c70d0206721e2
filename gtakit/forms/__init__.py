"""Target forms, conversion side: one module per form. Adding a form is its model module (`gtakit/models/form_*.py`:
the attention module and its typed spec), its converter module here, and one `register` line pairing the two."""

from __future__ import annotations

from gtakit.errors import GtakitError
from gtakit.models import FORMS as MODEL_FORMS
from gtakit.models import GHLAAttention, GLAAttention, GTAAttention, GtakitAttention

from .base import ConvertedLayer, FormConverter, TensorNames
from .ghla import GHLAConverter
from .gla import GLAConverter
from .gta import GTAConverter
from .linalg import LayerMetric

FORMS: dict[str, FormConverter] = {}  # what --to takes -> its converter
DEFAULT_FORM = "gla"  # what --to is when not given


def register(converter: FormConverter, model_class: type[GtakitAttention]) -> None:
    """Pair a converter with the model class it converts into, checking at import that the two agree: the model
    class is registered on the model side, and every field the converter reports is a field of its spec."""
    if MODEL_FORMS.get(model_class.form) is not model_class:
        raise TypeError(f"{model_class.__name__} is not the model side's {model_class.form!r} form")
    unknown = set(converter.report_fields) - set(model_class.spec_type.field_names())
    if unknown:
        raise TypeError(f"{type(converter).__name__} reports {sorted(unknown)}, not fields of "
                        f"{model_class.spec_type.__name__}")
    converter.model_class = model_class
    FORMS[converter.name] = converter


register(GTAConverter(), GTAAttention)
register(GLAConverter("gla"), GLAAttention)
register(GLAConverter("mla"), GLAAttention)
register(GHLAConverter(), GHLAAttention)
_UNCONVERTED = set(MODEL_FORMS) - {form.model_form for form in FORMS.values()}
if _UNCONVERTED:
    raise TypeError(f"model forms without a converter: {sorted(_UNCONVERTED)}")


def get_form(name: str) -> FormConverter:
    if name not in FORMS:
        raise GtakitError(f"--to must be one of {', '.join(FORMS)}, got {name!r}")
    return FORMS[name]


def form_owning(option: str) -> list[str]:
    """The forms that read `option` (empty when every form does)."""
    return [name for name, form in FORMS.items() if option in form.options]


__all__ = ["DEFAULT_FORM", "FORMS", "ConvertedLayer", "FormConverter", "LayerMetric", "TensorNames", "form_owning",
           "get_form", "register"]
