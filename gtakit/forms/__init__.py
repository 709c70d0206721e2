"""Target forms, conversion side: one module per form; adding a form is one module here, one entry in `FORMS`
and its model module (`gtakit/models/form_*.py`)."""

from __future__ import annotations

from gtakit.errors import GtakitError

from .base import ConvertedLayer, FormConverter
from .ghla import GHLAConverter
from .gla import GLAConverter
from .gta import GTAConverter
from .linalg import LayerMetric

FORMS: dict[str, FormConverter] = {
    form.name: form for form in (GTAConverter(), GLAConverter("gla"), GLAConverter("mla"), GHLAConverter())
}
DEFAULT_FORM = "gla"  # what --to is when not given


def get_form(name: str) -> FormConverter:
    if name not in FORMS:
        raise GtakitError(f"--to must be one of {', '.join(FORMS)}, got {name!r}")
    return FORMS[name]


def form_owning(option: str) -> list[str]:
    """The forms that read `option` (empty when every form does)."""
    return [name for name, form in FORMS.items() if option in form.options]


__all__ = ["DEFAULT_FORM", "FORMS", "ConvertedLayer", "FormConverter", "LayerMetric", "form_owning", "get_form"]
