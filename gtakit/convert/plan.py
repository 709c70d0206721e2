"""What a conversion will build: per layer, its form and widths (from the options, the --layer overrides and the
family's shapes), and the target config that results."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from gtakit.errors import GtakitError
from gtakit.families import FamilyAdapter, SourceShape
from gtakit.forms import FormConverter, form_owning, get_form
from gtakit.forms.gla import DEFAULT_GRID, GRIDS
from gtakit.forms.qk_norm import KEY_SCALE_MODES, qk_norm_spec
from gtakit.io.source import SourceModel
from gtakit.models import SOURCE_FORM, GtakitConfig, layer_cache_elements

from .options import ConvertOptions, flag_of, layer_options, parse_layer_overrides


@dataclass
class LayerPlan:
    form: FormConverter | None  # None: the layer keeps the source's attention
    spec: dict  # the model-side spec (config.gtakit_layers entry)
    options: ConvertOptions  # the options in force for this layer

    @property
    def name(self) -> str:
        return self.form.name if self.form is not None else SOURCE_FORM


@dataclass
class ConversionPlan:
    family: FamilyAdapter
    shape: SourceShape
    layers: list[LayerPlan]
    source_config: Any
    allocation: dict | None = None  # --allocate: what was measured (see allocate.py)

    def config(self, **kwargs: Any) -> GtakitConfig:
        return GtakitConfig.from_source(self.source_config, [layer.spec for layer in self.layers],
                                        gtakit_layers_path=self.family.layers_prefix,
                                        gtakit_attention_name=self.family.attention_name, **kwargs)

    @property
    def source_elements_per_token(self) -> int:
        return self.shape.cache_elements * self.shape.num_layers

    @property
    def layer_elements(self) -> list[int]:
        return [layer_cache_elements(layer.spec, self.source_config) for layer in self.layers]

    @property
    def target_elements_per_token(self) -> int:
        return sum(self.layer_elements)

    def layers_title(self) -> str:
        """The card's name of what the layers became."""
        titles = list(dict.fromkeys(layer.form.title for layer in self.layers if layer.form is not None))
        kept = sum(layer.form is None for layer in self.layers)
        return " + ".join(titles) + (f" ({kept} of {len(self.layers)} layers kept as they were)" if kept else "")

    def layer_shape(self, index: int) -> SourceShape:
        """The source shape as layer `index` sees it (without RoPE where the family's layer has none)."""
        rope = self.family.layer_has_rope(self.source_config, index)
        return self.shape if rope else replace(self.shape, rope_free=True)

    @property
    def targets(self) -> list[str]:
        return sorted({layer.name for layer in self.layers})


def check_form_options(options: ConvertOptions, target: str, where: str = "") -> None:
    """Refuse options of another form in one line (they would be silently ignored)."""
    foreign = []
    defaults = ConvertOptions()
    for f in fields(ConvertOptions):
        owners = form_owning(f.name)
        if owners and target not in owners and getattr(options, f.name) != getattr(defaults, f.name):
            foreign.append((flag_of(f.name), owners))
    if foreign:
        flags = ", ".join(flag for flag, _ in foreign)
        owners = "; ".join(f"{flag}: {'/'.join(names)} only" for flag, names in foreign)
        verb = "does" if len(foreign) == 1 else "do"
        raise GtakitError(f"{flags} {verb} not apply to --to {target}{where} ({owners})")


def plan_conversion(source: SourceModel, family: FamilyAdapter, options: ConvertOptions,
                    constraints: frozenset[str] = frozenset(), format_name: str = "gtakit",
                    hint: str = "choose another form or format") -> ConversionPlan:
    """Per-layer forms and widths. `constraints` are what the output format requires (`Sink.constraints`);
    every layer's form must honour them (`hint`: what to do when one does not)."""
    get_form(options.target)
    check_form_options(options, options.target)
    options = replace(options, rope_grid=_rope_grid(options.rope_grid, constraints, format_name))
    shape = family.shape(source.config, source.weights)
    overrides = parse_layer_overrides(options.layers, shape.num_layers)
    plan = ConversionPlan(family, shape, [], source.config)
    layers = plan.layers
    for index in range(shape.num_layers):
        layers.append(plan_layer(plan.layer_shape(index), options, overrides.get(index, {}), index))
    for index, layer in enumerate(layers):
        missing = sorted(constraints - (layer.form.honours if layer.form is not None else frozenset()))
        if missing:
            what = f"--to {layer.name}" if layer.form is not None else "a layer kept in source form"
            raise GtakitError(f"the {format_name} format needs {', '.join(missing)}, which {what} (layer {index}) "
                              f"cannot provide; {hint}")
    if all(layer.form is None for layer in layers):
        raise GtakitError("every layer is kept in source form (--layer ...:source); nothing would be converted")
    return plan


