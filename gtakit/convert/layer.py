"""One source layer's attention through its form converter (QK norms folded in and completed)."""

from __future__ import annotations

from dataclasses import replace

from gtakit.errors import GtakitError
from gtakit.families import FamilyAdapter
from gtakit.forms import qk_norm
from gtakit.forms.base import ConvertedLayer, TensorNames, check_tensors
from gtakit.io.source import SourceModel

from .plan import LayerPlan


def convert_attention(family: FamilyAdapter, source: SourceModel, index: int, layer: LayerPlan, method,
                      stats) -> ConvertedLayer:
    """The converted tensors of layer `index` as `layer` plans them; `layer.spec` is left as it was (the caller
    applies `spec_updates`)."""
    source_attn = attn = family.read_attention(source.weights, source.config, index)
    norm = layer.spec.get("qk_norm")
    key_scale_mean = getattr(stats, "key_scale_mean", None)
    if norm is not None:  # the converters see the norms folded in; `complete` makes the query (and keys) exact
        if norm["key_scale"] == "mean" and key_scale_mean is None:
            raise GtakitError("--key-norm mean folds the calibrated mean key scale: pass --calib FILE")
        attn = qk_norm.folded(source_attn, getattr(stats, "query_scale_mean", None), key_scale_mean)
    metric = method.build_metric(attn, stats)
    target = layer.form.meta_module(source.config, layer.spec)
    names = TensorNames(target)
    converted = layer.form.convert_layer(attn, layer.spec, metric, stats, _layer_options(family, source, index, layer),
                                         names)
    if norm is not None:
        converted = qk_norm.complete(converted, source_attn, attn, norm["key_scale"],
                                     layer.form.query_nope_width(layer.spec), key_scale_mean, names)
    check_tensors(converted.tensors, target)
    return converted


def _layer_options(family: FamilyAdapter, source: SourceModel, index: int, layer: LayerPlan):
    """A sliding-window layer never looks farther than its window; where calibration covered it, the measured mean
    rotation holds at every distance the layer sees, so its RoPE ranking trusts that rotation fully."""
    window = family.sliding_window(source.config, index)
    options = layer.options
    if window is not None and window <= options.calib_seq_len:
        return replace(options, rope_rotation_credit=1.0)
    return options


__all__ = ["convert_attention"]
