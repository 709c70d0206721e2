"""A converted model: the source family's own transformers model with each layer's attention replaced.

Flat file (copied next to converted weights for `trust_remote_code`); imports nothing from gtakit.

`GtakitForCausalLM` builds the family's `*ForCausalLM` from `config.source_config()` (norms, MLP, embeddings,
rotary tables, masks, generation plumbing and everything the family adds stay transformers' own, under the
source's weight names) and swaps `self_attn` of every layer whose spec is not `source` for the form's module.
Its forward is the family's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache

from .attention_gtakit import ATTENTION_PATHS, GtakitAttention
from .spec_gtakit import source_head_dim
from .cache_gtakit import CACHE_FIELD, pick_cache
from .configuration_gtakit import DECODE_BACKENDS, SOURCE_FORM, GtakitConfig
from .form_ghla import GHLAAttention
from .form_gla import GLAAttention
from .form_gta import GTAAttention

# The form registry of the model side: adding a form is one `form_*.py` module and one entry here.
FORMS: dict[str, type[GtakitAttention]] = {cls.form: cls for cls in (GTAAttention, GLAAttention, GHLAAttention)}


def attention_class(form: str) -> type[GtakitAttention]:
    if form not in FORMS:
        raise ValueError(f"unknown attention form {form!r}; known: {', '.join(FORMS)} (or {SOURCE_FORM!r})")
    return FORMS[form]


def layer_cache_elements(spec: dict, source_config: Any) -> int:
    """Elements one layer of `spec` caches per token (a source-form layer: its keys and values)."""
    if spec["form"] == SOURCE_FORM:
        heads = getattr(source_config, "num_key_value_heads", None) or source_config.num_attention_heads
        return 2 * heads * source_head_dim(source_config)
    return attention_class(spec["form"]).spec_type.from_dict(spec, source_config).cache_elements()


def build_family_model(config: GtakitConfig) -> PreTrainedModel:
    """The family's own causal LM for the source fields of `config`: SDPA attention for the source-form layers,
    or eager where the family has no SDPA path (Gemma 2's soft-capping)."""
    try:
        return AutoModelForCausalLM.from_config(config.source_config(), attn_implementation="sdpa")
    except ValueError:
        return AutoModelForCausalLM.from_config(config.source_config(), attn_implementation="eager")


def replace_attention(layers: nn.ModuleList, config: GtakitConfig, family_config: Any) -> None:
    for index, layer in enumerate(layers):
        spec = config.layer_spec(index)
        if spec["form"] != SOURCE_FORM:
            module = attention_class(spec["form"])(family_config, spec, index, config.decode_backend)
            setattr(layer, config.gtakit_attention_name, module)


class GtakitPreTrainedModel(PreTrainedModel):
    config_class = GtakitConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _skip_keys_device_placement = ["past_key_values", "cache"]


class GtakitForCausalLM(GtakitPreTrainedModel, GenerationMixin):
    def __init__(self, config: GtakitConfig) -> None:
        super().__init__(config)
        family = build_family_model(config)
        # The family's top-level modules become ours, so weights keep the source's names.
        for name, child in family.named_children():
            self.add_module(name, child)
        self._family_class = type(family)
        # The family's tied weights (lm_head to the embedding) and device-map units hold for the converted model.
        self._tied_weights_keys = getattr(family, "_tied_weights_keys", None)
        self._no_split_modules = list(getattr(family, "_no_split_modules", None) or [])
        replace_attention(self.get_submodule(config.gtakit_layers_path), config, family.config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The family's own initialisation (its norms, rotary tables, scaled embeddings) for its modules.
        family_class = getattr(self, "_family_class", None)
        if family_class is not None and not isinstance(module, GtakitAttention):
            family_class._init_weights(self, module)
        else:
            super()._init_weights(module)

    def set_attention_path(self, path: str) -> None:
        """Force the attention path: 'plain' (up-projected, SDPA), 'absorbed' (reads the compressed cache
        directly) or 'auto' (absorbed for short queries against a non-empty cache)."""
        if path not in ATTENTION_PATHS:
            raise ValueError(f"attention path must be one of {ATTENTION_PATHS}, got {path!r}")
        for module in self.modules():
            if isinstance(module, GtakitAttention):
                module.attention_path = path

    def set_decode_backend(self, backend: str) -> None:
        """'auto' (Triton kernels on CUDA), 'torch' or 'triton' for the absorbed decode step, in config and layers."""
        if backend not in DECODE_BACKENDS:
            raise ValueError(f"decode backend must be one of {DECODE_BACKENDS}, got {backend!r}")
        self.config.decode_backend = backend
        for module in self.modules():
            if isinstance(module, GtakitAttention):
                module.decode_backend = backend

    def kv_cache_elements_per_token(self) -> int:
        """Elements the cache holds per token, summed over layers."""
        source = self.config.source_config()
        return sum(layer_cache_elements(spec, source) for spec in self.config.gtakit_layers)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs: Any,
    ):
        # The cache under the name the installed transformers uses (5.24 renamed past_key_values to cache).
        kwargs[CACHE_FIELD] = pick_cache(cache, past_key_values)
        return self._family_class.forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


__all__ = ["FORMS", "GtakitForCausalLM", "GtakitPreTrainedModel", "attention_class", "layer_cache_elements"]