def _rope_grid(grid: str, constraints: frozenset[str], format_name: str) -> str:
    """`auto` made concrete: the measured default where the format needs one global RoPE table, else none."""
    if grid == "auto":
        return DEFAULT_GRID if "global-rope-grid" in constraints else "none"
    if grid == "none" and "global-rope-grid" in constraints:
        raise GtakitError(f"the {format_name} format needs one global RoPE table: use --rope-grid "
                          f"{' or '.join(g for g in GRIDS if g != 'none')}, not none")
    return grid


def plan_layer(shape: SourceShape, options: ConvertOptions, override: dict, index: int) -> LayerPlan:
    """One layer's plan: `options` with the `--layer` settings `override` applied."""
    target = override.get("target", options.target)
    if target == SOURCE_FORM:
        return LayerPlan(None, {"form": SOURCE_FORM}, options)
    form = get_form(target)
    if override:
        check_form_options(ConvertOptions(**{k: v for k, v in override.items() if k != "target"}), target,
                           f" (--layer {index})")
    effective = layer_options(options, override)
    if shape.rope_free and not form.takes_rope_free:
        raise GtakitError(f"--to {target} cannot convert layers without RoPE (layer {index}); use --to gta, gla "
                          f"or mla, or keep it with --layer {index}:source")
    if shape.qk_norm_scope is None and effective.key_norm != ConvertOptions.key_norm:
        where = f" (--layer {index})" if "key_norm" in override else ""
        raise GtakitError(f"--key-norm{where} applies to sources with QK-norm (Qwen3, Gemma 3, OLMo-2); this model "
                          "has none: drop it")
    effective = _defaults_for_default_values(form, shape, effective)
    spec = form.plan(shape, effective)
    if shape.qk_norm_scope is not None:
        if not form.takes_qk_norm:
            raise GtakitError(f"--to {target} cannot convert QK-norm sources yet; use --to gta, gla or mla")
        if effective.key_norm not in KEY_SCALE_MODES:  # noqa: SIM102
            raise GtakitError(f"--key-norm must be one of {', '.join(KEY_SCALE_MODES)}, got {effective.key_norm!r}")
        spec["qk_norm"] = qk_norm_spec(shape.qk_norm_scope, shape.qk_norm_eps, effective.key_norm)
    return LayerPlan(form, spec, effective)


# A width option and the spec entry it sets (the first one the form's spec has).
_SPEC_KEYS = {"kv_rank": ("kv_lora_rank",), "rope_dim": ("qk_rope_head_dim", "rope_dim", "head_dim"),
              "groups": ("num_key_value_heads",), "latent_heads": ("num_latent_heads",), "maps": ("num_maps",),
              "key_heads": ("num_key_heads",), "latent_dim": ("latent_dim",)}


def _defaults_for_default_values(form: FormConverter, shape: SourceShape, options: ConvertOptions) -> ConvertOptions:
    """An explicit width equal to the one the default plans is the default: `--kv-rank 42` where 42 is the default
    plans what no option plans (a form's other defaults depend on whether a width was given)."""
    for name, keys in _SPEC_KEYS.items():
        value = getattr(options, name)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or name not in form.options + ("rope_dim",):
            continue
        try:
            default = form.plan(shape, replace(options, **{name: None}))
        except GtakitError:
            continue
        key = next((k for k in keys if k in default), None)
        if key is not None and default[key] == value:
            options = replace(options, **{name: None})
    return options


__all__ = ["ConversionPlan", "LayerPlan", "check_form_options", "plan_conversion", "plan_layer"]
